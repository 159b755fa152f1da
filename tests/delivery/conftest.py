"""Make the checkout importable when plain `pytest` runs without an installed idtlab, so
the delivery tests can import `cpu`, `idt`, `idtlab` and `tests.delivery.rig`; and let
pytest rewrite the asserts in the rig so a frame mismatch shows slot-by-slot diffs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest.register_assert_rewrite("tests.delivery.rig")
