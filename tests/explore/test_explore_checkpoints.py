"""The explorer's checkpointed runs, its events other than NMI, user invariants, windows
opened by an event, and Dask.

The checkpointed path (one load, the undisturbed run going forward from checkpoint to
checkpoint, each schedule rolled back) must give exactly the trace a fresh run from the
start gives: the first test compares them record by record on every shipped example."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from idtlab import explore as ex
from idtlab import scenario as scn
from idtlab.cli import main
from idtlab.explore_report import finding_json
from tests.explore.test_explore import SCENARIO

EXAMPLES = Path(ex.__file__).parent / "examples"
SHIPPED = sorted(p for p in EXAMPLES.rglob("*.toml") if "explore" not in p.parts)


def _sample(points: tuple[ex.Point, ...], n: int) -> list[ex.Point]:
    if len(points) <= n:
        return list(points)
    return [points[i * (len(points) - 1) // (n - 1)] for i in range(n)]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_checkpointed_schedule_gives_the_trace_of_a_fresh_run_for_every_shipped_example(
        path: Path) -> None:
    entry = hex(scn.load(path).run_args["entry"])
    plan = ex.plan_for(path, entry, None)
    session = ex.Session(plan)
    nmi = (ex.parse_event("nmi"),)
    for point in _sample(plan.window.points, 12):
        got = session.run(nmi, (point,))
        checkpointed = ([dict(r) for r in got.trace.records], got.outcome, got.icount)
        session.rollback()
        _, fresh, _ = ex._run_fresh(plan, nmi, (point,), plan.budget)
        assert checkpointed == ([dict(r) for r in fresh.trace.records], fresh.outcome,
                                fresh.icount), point.label


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# A non-atomic increment of a counter the interrupt handler also increments: an interrupt
# between the load and the store loses the main program's update.
LOST_UPDATE = """
[[code]]
at = 0x100000
asm = '''
main:
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff    # APIC software-enabled
load:
    mov rax, qword ptr [counter]
bump:
    inc rax
store:
    mov qword ptr [counter], rax
done:
    mov al, byte ptr [counter]
    mov dx, 0xf4
    out dx, al

irq:
    inc qword ptr [counter]
    mov dword ptr [rbx + 0xb0], 0        # EOI
    iretq
'''
[[data]]
at = 0x110000
symbol = "counter"
size = 8
[idt]
0x40 = { handler = "irq" }
[run]
entry = "main"
[[expect]]
exit_code = 2
"""


def test_an_interrupt_between_the_load_and_the_store_loses_an_update(tmp_path: Path) -> None:
    path = _write(tmp_path, "lost.toml", LOST_UPDATE)
    findings = ex.explore(path, "interrupt:0x40", "load", "done")
    # The boundaries after the load and before the store retires: `inc rax`, the store.
    assert [(f.point.label, f.ok) for f in findings] == [
        ("load (#1)", True), ("bump (#1)", False), ("store (#1)", False), ("done (#1)", True)]
    assert findings[1].failures == ("[[expect]] #1: exit code: expected 2, got 1",)
    assert all(f.outcome == "exit" for f in findings)


VE_TOUCH = """
[machine]
memory = "16M"
[vmx]
ept_violation_ve = true
ve_info = 0x130000
[host]
on_ept_violation = "resume-fixed"
[[code]]
at = 0x100000
asm = '''
main:
    mov rcx, 0x400000
    nop
the_load:
    mov rax, qword ptr [rcx]
after:
    mov al, byte ptr [ve_count]
    mov dx, 0xf4
    out dx, al

ve_handler:                      # logs, does not re-arm: the retried load exits to the
    inc qword ptr [ve_count]     # host, which fixes the entry
    iretq
'''
[[data]]
at = 0x110000
symbol = "ve_count"
size = 8
[[data]]
at = 0x130000
symbol = "ve_info"
size = 0x1000
[idt]
20 = { handler = "ve_handler" }
[run]
entry = "main"
[[expect]]
exit_code = 0
"""


def test_a_revoked_ept_entry_gives_a_ve_exactly_when_revoked_before_the_access(
        tmp_path: Path) -> None:
    path = _write(tmp_path, "ve.toml", VE_TOUCH)
    findings = ex.explore(path, "ept_revoke:0x400000", "main", "after")
    assert [(f.point.label, f.ok) for f in findings] == [
        ("main (#1)", False), ("main+0x7 (#1)", False), ("the_load (#1)", False),
        ("after (#1)", True)]
    assert findings[0].failures == ("[[expect]] #1: exit code: expected 0, got 1",)


def cr2_pf(result: object, machine: object) -> str | None:
    """A user invariant (module:function form): every #PF delivered had CR2 = 0x99."""
    from cpu.outcomes import RunResult

    assert isinstance(result, RunResult)
    bad = [d for d in result.deliveries if d["name"] == "#PF" and d.get("cr2") != 0x99]
    return f"a #PF with CR2 = {bad[0].get('cr2'):#x}" if bad else None


