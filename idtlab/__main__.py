"""`python -m idtlab`: the `idtlab` command."""

from __future__ import annotations

import sys

from idtlab.cli import main

sys.exit(main())
