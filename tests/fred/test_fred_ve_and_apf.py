"""#VE and the KVM async #PF under FRED: both reach the machine as ordinary events, so
FRED delivers them (event type 3). #VE has event data 0 and the stack level of vector 20;
the async #PF's "CR2" (the token) is its event data. A #VE inside the NMI handler is the
SDM-corner that Linux's IDT NMI code must survive; under FRED its ERETS keeps NMIs
blocked."""

from __future__ import annotations

from cpu.vmx import VmxConfig
from tests.fred.rig import CODE, ERETS, RSP, build, records, start

PROBE = 0x500000  # a page the tests take EPT rights from (GPA == linear)
VE_INFO = 0x130000
AREA = 0x140000

DISPATCH = """
    mov rax, [rsp+0x28]
    shr rax, 48
    and eax, 0xf
    cmp eax, 2
    je nmi_handler
"""


def test_a_ve_inside_the_nmi_handler_runs_below_the_nmi_frame_and_keeps_nmis_blocked() -> None:
    kernel = DISPATCH + f"""
    ve_handler:                             # vector 20: level 0, so max(0, 2) = 2
        mov dword ptr [{VE_INFO + 4:#x}], 0    # release the VE-information area (busy word)
        add qword ptr [rsp+8], 3             # skip the 3-byte faulting load
    ve_eret:
        {ERETS}
    nmi_handler:
        mov rax, {PROBE:#x}
        mov rbx, [rax]                       # EPT violation, convertible: #VE
        {ERETS}
    """
    m, _ = build("nop\nhlt\n", kernel=kernel,
                 vmx=VmxConfig(ept_violation_ve=True, ve_info=VE_INFO))
    assert m.ept is not None
    m.ept.set_range(PROBE, 0x1000, read=False, write=False, execute=False)
    m.nmi()
    m.inject("nmi", before="ve_eret")  # NMI #2 inside the #VE handler: latched
    start(m, CODE)
    delivered = records(m, "deliver")
    assert [(d["name"], d["type"], d["stack_level"], d["event_data"]) for d in delivered] == [
        ("NMI", 2, 2, 0), ("#VE", 3, 2, 0), ("NMI", 2, 2, 0), ("#VE", 3, 2, 0)]
    nmi, ve = delivered[0], delivered[1]
    assert ve["stack"] == "current" and ve["rsp"] < nmi["rsp"]  # pushed below the NMI frame
    assert (delivered[2]["rip"], delivered[2]["rsp"]) == (CODE, RSP[2] - 64)
    assert [r["nmi_unblocked"] for r in records(m, "eret")] == [False, True, False, True]
    assert records(m, "frame_overwritten") == []
    assert len(records(m, "ve_info_written")) == 2


def test_the_host_injected_async_pf_is_delivered_by_fred_with_the_token_as_event_data() -> None:
    main = f"""
        mov ecx, 0x4b564d06
        mov eax, 0x40
        xor edx, edx
        wrmsr
        mov ecx, 0x4b564d02
        mov eax, {AREA | 0b1011:#x}
        xor edx, edx
        wrmsr
        mov rax, {PROBE:#x}
    the_access:
        mov rbx, [rax]
        hlt
    """
    m, sym = build(main, kernel="mov rcx, cr2\nhlt\n")
    m.enable_apf(policy="kvm")
    m.swap_out(PROBE, 0x1000, latency=5000)
    start(m, CODE)
    (pf,) = [d for d in records(m, "deliver") if d["vector"] == 14]
    assert (pf["fred"], pf["type"], pf["error_code"], pf["rip"]) == (True, 3, 0, sym["the_access"])
    assert (pf["event_data"], pf["cr2"]) == (1, 1)  # the token, in the frame and in CR2
    assert m.engine.read_reg("rcx") == 1
