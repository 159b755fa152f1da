"""Every self-logging image on idtlab (a scenario with one `[[image]] multiboot = true`):
it passes its own verdicts and its log agrees with Bochs' modulo what the SDM leaves
undefined. Skipped, naming the missing feature, while idtlab cannot boot multiboot
images; the comparison is skipped where Bochs is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guest_images import build as gib
from idtlab import diff as differ
from idtlab import ref
from tests.differential.expected import CLASSIC_IMAGES, TESTS, verdicts

# The SDM-corner images are compared test by test in test_sdm_images.py.
IMAGES = list(CLASSIC_IMAGES)
# Differences between idtlab and Bochs that the SDM allows (docs/differential.md).
IDTLAB_VS_BOCHS = {name: set() for name in IMAGES} | {"np_df": {"df-state-undefined"}}


@pytest.mark.parametrize("image", IMAGES)
def test_every_image_passes_its_own_verdicts_on_idtlab(image: str, idtlab_logs: dict[str, str]) -> None:
    assert verdicts(idtlab_logs[image]) == [(t, "PASS") for t in TESTS[image]], idtlab_logs[image]


@pytest.mark.parametrize("image", IMAGES)
def test_idtlab_agrees_with_bochs_modulo_what_the_sdm_leaves_undefined(
        image: str, idtlab_logs: dict[str, str], bochs_logs: dict[str, ref.RefResult]) -> None:
    res = differ.diff_records(differ.parse_log(bochs_logs[image].log),
                              differ.parse_log(idtlab_logs[image]), "bochs")
    assert res.equal, "\n".join(differ.report(res, "bochs", "idtlab"))
    assert {i for e in res.expected for i in e.ids} == IDTLAB_VS_BOCHS[image]


def test_idtlab_run_image_output_diffs_against_the_bochs_log_with_idtlab_diff(
        tmp_path: Path, idtlab_logs: dict[str, str], bochs_logs: dict[str, ref.RefResult],
        built_images: dict[str, gib.MultibootImage]) -> None:
    run = subprocess.run([sys.executable, "-m", "idtlab.cli", "run", "--image",
                          str(built_images["pf_codes"].elf)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    (tmp_path / "idtlab.out").write_text(run.stdout)
    (tmp_path / "bochs.log").write_text(bochs_logs["pf_codes"].log)
    diff = subprocess.run([sys.executable, "-m", "idtlab.cli", "diff", str(tmp_path / "bochs.log"),
                           str(tmp_path / "idtlab.out"), "--reference", "bochs"],
                          capture_output=True, text=True, check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert diff.stdout.splitlines()[-1] == ("16 records compared: 16 identical, 0 expected "
                                            "divergences; equal modulo known divergences "
                                            "(reference: bochs)")
