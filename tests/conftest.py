"""Let pytest rewrite the asserts in the shared test helpers (slot-by-slot frame diffs).
Registered here, once, before any test module imports them."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.delivery.rig", "tests.events.kit", "tests.ve.kit",
                               "tests.apf.kit")