# The CR2 race of test_explore.py: the #PF handler pushes two registers, then reads CR2;
# the NMI handler takes a #PF of its own.
CR2_RACE = SCENARIO


def test_the_cr2_consistent_invariant_finds_the_boundaries_before_the_cr2_read(
        tmp_path: Path) -> None:
    path = _write(tmp_path, "cr2.toml", CR2_RACE)
    read_at = scn.load(path).symbols["pf_read_cr2"]
    findings = ex.explore(path, "nmi", "pf_handler", "pf_done", invariants=("cr2-consistent",))
    assert [f.point.label for f in findings if not f.ok] == [
        "pf_handler (#1)", "pf_handler+0x1 (#1)", "pf_read_cr2 (#1)"]
    assert findings[0].failures[0] == (  # invariants first
        f"invariant cr2-consistent: the #PF handler read CR2 = 0x500000 at {read_at:#x}, but "
        "its #PF was for 0x400000")


def test_a_user_invariant_from_a_file_and_from_a_module_is_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, "cr2.toml", CR2_RACE)
    inv = tmp_path / "inv.py"
    inv.write_text("def no_second_pf(result, machine):\n"
                   "    n = sum(d['name'] == '#PF' for d in result.deliveries)\n"
                   "    return f'{n} #PFs' if n > 1 else None\n")
    findings = ex.explore(path, "nmi", "pf_handler", "pf_done",
                          invariants=(f"{inv}:no_second_pf",))
    assert {f.failures[0] for f in findings} == {f"invariant {inv}:no_second_pf: 2 #PFs"}
    by_module = ex.explore(path, "nmi", "main", "main", invariants=(f"{__name__}:cr2_pf",))
    assert by_module[0].failures[0].startswith(f"invariant {__name__}:cr2_pf: a #PF with CR2 =")


