"""`idtlab suite` over the real kvm-unit-tests x86 suite. Runs only when IDTLAB_KUT_DIR
names a built kvm-unit-tests tree (the directory holding x86/unittests.cfg and the
x86/*.flat files); docs/kvm-unit-tests.md says how to build one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from idtlab import cli, suite

KUT_DIR = os.environ.get("IDTLAB_KUT_DIR", "")
HOW = ("set IDTLAB_KUT_DIR to a built kvm-unit-tests tree: git clone "
       "https://gitlab.com/kvm-unit-tests/kvm-unit-tests.git && cd kvm-unit-tests && "
       "./configure --arch=x86_64 && make -j2 (docs/kvm-unit-tests.md)")

pytestmark = pytest.mark.skipif(
    not KUT_DIR or not (Path(KUT_DIR) / "x86" / "unittests.cfg").is_file()
    or not list((Path(KUT_DIR) / "x86").glob("*.flat")), reason=HOW)

# The configs the measure leaves out besides those needing more CPUs: SVM, VMX,
# Hyper-V and KVM's paravirtual interfaces.
NOT_MEASURED = {"svm", "svm_npt", "vmx", "smptest3", "vmware_backdoors", "asyncpf", "kvmclock_test"}


def cfg() -> Path:
    return Path(KUT_DIR) / "x86" / "unittests.cfg"


def test_every_config_of_the_real_suite_parses_and_has_a_kernel_or_a_reason() -> None:
    configs = suite.parse_config(cfg())
    assert len(configs) >= 80
    plans = suite.plan(cfg(), configs, None, None, "qemu")
    for p in plans:
        assert p.idtlab_skip is not None or p.image.is_file(), p.config.name
        assert p.cmdline.startswith(f"x86/{p.config.file} ")


def test_the_policy_skips_what_the_issue_leaves_out_and_runs_the_single_cpu_x86_64_rest() -> None:
    plans = {p.config.name: p for p in suite.plan(cfg(), suite.parse_config(cfg()), None, None, "qemu")}
    for name, p in plans.items():
        if name in NOT_MEASURED or name.startswith("hyperv_") or (
                p.config.smp > 1 and p.config.file not in suite.ONE_CPU_SUFFICES):
            assert p.idtlab_skip is not None, name
    for name in ("eventinj", "emulator", "debug", "la57", "msr", "msr64", "idt_test", "realmode",
                 "xsave", "setjmp", "sieve", "tsc", "memory", "umip", "smap", "s3", "intel_iommu"):
        assert plans[name].idtlab_skip is None, name


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_eventinj_passes_its_13_checks_on_qemu_tcg_and_is_an_outcome_on_idtlab(
        capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["suite", str(cfg()), "--only", "eventinj", "--reference", "qemu", "--json",
              "--timeout", "120"])
    [row] = json.loads(capsys.readouterr().out)["configs"]
    assert (row["reference"]["status"], row["reference"]["summary"]) == ("PASS", "13 tests")
    # Whatever idtlab does with it today, it is an outcome, never a crash or a hang.
    assert row["idtlab"]["status"] in ("PASS", "FAIL"), row["idtlab"]["stop"]


def test_intel_iommu_passes_its_11_checks_on_idtlabs_q35_with_the_iommu_and_edu(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The DMAR, interrupt-remapping, DMA and IR-through-IOAPIC/MSI checks
    (cpu/devices/vtd.py, cpu/devices/edu.py, cpu/q35.py), on one CPU."""
    cli.main(["suite", str(cfg()), "--only", "intel_iommu", "--json", "--timeout", "120"])
    [row] = json.loads(capsys.readouterr().out)["configs"]
    assert (row["idtlab"]["status"], row["idtlab"]["summary"]) == ("PASS", "11 tests"), \
        row["idtlab"]["stop"]
    assert row["idtlab"]["command"].endswith("--machine q35 --device intel-iommu --device edu")
