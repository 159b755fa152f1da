"""The differ for the #VE image: the hypervisor's own records left out (--guest-only),
and Bochs' two known #VE-image divergences (EPTP index 0, SS at a same-CPL IST switch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab import cli
from idtlab import diff as differ

ON_BOCHS = """\
idtlog1 begin vmx_ve
idtlog1 ve_read ev=14 rsp=0x2ff0 rip=0x201000 cs=0x8 rflags=0x10002 sp=0x3000 ss=0x10 eptp=0x0
idtlog1 host_vmexit reason=0x30 qual=0x181 gla=0x600000
idtlog1 ve_read PASS
idtlog1 ve_nmi ev=14 rsp=0x4ff0 rip=0x201100 cs=0x8 rflags=0x2 sp=0x5000 ss=0x10
idtlog1 end vmx_ve pass=0x2 fail=0x0
"""
# The guest part alone on idtlab: no host_ line, the EPTP index the VMCS holds (2), and SS
# NULL after the same-CPL IST switch.
ON_IDTLAB = (ON_BOCHS.replace("idtlog1 host_vmexit reason=0x30 qual=0x181 gla=0x600000\n", "")
             .replace("eptp=0x0", "eptp=0x2").replace("sp=0x5000 ss=0x10", "sp=0x5000 ss=0x0"))


def records(text: str) -> list[differ.Record]:
    return differ.parse_log(text)


def test_the_hypervisors_own_records_are_left_out_only_when_asked() -> None:
    assert not differ.diff_records(records(ON_BOCHS), records(ON_IDTLAB), "bochs").equal
    res = differ.diff_records(records(ON_BOCHS), records(ON_IDTLAB), "bochs", guest_only=True)
    assert res.equal
    assert [(e.a.test, e.ids) for e in res.expected] == [
        ("ve_read", ("bochs-ve-eptp-index",)), ("ve_nmi", ("bochs-ss-same-cpl-ist",))]


def test_the_bochs_entries_do_not_excuse_other_values_or_other_references() -> None:
    other_eptp = ON_IDTLAB.replace("eptp=0x2", "eptp=0x3")
    assert differ.diff_records(records(ON_BOCHS.replace("eptp=0x0", "eptp=0x1")),
                               records(other_eptp), "bochs", guest_only=True).first == 1
    rpl3 = ON_IDTLAB.replace("sp=0x5000 ss=0x0", "sp=0x5000 ss=0x2b")
    assert not differ.diff_records(records(ON_BOCHS), records(rpl3), "bochs",
                                   guest_only=True).equal
    assert not differ.diff_records(records(ON_BOCHS), records(ON_IDTLAB), "qemu",
                                   guest_only=True).equal


def test_the_cli_takes_guest_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "bochs.log", tmp_path / "idtlab.log"
    a.write_text(ON_BOCHS)
    b.write_text(ON_IDTLAB)
    assert cli.main(["diff", str(a), str(b), "--reference", "bochs"]) == 1
    assert cli.main(["diff", str(a), str(b), "--reference", "bochs", "--guest-only"]) == 0
    assert "bochs-ve-eptp-index" in capsys.readouterr().out
