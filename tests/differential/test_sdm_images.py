"""The SDM-corner images (docs/sdm-map.md, "SDM corners real handlers hit"), test by test,
against the
Bochs log recorded in tests/differential/bochs/ (every verdict in it is PASS: each
image computes its verdicts from the SDM's rule).

- Bochs today prints exactly the recorded log (skipped without Bochs).
- idtlab prints, for every test, exactly the records Bochs printed; the tests listed in
  `IDTLAB_PENDING` do not yet and are strict xfails naming the rule whose wiring fixes
  them, so that each flips to a failure (and must leave the table) when it lands.
- QEMU 7.2 TCG differs from Bochs exactly in the tests of `QEMU_SDM_DIVERGENCES`, modulo
  its listed KNOWN_DIVERGENCES (RF in fault frames).
"""

from __future__ import annotations

import pytest

from idtlab import diff as differ
from idtlab import ref
from tests.differential.expected import (
    IDTLAB_PENDING,
    QEMU_SDM_DIVERGENCES,
    SDM_IMAGES,
    TESTS,
    recorded_bochs_log,
    records_of,
    verdicts,
)

CASES = [pytest.param(image, test, id=f"{image}-{test}",
                      marks=[pytest.mark.xfail(strict=True, reason=IDTLAB_PENDING[image][test])]
                      if test in IDTLAB_PENDING.get(image, {}) else [])
         for image in SDM_IMAGES for test in TESTS[image]]


def test_every_sdm_image_lists_its_tests_and_its_pending_ones() -> None:
    for image in SDM_IMAGES:
        assert verdicts(recorded_bochs_log(image)) == [(t, "PASS") for t in TESTS[image]]
        assert set(IDTLAB_PENDING[image]) <= set(TESTS[image])
        assert set(QEMU_SDM_DIVERGENCES[image]) <= set(TESTS[image])


@pytest.mark.parametrize("image", SDM_IMAGES)
def test_bochs_prints_the_recorded_log(image: str, bochs_logs: dict[str, ref.RefResult]) -> None:
    run = bochs_logs[image]
    assert not run.timed_out, run.status_line()
    assert ([r.text for r in differ.parse_log(run.log)]
            == [r.text for r in differ.parse_log(recorded_bochs_log(image))])


@pytest.mark.parametrize(("image", "test"), CASES)
def test_idtlab_prints_the_records_bochs_printed(image: str, test: str,
                                                 idtlab_logs: dict[str, str]) -> None:
    assert records_of(idtlab_logs[image], test) == records_of(recorded_bochs_log(image), test)


@pytest.mark.parametrize("image", SDM_IMAGES)
def test_qemu_differs_from_bochs_exactly_in_its_listed_tests(
        image: str, qemu_logs: dict[str, ref.RefResult]) -> None:
    qemu, bochs = qemu_logs[image].log, recorded_bochs_log(image)
    differing = set()
    for test in TESTS[image]:
        a = differ.parse_log("\n".join(records_of(bochs, test)))
        b = differ.parse_log("\n".join(records_of(qemu, test)))
        if not differ.diff_records(a, b, "qemu").equal:
            differing.add(test)
    assert differing == set(QEMU_SDM_DIVERGENCES[image])
