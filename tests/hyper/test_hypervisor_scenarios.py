"""`[hypervisor]` in a scenario: the table drives the same machinery the Python tests
use, bad input is one line on stderr with exit status 2, the state survives a checkpoint,
and an injection the HLT activity state does not admit fails the entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpu.vmx_exits import VmxControls
from cpu.vmx_host import Inject
from idtlab import scenario as scn
from idtlab.cli import main
from tests.delivery.rig import gate
from tests.hyper.kit import KERNEL_STACK, Script, build, entries, exits, one

GUEST = """
[[code]]
at = 0x100000
asm = '''
main:
    int3
    hlt
bp_handler:
    iretq
'''
[idt]
3 = { handler = "bp_handler", ist = 1 }
[tss]
ist1 = 0x90000
[run]
entry = "main"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_a_scenario_bitmap_makes_int3_exit_and_the_sdm_host_reflects_it(tmp_path: Path) -> None:
    sc = scn.load(write(tmp_path, GUEST + '[hypervisor]\nexception_bitmap = [3]\n'))
    r = scn.run(sc)
    x = one(r.trace.records, "vmexit")
    assert (x["interruption_info"], x["instruction_length"], x["rip"]) == (
        0x80000603, 1, sc.symbols["main"])
    e = one(r.trace.records, "vmentry")
    assert (e["injected"], e["length"]) == (0x80000603, 1)
    d = one(r.trace.records, "deliver")
    assert (d["vector"], d["rip"], d["source"]) == (3, sc.symbols["main"] + 1, "software")


def test_a_scenario_launch_injection_is_delivered_before_the_first_instruction(
        tmp_path: Path) -> None:
    sc = scn.load(write(tmp_path, GUEST + '[hypervisor]\ninject = { info = 0x80000603, '
                        'length = 1 }\n'))
    r = scn.run(sc)
    first = next(x for x in r.trace.records if x["kind"] == "deliver")
    assert (first["vector"], first["rip"]) == (3, sc.symbols["main"] + 1)


BAD = [
    ('[hypervisor]\nexeption_bitmap = [14]\n', "unknown key 'exeption_bitmap'"),
    ('[hypervisor]\nexception_bitmap = [40]\n', "[hypervisor] exception_bitmap"),
    ('[hypervisor]\nvirtual_nmis = true\n', "virtual_nmis needs nmi_exiting"),
    ('[hypervisor]\nnmi_exiting = true\nnmi_window_exiting = true\n',
     "nmi_window_exiting needs virtual_nmis"),
    ('[hypervisor]\nhost = "nosuch"\n', "unknown host 'nosuch'"),
    ('[hypervisor]\nhost = "nosuch_module_x:f"\n', "[hypervisor] host"),
    ('[hypervisor]\ninject = { error_code = 1 }\n', "missing key 'info'"),
    ('[apf]\non_fail = "stop"\nerror_policy = "spte-tag"\n', "either on_fail or error_policy"),
    ('[apf]\nerror_policy = "error-cache"\n', "the cache size N must be 1..4096"),
    ('[apf]\nerror_policy = "lru"\n', "unknown error policy 'lru'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_hypervisor_and_error_policy_input_is_one_line_and_exit_status_2(
        tmp_path: Path, extra: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(write(tmp_path, GUEST + extra))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("idtlab: error: "), err
    assert message in err
    assert "Traceback" not in err


def test_a_checkpoint_restores_the_hypervisor_state_and_the_rerun_gives_the_same_exits() -> None:
    m, sym = build("""
    start:
        nop
    R:
        nop
        hlt
    """, host="sdm", controls=VmxControls(interrupt_window_exiting=True))
    m.build()
    m.start_state(entry=sym["start"], rsp=KERNEL_STACK)
    cp = m.checkpoint()
    first = [x["exit_reason"] for x in exits(m.run())]
    m.rollback(cp)
    assert m.vmx_exits.state.controls is not None
    assert m.vmx_exits.state.controls.interrupt_window_exiting  # the sdm host cleared it
    second = [x["exit_reason"] for x in exits(m.run())]
    assert first == second == [7]


def test_an_exception_injected_into_a_halted_guest_fails_the_entry_as_invalid_guest_state(
        ) -> None:
    host = Script(Inject(0x80000B0E, 0))
    m, sym = build("""
    start:
        hlt
    after:
        hlt
    h:
        iretq
    """, gates={0x30: gate("h"), 14: gate("h")}, host=host,
        controls=VmxControls(external_interrupt_exiting=True))
    m.inject("interrupt", vector=0x30, cycle=5000)
    r = m.run(entry=sym["start"], rsp=KERNEL_STACK)
    first, failure = exits(r)
    assert first["exit_reason"] == 1
    assert (failure["exit_reason"], failure["rip"]) == (0x80000021, sym["after"])
    assert one(r.trace.records, "vmentry")["exit_reason"] == 0x80000021
    assert entries(r)[0]["failed"].endswith("cannot be injected in activity state hlt")
