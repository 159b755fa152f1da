"""Many handled faults in a row never turn into #DF (cpu/engine.py; unicorn-engine/unicorn
issue #1883).

QEMU inside Unicorn remembers the last exception in `old_exception`, which only its own
delivery code resets; Python delivers instead, so without the reset the second
contributory fault would reach the hook as vector 8 and the third as a triple fault.
Architecturally each fault here is delivered and *completed* (IRET) before the next one,
so nothing is "during delivery" and Table 6-5 never applies.
"""

from __future__ import annotations

from tests.delivery.rig import (
    CODE,
    KERNEL_CS,
    KERNEL_DS,
    KERNEL_STACK,
    RFLAGS_RF,
    RSP0_TOP,
    START_RFLAGS,
    USER_CS,
    USER_DS,
    USER_STACK,
    Frame,
    assert_record,
    build,
    deliveries,
    gate,
    handler_rsp,
    read_frame,
)

N = 100


def test_a_hundred_de_faults_at_cpl0_each_skipped_by_the_handler_give_no_spurious_df() -> None:
    # DIV ECX (2 bytes) with ECX=0; the handler skips it by adding 2 to the saved RIP.
    m, sym = build(f"""
    start:
        mov ecx, 0
        mov r8d, {N}
    again:
        mov eax, 1
    the_div:
        div ecx
        dec r8d
        jnz again
        hlt
    de_handler:
        add qword ptr [rsp], 2
        iretq
    df_handler:
        hlt
    """, gates={0: gate("de_handler"), 8: gate("df_handler", ist=2)})

    r = m.run(entry=CODE, rsp=KERNEL_STACK, rflags=START_RFLAGS)

    assert r.outcome == "hlt" and r.rip == sym["de_handler"]  # the HLT just before it
    recs = deliveries(r.trace.records)
    assert len(recs) == N
    assert [d["vector"] for d in recs] == [0] * N
    assert all(d["rip"] == sym["the_div"] and "double_fault_of" not in d for d in recs)
    assert [x["kind"] for x in r.trace.records].count("iret") == N
    assert not [x for x in r.trace.records if x["kind"] in ("delivery_fault", "shutdown")]
    # The last frame, like every one: no error code, RF=1, the unchanged kernel stack.
    # RFLAGS: the last DIV follows DEC 2 -> 1, which leaves CF (0) and clears ZF, SF, PF
    # (0x01 has odd parity), AF and OF: exactly the starting 0x202, plus RF.
    frame = Frame(rip=sym["the_div"], cs=KERNEL_CS, rflags=START_RFLAGS | RFLAGS_RF,
                  rsp=KERNEL_STACK, ss=KERNEL_DS)
    assert_record(recs[-1], vector=0, stack="current", stack_top=KERNEL_STACK, cpl=0,
                  frame=frame)
    # In memory the handler has since stepped the RIP slot over the 2-byte DIV.
    at = handler_rsp(KERNEL_STACK, error_code=False)
    assert read_frame(m, at, error_code=False) == {**frame.slots(), "rip": sym["the_div"] + 2}


def test_a_hundred_gp_faults_from_cli_at_cpl3_each_skipped_by_the_handler_give_no_spurious_df() -> None:
    # CLI (1 byte) at CPL3 with IOPL 0 raises #GP(0); the handler drops the error code,
    # steps the saved RIP over the CLI and returns to CPL3. INT3 then enters CPL0 (on
    # IST1, leaving the RSP0 frame alone), whose OUT to the exit port ends the run (an OUT
    # at CPL3 with IOPL 0 would be one more #GP: the TSS has no I/O bitmap).
    m, sym = build(f"""
    start:
        mov r8d, {N}
    again:
    the_cli:
        cli
        dec r8d
        jnz again
        int3
    bp_handler:
        out 0xf4, al
    gp_handler:
        add rsp, 8
        add qword ptr [rsp], 1
        iretq
    df_handler:
        hlt
    """, gates={13: gate("gp_handler"), 8: gate("df_handler", ist=2),
                3: gate("bp_handler", dpl=3, ist=1)})

    r = m.run(entry=CODE, rsp=USER_STACK, cpl=3, rflags=START_RFLAGS)

    assert r.outcome == "exit"
    *recs, bp = deliveries(r.trace.records)
    assert (bp["vector"], bp["stack"]) == (3, "ist1")
    assert len(recs) == N
    assert [d["vector"] for d in recs] == [13] * N
    assert all(d["error_code"] == 0 and d["rip"] == sym["the_cli"] and d["stack"] == "rsp0"
               and "double_fault_of" not in d for d in recs)
    iret_cpls = [x["to_cpl"] for x in r.trace.records if x["kind"] == "iret"]
    assert iret_cpls == [3] * N
    assert not [x for x in r.trace.records if x["kind"] in ("delivery_fault", "shutdown")]
    # Every delivery reuses the same RSP0 frame slots, so memory holds the last frame.
    # Its RFLAGS: the last CLI follows DEC 2 -> 1 (CF kept at 0; ZF, SF, PF, AF, OF
    # clear): exactly 0x202, plus RF. The first frame's is the same, before any DEC.
    assert recs[0]["rflags"] == START_RFLAGS | RFLAGS_RF
    frame = Frame(error_code=0, rip=sym["the_cli"], cs=USER_CS,
                  rflags=START_RFLAGS | RFLAGS_RF, rsp=USER_STACK, ss=USER_DS)
    assert_record(recs[-1], vector=13, stack="rsp0", stack_top=RSP0_TOP, cpl=0, frame=frame)
    # In memory the handler has since stepped the RIP slot over the 1-byte CLI.
    at = handler_rsp(RSP0_TOP, error_code=True)
    assert read_frame(m, at, error_code=True) == {**frame.slots(), "rip": sym["the_cli"] + 1}
