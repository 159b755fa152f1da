"""Make the checkout importable when plain `pytest` runs without an installed idtlab, so
the delivery tests can import `cpu`, `idt`, `idtlab` and `tests.delivery.rig` (assert
rewriting for the rig is registered in tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