@pytest.mark.parametrize("spec, message", [
    ("nope", "not a ready-made invariant"),
    ("/no/such/file.py:f", "no such file /no/such/file.py"),
    ("json:no_such_function", "json has no function 'no_such_function'"),
    ("no_such_module_xyz:f", "cannot load no_such_module_xyz: ModuleNotFoundError"),
])
def test_a_bad_invariant_is_one_line_and_exit_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, message: str) -> None:
    path = _write(tmp_path, "cr2.toml", CR2_RACE)
    assert main(["explore", str(path), "--window", "main..main", "--invariant", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("event, message", [
    ("interrupt", "give the vector, 16..255"),
    ("interrupt:0x10000", "give the vector, 16..255"),
    ("async_pf", "give the swapped page or the token"),
    ("ept_revoke", "give the guest-physical page"),
    ("nmi:3", "an NMI takes no argument"),
    ("smi", "unknown event"),
])
def test_a_bad_event_is_one_line_and_exit_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], event: str, message: str) -> None:
    path = _write(tmp_path, "cr2.toml", CR2_RACE)
    assert main(["explore", str(path), "--window", "main..main", "--event", event]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


NESTED = """
[[code]]
at = 0x100000
asm = '''
main:
    nop
    nop
    mov dx, 0xf4
    out dx, al

nmi_handler:
    nop
    int3
nmi_after_int3:
    nop
    iretq

bp_handler:
    nop
bp_iret:
    iretq
'''
[idt]
2 = { handler = "nmi_handler", ist = 1 }
3 = { handler = "bp_handler" }
[tss]
ist1 = 0x90000
[run]
entry = "main"
[[inject]]
event = "nmi"
before = "main+0x1"
"""


def test_a_window_inside_a_handler_opened_by_the_scenarios_own_event(tmp_path: Path) -> None:
    path = _write(tmp_path, "nested.toml", NESTED)
    labels = [p.label for p in ex.enumerate_points(path, "nmi_handler", "main+0x2")]
    assert labels == ["nmi_handler (#1)", "nmi_handler+0x1 (#1)", "bp_handler (#1)",
                      "bp_iret (#1)", "nmi_after_int3 (#1)", "nmi_after_int3+0x1 (#1)",
                      "main+0x1 (#2)", "main+0x2 (#1)"]
    findings = ex.explore(path, "nmi", "nmi_handler", "main+0x2", invariants=("frames-intact",))
    # A second NMI anywhere in the NMI handler is held (latched or blocked) until an IRET
    # unblocks NMIs -- the #BP handler's, which returns into the NMI handler: it nests on
    # IST1 and overwrites the live frame. Once the NMI has returned, it is harmless.
    assert [(f.point.label, f.ok) for f in findings] == [
        ("nmi_handler (#1)", False), ("nmi_handler+0x1 (#1)", False),
        ("bp_handler (#1)", False), ("bp_iret (#1)", False), ("nmi_after_int3 (#1)", False),
        ("nmi_after_int3+0x1 (#1)", False), ("main+0x1 (#2)", True), ("main+0x2 (#1)", True)]


def test_the_report_is_the_same_with_one_two_and_dask_workers(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed", reason="Dask distributed is not installed "
                                      "(pip install 'idtlab[dask]')")
    path = _write(tmp_path, "cr2.toml", CR2_RACE)
    inv = ("cr2-consistent",)
    one = ex.explore(path, ("nmi", "nmi"), "pf_handler", "pf_done", invariants=inv)
    two = ex.explore(path, ("nmi", "nmi"), "pf_handler", "pf_done", jobs=2, invariants=inv)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        on_dask = ex.explore(path, ("nmi", "nmi"), "pf_handler", "pf_done", dask=client,
                             invariants=inv)
    def as_json(findings: list[ex.Finding]) -> str:
        return json.dumps([finding_json(f) for f in findings])

    assert as_json(one) == as_json(two) == as_json(on_dask)
    assert len(one) == 78 and sum(not f.ok for f in one) > 0


def test_a_dask_address_that_cannot_be_reached_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("distributed", reason="Dask distributed is not installed")
    path = _write(tmp_path, "cr2.toml", CR2_RACE)
    code = main(["explore", str(path), "--window", "main..main", "--dask",
                 "tcp://127.0.0.1:1", "--dask-timeout", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in err


def test_a_multiboot_image_is_explored_past_its_32_bit_boot(tmp_path: Path) -> None:
    from guest_images.build import build_mb_image

    elf = build_mb_image("bp_stacks").elf
    path = _write(tmp_path, "mb.toml", f"""
        [machine]
        memory = "64M"
        [[image]]
        elf = "{elf}"
        multiboot = true
        [[expect]]
        exit_code = 0
        """)
    sym = scn.load(path).symbols
    plan = ex.plan_for(path, "bp_ist1", f"{sym['bp_ist1'] + 7:#x}")
    points = plan.window.points
    # The window lies past the boot code and the switch to 64-bit mode (tens of thousands
    # of instructions, run at full speed to the window's first arrival).
    assert points[0].label == "bp_ist1 (#1)" and points[0].icount > 10_000
    session = ex.Session(plan)
    nmi = (ex.parse_event("nmi"),)
    for point in points[:2]:
        got = session.run(nmi, (point,))
        checkpointed = [dict(r) for r in got.trace.records]
        session.rollback()
        _, fresh, _ = ex._run_fresh(plan, nmi, (point,), plan.budget)
        assert checkpointed == [dict(r) for r in fresh.trace.records]
        # The image has no NMI handler of its own: it logs the NMI as unexpected and fails.
        assert (got.outcome, got.exit_code) == ("exit", 1)
