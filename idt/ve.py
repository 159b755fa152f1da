"""The virtualization exception (#VE, vector 20): the VE-information area, the EPT-violation
exit qualification it carries, and the decision whether an EPT violation becomes a #VE or
a VM exit.

What #VE is
-----------
With EPT, every guest-physical access is translated a second time by tables the host
owns (cpu/ept.py). An access those tables refuse is an *EPT violation*, normally a VM
exit: the host runs, fixes something, resumes the guest, and the guest never knows. The
"EPT-violation #VE" secondary processor-based VM-execution control (bit 18) lets the host
hand some violations to the guest instead, as an ordinary exception: the CPU writes what
the VM exit would have reported into a guest page, the *VE-information area*, and then
delivers vector 20 through the guest's IDT as a fault with no error code, whose saved RIP
is the faulting instruction (SDM Vol. 3C "Virtualization Exceptions"; Vol. 3A "Interrupt
20—Virtualization Exception"; Bochs vmexit.cc `Virtualization_Exception`).

The busy-word protocol
----------------------
The area (SDM Vol. 3C "Virtualization-Exception Information"; Linux
`struct vmx_ve_information`, arch/x86/include/asm/vmx.h)::

    +0x00  u32  exit reason       always 48 (EPT violation)
    +0x04  u32  busy              0: a #VE may be delivered; the CPU writes 0xFFFFFFFF
    +0x08  u64  exit qualification (`ept_qualification`)
    +0x10  u64  guest-linear address (valid if qualification bit 7)
    +0x18  u64  guest-physical address
    +0x20  u16  EPTP index
    +0x22       (tail padding to 0x28 in the C struct)

A violation converts only while the busy word is 0; converting sets it to 0xFFFFFFFF, so
every later convertible violation is a VM exit until guest software writes 0 back. The
word is the *only* thing that stops #VE from nesting: #VE sets no NMI-style blocking, and
its IRET unblocks nothing of its own.

Why re-arming is racy
---------------------
The handler must re-arm by clearing the word, and it must leave by IRET; no instruction
does both. Whatever lands between the two runs with #VE armed (SDM has no "#VE blocked
until IRET"; A. Lutomirski and A. Cooper on LKML, 2020-04, in "[PATCH v2] x86/kvm: Disable
KVM_ASYNC_PF_SEND_ALWAYS")::

    #VE handler (IST stack, say)            time ->
    | copy info area; handle the fault
    | mov dword [ve_info+4], 0      <- re-armed
    |        NMI ------------------> NMI handler (touches a convertible page)
    |                                 #VE #2: converted (busy == 0): the info area is
    |                                 overwritten, busy := 0xFFFFFFFF, and on an IST
    |                                 stack its frame lands on #VE #1's frame
    |                                 #VE #2 handler: clear busy; IRETQ -> NMIs unblocked
    |                                 inside the NMI handler (the nested-NMI problem
    |                                 of Linux entry_64.S `nmi` again)
    |        <-------------------- NMI handler IRETQ
    | iretq                         <- pops whatever frame is there now
    v

Clearing the word *before* copying the info loses the first violation's data; clearing it
late (or never, deferring the re-arm to some later point as Lutomirski's LKML mail of
2020-04-09 in the same thread sketches) only turns the second violation into a VM exit,
which is safe but slow. Even the NMI handler's own IRET matters: an EPT violation on an
IRET's stack read sets qualification bit 12 ("NMI unblocking due to IRET") because the
IRET cleared NMI blocking before it faulted; a VMM re-establishes the blocking, a #VE
handler is simply told.

Which suppress-#VE bit counts
-----------------------------
Bit 63 of EPT entries is "suppress #VE". For one violation exactly one entry's bit 63 is
consulted: the *not-present* entry that stopped the walk, or else the *leaf* that maps the
page (PTE, or a PDE/PDPTE with bit 7). Bit 63 of present non-leaf entries is ignored (SDM
3C "EPT Violations", "Convertible EPT Violations"). Zeroed tables therefore make every
not-present violation convertible, which is why KVM fills new tables with bit 63 set
(Linux arch/x86/kvm/mmu/spte.h `SHADOW_NONPRESENT_VALUE`). cpu/ept.py reports the right
bit; `convert_to_ve` decides with it.

What is not here: the walk itself (cpu/ept.py), writing the area and delivering vector
20 (cpu/machine.py), and #VE's place in the #DF classes (idt/vectors.py: page-fault
class, so #VE is only ever the first of a pair: a violation *during* delivery is never
converted).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag

VE_VECTOR = 20
EXIT_REASON_EPT_VIOLATION = 48  # basic exit reason (SDM 3C Appendix "Basic Exit Reasons")
VE_BUSY = 0xFFFFFFFF  # what the CPU writes at offset 4 when it delivers a #VE

# The VE-information area (SDM 3C "Virtualization-Exception Information"; Linux vmx.h).
VE_INFO_EXIT_REASON = 0x00  # u32
VE_INFO_BUSY = 0x04  # u32
VE_INFO_QUALIFICATION = 0x08  # u64
VE_INFO_GLA = 0x10  # u64
VE_INFO_GPA = 0x18  # u64
VE_INFO_EPTP_INDEX = 0x20  # u16
VE_INFO_ARCH_SIZE = 0x22  # bytes the architecture defines
VE_INFO_SIZE = 0x28  # sizeof(struct vmx_ve_information): tail padding to 8

_VE_INFO_FORMAT = "<IIQQQH6x"
assert struct.calcsize(_VE_INFO_FORMAT) == VE_INFO_SIZE


def _check(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value:#x} does not fit in {bits} bits")


@dataclass(frozen=True)
class VeInfo:
    """The VE-information area as the CPU writes it on a conversion."""

    exit_reason: int = EXIT_REASON_EPT_VIOLATION
    busy: int = VE_BUSY
    qualification: int = 0
    guest_linear: int = 0
    guest_physical: int = 0
    eptp_index: int = 0

    def pack(self) -> bytes:
        """The 0x28 bytes of `struct vmx_ve_information` (padding zero)."""
        _check("exit_reason", self.exit_reason, 32)
        _check("busy", self.busy, 32)
        _check("qualification", self.qualification, 64)
        _check("guest_linear", self.guest_linear, 64)
        _check("guest_physical", self.guest_physical, 64)
        _check("eptp_index", self.eptp_index, 16)
        return struct.pack(_VE_INFO_FORMAT, self.exit_reason, self.busy, self.qualification,
                           self.guest_linear, self.guest_physical, self.eptp_index)

    @classmethod
    def unpack(cls, raw: bytes) -> VeInfo:
        """Decode the architectural 0x22 bytes (anything after them is ignored)."""
        if len(raw) < VE_INFO_ARCH_SIZE:
            raise ValueError(f"VE-information area needs {VE_INFO_ARCH_SIZE:#x} bytes, got {len(raw):#x}")
        reason, busy, qual, gla, gpa, index = struct.unpack_from("<IIQQQH", raw)
        return cls(exit_reason=reason, busy=busy, qualification=qual, guest_linear=gla,
                   guest_physical=gpa, eptp_index=index)


class EptQual(IntFlag):
    """Exit qualification for EPT violations (SDM 3C "Exit Qualification for EPT
    Violations" table). Bits 3-5 are the AND of bits 0-2 over the EPT paging-structure
    entries used for the guest-physical address (0 if the walk stopped at a not-present
    entry); with mode-based execute control bit 5 is the supervisor-execute right and
    bit 6 the user-execute right, otherwise bit 6 is cleared. Bit 8 is defined only when
    bit 7 is set, and is cleared otherwise."""

    READ = 1 << 0  # the access was a data read
    WRITE = 1 << 1  # the access was a data write
    FETCH = 1 << 2  # the access was an instruction fetch
    READABLE = 1 << 3
    WRITABLE = 1 << 4
    EXECUTABLE = 1 << 5
    GLA_VALID = 1 << 7  # the guest-linear-address field is valid
    FINAL_TRANSLATION = 1 << 8  # 1: the final translation; 0: a guest paging-structure entry
    NMI_UNBLOCKED_BY_IRET = 1 << 12


# decode_qualification's keys, the same names as ept_qualification's parameters.
_QUAL_FIELDS = (
    ("read", EptQual.READ),
    ("write", EptQual.WRITE),
    ("fetch", EptQual.FETCH),
    ("readable", EptQual.READABLE),
    ("writable", EptQual.WRITABLE),
    ("executable", EptQual.EXECUTABLE),
    ("gla_valid", EptQual.GLA_VALID),
    ("final_translation", EptQual.FINAL_TRANSLATION),
    ("nmi_unblocked_by_iret", EptQual.NMI_UNBLOCKED_BY_IRET),
)


def ept_qualification(*, read: bool, write: bool, fetch: bool, readable: bool, writable: bool,
                      executable: bool, gla_valid: bool, final_translation: bool,
                      nmi_unblocked_by_iret: bool) -> int:
    """The exit qualification of an EPT violation (also offset 8 of the VE-information
    area). `final_translation` is dropped when `gla_valid` is False (bit 8 is reserved,
    cleared, when bit 7 is 0). A read-modify-write sets `write` and may set `read`; the
    SDM leaves that to the implementation, so no combination is refused."""
    flags = {
        "read": read, "write": write, "fetch": fetch, "readable": readable,
        "writable": writable, "executable": executable, "gla_valid": gla_valid,
        "final_translation": final_translation and gla_valid,
        "nmi_unblocked_by_iret": nmi_unblocked_by_iret,
    }
    qual = 0
    for name, bit in _QUAL_FIELDS:
        if flags[name]:
            qual |= int(bit)
    return qual


def decode_qualification(qual: int) -> dict[str, bool]:
    """The named bits of an EPT-violation qualification (keys as `ept_qualification`'s
    parameters, so `ept_qualification(**decode_qualification(q)) == q` for any q it
    produced)."""
    return {name: bool(qual & bit) for name, bit in _QUAL_FIELDS}


# The reasons `convert_to_ve` gives, in the order it checks them.
WHY_NOT_ENABLED = "#VE not enabled"
WHY_SUPPRESSED = "suppress-#VE bit set"
WHY_REAL_MODE = "CR0.PE=0"
WHY_DELIVERY = "during event delivery"


def convert_to_ve(*, ve_enabled: bool, suppress_ve: bool, busy: int, during_delivery: bool,
                  cr0_pe: bool = True) -> tuple[bool, str]:
    """Does this EPT violation become a #VE? (SDM 3C "EPT Violations" and "Convertible EPT
    Violations"; Bochs vmexit.cc `Virtualization_Exception`). Returns (True, "") or (False,
    why not).

    Checked in this order, first failure wins:
      1. the "EPT-violation #VE" control is 1            else "#VE not enabled"
      2. the counted entry's bit 63 is 0                  else "suppress-#VE bit set"
         (1 and 2 together: the violation is *convertible*)
      3. CR0.PE = 1                                       else "CR0.PE=0"
      4. not in the middle of delivering an event         else "during event delivery"
         through the IDT
      5. the dword at offset 4 of the area is 0           else "busy word is <value>"
    `busy` is that dword; any nonzero value blocks, not only 0xFFFFFFFF. (The CET
    condition, a shadow stack made "prematurely busy", is not modelled.)"""
    _check("busy", busy, 32)
    if not ve_enabled:
        return False, WHY_NOT_ENABLED
    if suppress_ve:
        return False, WHY_SUPPRESSED
    if not cr0_pe:
        return False, WHY_REAL_MODE
    if during_delivery:
        return False, WHY_DELIVERY
    if busy != 0:
        return False, f"busy word is {busy:#x}"
    return True, ""
