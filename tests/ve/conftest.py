"""Let pytest rewrite the asserts in the shared helpers (slot-by-slot diffs)."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.ve.kit", "tests.delivery.rig")
