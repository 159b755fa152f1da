"""What the #VE image (guest_images/vmx_ve/) must print, written down from the SDM.

The values are computed here from the image's symbol table (where the tests put their
accesses, pages and stacks) and from the SDM's rules; nothing is copied from a run.
References: SDM Vol. 3C (rev. 2023) "Virtualization Exceptions", "Virtualization-Exception
Information", "Controls for Virtualization Exceptions", "Exit Qualification for EPT
Violations", "Information for VM Exits During Event Delivery"; Vol. 3A "Exception and
Interrupt Handling in 64-bit Mode" (stack frame, IST), "Interrupt 20—Virtualization
Exception" (a fault, no error code); Vol. 2 "INT n/INTO/INT3/INT1" (push order); the
line format is docs/idtlog-format.md (version 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cpu.elf import load_elf

IMAGE = "vmx_ve"
HOST_PREFIX = "host_"           # the hypervisor's own records (test names host_*)

# Vectors (two hex digits in ev=)
VE, BP, NMI = 20, 3, 2
# RFLAGS: the guest sets exactly 0x2 (bit 1 is always 1) right before each access; a
# fault's frame has RF (bit 16) set, a trap's (INT3) does not.
RFLAGS = 0x2
RF = 0x10000
FRAME_SLOTS = 5                 # RIP, CS, RFLAGS, RSP, SS: no error code for #VE or #BP
SEL_CODE, SEL_DATA = 0x08, 0x10
EXIT_EPT_VIOLATION = 48         # basic exit reason; also offset 0 of the information area
BUSY = 0xFFFFFFFF               # what the CPU writes at offset 4 on every conversion

# EPT-violation exit qualification bits
Q_READ, Q_WRITE, Q_FETCH = 0x1, 0x2, 0x4
Q_READABLE, Q_WRITABLE = 0x8, 0x10      # the GPA's rights (0 when the entry is not present)
Q_GLA_VALID = 0x80
Q_FINAL = 0x100                 # the access was to the final translation of the GLA
Q_NMI_UNBLOCKED_BY_IRET = 0x1000        # the access was IRET's, and it unblocked NMIs

# IDT-vectoring information: valid (bit 31), type in bits 10:8 (6 = software exception,
# which is what INT3 raises), vector in bits 7:0.
VECTORING_VALID = 1 << 31
TYPE_SOFTWARE_EXCEPTION = 6
# A VM exit for an NMI ("NMI exiting"): basic reason 0 ("exception or NMI"), exit
# qualification 0, VM-exit interruption information valid | type 2 (NMI) | vector 2.
EXIT_EXCEPTION_OR_NMI = 0
INTR_INFO_NMI = VECTORING_VALID | 2 << 8 | NMI

# Where guest.S puts each access inside its page, and what the pages hold (inputs).
READ_A_OFFSET = 0x18
READ_B_OFFSET = 0x20
WRITE_C_OFFSET = 0x08
READ_D_OFFSET = 0x30
FETCH_E_OFFSET = 0x40


def image_symbols(elf: Path) -> dict[str, int]:
    return dict(load_elf(elf).symbols)


def image_qword(elf: Path, addr: int) -> int:
    """The initial contents of the image at `addr` (an input of the test, e.g. what a
    load from a test page returns once the hypervisor has mapped it)."""
    for seg in load_elf(elf).segments:
        if seg.paddr <= addr and addr + 8 <= seg.paddr + len(seg.data):
            return int.from_bytes(seg.data[addr - seg.paddr:addr - seg.paddr + 8], "little")
    raise AssertionError(f"{addr:#x} is not initialised data of {elf}")


def h(value: int) -> str:
    """A number as the format writes it: lowercase hex, 0x prefix, no leading zeros."""
    return f"{value:#x}"


def record(test: str, **fields: int) -> str:
    return f"idtlog1 {test} " + " ".join(f"{k}={h(v)}" for k, v in fields.items())


def event(test: str, vector: int, rsp: int, frame: Mapping[str, int], **extras: int) -> str:
    body = " ".join(f"{k}={h(v)}" for k, v in {**frame, **extras}.items())
    return f"idtlog1 {test} ev={vector:02x} rsp={h(rsp)} {body}"


def ist_frame_rsp(ist_top: int) -> int:
    """RSP at handler entry for a gate with an IST: the IST pointer aligned down to 16,
    minus the five pushed slots."""
    return (ist_top & ~0xF) - 8 * FRAME_SLOTS


def guest_lines(sym: Mapping[str, int], elf: Path, eptp_index: int = 0,
                nmi_ist: int = 0) -> list[str]:
    """The guest-visible records, in order, as the SDM says they must read (for the image
    built with `eptp_index` and `nmi_ist`)."""
    # Each test is called from guest_entry, which runs on the guest stack with nothing
    # pushed: at every access the stack holds just the return address.
    sp = sym["guest_stack_top"] - 8
    ve_rsp = ist_frame_rsp(sym["ve_stack_top"])
    # An NMI gate without IST delivers on the current stack, also aligned down to 16 in
    # 64-bit mode; with one, on the IST stack.
    nmi_rsp = ist_frame_rsp(sym["nmi_stack_top"]) if nmi_ist else ist_frame_rsp(sp)

    def ve_event(test: str, rip: int, qual: int, gla: int, gpa: int, at_sp: int = sp) -> str:
        # #VE is a fault: saved RIP = the faulting instruction (or the fetched address),
        # RF = 1; CS and SS are the interrupted ones (no privilege change; SS stays the
        # same at the same CPL, IST or not: Vol. 2 INT n, INTRA-PRIVILEGE-LEVEL-INTERRUPT).
        return event(test, VE, ve_rsp,
                     {"rip": rip, "cs": SEL_CODE, "rflags": RFLAGS | RF, "sp": at_sp,
                      "ss": SEL_DATA},
                     reason=EXIT_EPT_VIOLATION, busy=BUSY, qual=qual, gla=gla, gpa=gpa,
                     eptp=eptp_index)

    page_a, page_b, page_c = sym["page_a"], sym["page_b"], sym["page_c"]
    page_d, page_e = sym["page_d"], sym["page_e"]
    return [
        f"idtlog1 begin {IMAGE}",
        # ve_read: through alias_page (guest paging) to page_a (EPT: not present) -> #VE;
        # not present means no rights in the qualification.
        ve_event("ve_read", sym["ve_read_access"], Q_READ | Q_GLA_VALID | Q_FINAL,
                 sym["alias_page"] + READ_A_OFFSET, page_a + READ_A_OFFSET),
        "idtlog1 ve_read PASS",
        # ve_busy: busy word still 0xFFFFFFFF -> VM exit; the load completes after the fix;
        # the area still describes ve_read's violation.
        record("ve_busy check", value=image_qword(elf, page_b + READ_B_OFFSET), ves=0,
               busy=BUSY, info_gpa=page_a + READ_A_OFFSET),
        "idtlog1 ve_busy PASS",
        # ve_rearm: re-armed, a write to the read-only page_c -> #VE: write + readable.
        ve_event("ve_rearm", sym["ve_rearm_access"],
                 Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL,
                 page_c + WRITE_C_OFFSET, page_c + WRITE_C_OFFSET),
        "idtlog1 ve_rearm PASS",
        # ve_suppress: suppress-#VE in the (not-present) leaf -> VM exit, busy stays 0.
        record("ve_suppress check", value=image_qword(elf, page_d + READ_D_OFFSET), ves=0,
               busy=0),
        "idtlog1 ve_suppress PASS",
        # ve_fetch: a jump into page_e (read/write, not executable) -> #VE on the fetch;
        # the saved RIP is the jump target.
        ve_event("ve_fetch", page_e + FETCH_E_OFFSET,
                 Q_FETCH | Q_READABLE | Q_WRITABLE | Q_GLA_VALID | Q_FINAL,
                 page_e + FETCH_E_OFFSET, page_e + FETCH_E_OFFSET),
        "idtlog1 ve_fetch PASS",
        # ve_delivery: the #BP frame push hits EPT -> VM exit (during delivery), #BP is
        # re-injected and delivered on IST2: a trap, saved RIP after the INT3, RF = 0.
        event("ve_delivery", BP, ist_frame_rsp(sym["bp_stack_top"]),
              {"rip": sym["ve_delivery_after"], "cs": SEL_CODE, "rflags": RFLAGS, "sp": sp,
               "ss": SEL_DATA}),
        record("ve_delivery check", bps=1, ves=0, busy=0),
        "idtlog1 ve_delivery PASS",
        # ve_iret_nmi: the NMI (an interrupt: RF = 0) arrives in the spin loop; its
        # handler's IRETQ unblocks NMIs and then reads the SS slot on page_f -> #VE at the
        # IRETQ with bit 12, RSP = the frame it was reading.
        event("ve_iret_nmi", NMI, nmi_rsp,
              {"rip": sym["ve_iret_nmi_spin"], "cs": SEL_CODE, "rflags": RFLAGS, "sp": sp,
               "ss": SEL_DATA}),
        ve_event("ve_iret_nmi", sym["guest_nmi_iret"],
                 Q_READ | Q_GLA_VALID | Q_FINAL | Q_NMI_UNBLOCKED_BY_IRET,
                 sym["page_f"], sym["page_f"], at_sp=sym["nmi_frame"]),
        # Retried with the busy word set: a VM exit; the IRETQ then completes.
        record("ve_iret_nmi check", nmis=1, ves=1, busy=BUSY),
        "idtlog1 ve_iret_nmi PASS",
        f"idtlog1 end {IMAGE} pass={h(7)} fail={h(0)}",
    ]


def host_lines(sym: Mapping[str, int]) -> dict[str, str]:
    """The hypervisor's record for each VM exit, in order, keyed by the guest record it
    comes right before (the exit happens in the middle of that test)."""

    def vmexit(qual: int, addr: int, rip: int, vectoring: int = 0) -> str:
        return record("host_vmexit", reason=EXIT_EPT_VIOLATION, qual=qual, gla=addr,
                      gpa=addr, rip=rip, idt_vectoring=vectoring)

    # The first write of a 64-bit interrupt frame is the SS slot just below the IST top
    # (SDM Vol. 2 INT n pseudo-code: Push(SS) first); the VM exit saves the INT3's own
    # RIP, and the IDT-vectoring information describes the #BP being delivered.
    bp_first_push = (sym["bp_stack_top"] & ~0xF) - 8
    return {
        "idtlog1 ve_busy check": vmexit(Q_READ | Q_GLA_VALID | Q_FINAL,
                                        sym["page_b"] + READ_B_OFFSET, sym["ve_busy_access"]),
        "idtlog1 ve_suppress check": vmexit(Q_READ | Q_GLA_VALID | Q_FINAL,
                                            sym["page_d"] + READ_D_OFFSET,
                                            sym["ve_suppress_access"]),
        "idtlog1 ve_delivery ev=": vmexit(Q_WRITE | Q_READABLE | Q_GLA_VALID | Q_FINAL,
                                          bp_first_push, sym["ve_delivery_int3"],
                                          VECTORING_VALID | TYPE_SOFTWARE_EXCEPTION << 8 | BP),
        "idtlog1 ve_iret_nmi ev=02": record(
            "host_vmexit", reason=EXIT_EXCEPTION_OR_NMI, qual=0, rip=sym["ve_iret_nmi_spin"],
            idt_vectoring=0, intr_info=INTR_INFO_NMI),
        # The retried IRETQ: NMIs were unblocked by the first try, so no bit 12 now.
        "idtlog1 ve_iret_nmi check": vmexit(Q_READ | Q_GLA_VALID | Q_FINAL, sym["page_f"],
                                            sym["guest_nmi_iret"]),
    }


def full_log(sym: Mapping[str, int], elf: Path, eptp_index: int = 0,
             nmi_ist: int = 0) -> list[str]:
    """Everything the whole image prints on Bochs: the guest's records with the
    hypervisor's VM-exit records where they happen."""
    hosts = host_lines(sym)
    out: list[str] = []
    for line in guest_lines(sym, elf, eptp_index, nmi_ist):
        out += [v for k, v in hosts.items() if line.startswith(k)]
        out.append(line)
    return out


def guest_visible(log: str) -> list[str]:
    """The idtlog1 lines of a log minus the hypervisor's (what a differ compares)."""
    return [ln for ln in log.splitlines()
            if ln.startswith("idtlog1 ") and not ln.split()[1].startswith(HOST_PREFIX)]
