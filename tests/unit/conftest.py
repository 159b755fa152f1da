"""Make the checkout importable when plain `pytest` runs without an installed idtlab.

`python -m pytest` puts the working directory on sys.path and `pytest` does not; these
tests import `idtlab` and `guest_images` from the checkout they live in. (A project-wide
`pythonpath = ["."]` under [tool.pytest.ini_options] would make this file unnecessary.)
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
