"""An Intel VT-d remapping hardware unit at 0xFED90000, as QEMU's `-device
intel-iommu,intremap=on,eim=off` presents it on the q35 machine (Intel Virtualization
Technology for Directed I/O Architecture Specification, revision 3.x: "Register
Descriptions", "DMA Remapping", "Interrupt Remapping", "Invalidation"; section titles
below are its own). A standalone model: pure, deterministic, no engine. It reaches
guest memory and the local APIC through a `VtdHost`; the tables it walks are
cpu/devices/vtd_tables.py.

Capabilities ("Capability Register", "Extended Capability Register")
---------------------------------------------------------------------
The values QEMU 7.2 reports for that configuration (hw/i386/intel_iommu.c vtd_init):

    VER   0x10                major 1, minor 0
    CAP   0x00D2008C22260206  ND 6 (16-bit domain IDs), SAGAW 00010b (39-bit, 3-level
                              tables), MGAW 38 (39 bits), FRO 0x22 (the fault
                              recording register at 0x220), SLLPS 0011b (2 MiB and
                              1 GiB pages), PSI, NFR 0 (one fault recording
                              register), MAMV 18, DWD, DRD; no RWBF, AFL, PLMR, PHMR, CM
    ECAP  0x0000000000F00F4A  QI, IR, PT (pass-through), IRO 0xF (IVA at 0xF0, IOTLB
                              at 0xF8), MHMV 15; no EIM (xAPIC mode only), DT, SC, PI,
                              scalable mode

Registers and access ("Register Descriptions"): 32-bit registers take aligned 4-byte
accesses, 64-bit ones aligned 8-byte accesses or either 4-byte half. Offsets that hold
no register of this unit (reserved, or registers of capabilities it does not report:
PMR bases and limits, MTRRs, page requests) raise `VtdUnsupported`, as do other access
widths.

Global command and status ("Global Command Register", "Global Status Register")
------------------------------------------------------------------------------
GCMD reads 0. A write is compared with GSTS: the persistent controls — TE (bit 31,
DMA remapping), QIE (26, queued invalidation), IRE (25, interrupt remapping), CFI (23,
compatibility-format interrupts) — change their status bits (TES, QIES, IRES, CFIS)
where the written value differs; the one-shot commands take effect when written as 1:
SRTP (30) latches RTADDR as the root table and sets RTPS, SIRTP (24) latches IRTA as
the interrupt remapping table and sets IRTPS. Every command completes within the write,
so a status bit software polls is already set when it first reads GSTS. The
specification asks software to change one control per write; software that writes
`GSTS | command` (kvm-unit-tests' vtd_gcmd_or) also re-issues the one-shot commands
whose status bits are set: each is performed again (the same latch), as QEMU does.
WBF (27) is ignored: this unit has no write buffer to flush (RWBF = 0). SFL and EAFL
(advanced fault logging, AFL = 0), IRE before an interrupt remapping table was
latched, and enabling QIE while IQT is not 0 ("software must write IQT with 0 before
enabling") are not modelled (`VtdUnsupported`).
Disabling QIE resets IQH to 0 ("Invalidation Queue Head Register": hardware resets it
when queued invalidation is disabled).

Invalidation ("Invalidation", "Queued Invalidation Interface")
-------------------------------------------------------------
This unit caches nothing: every DMA request walks the root, context and page tables
and every interrupt reads its IRTE from memory, so every invalidation completes at
once with nothing to drop (the architecture lets hardware cache less than permitted;
software that forgets an invalidation works here and may not on hardware).

* Register-based: a write with ICC (CCMD bit 63) or IVT (IOTLB bit 63) set completes
  at once: the bit clears and the actual granularity (CAIG, IAIG) reads the requested
  one. Granularity 00b is reserved (`VtdUnsupported`), as is register-based
  invalidation while queued invalidation is enabled ("software must not ...").
* Queued: the queue is 2^QS pages of 16-byte descriptors at IQA; writing IQT while
  QIES = 1 processes every descriptor from IQH up to IQT, advancing IQH. Descriptor
  types ("Invalidation Descriptors"): context-cache (1h), IOTLB (2h), interrupt entry
  cache (4h), invalidation wait (5h). A wait descriptor with SW writes its status data
  (bits 63:32) to the status address (upper half, bits 63:2); with IF it sets ICS.IWC
  and signals an invalidation event (below). Any other type (device-TLB, PASID-based:
  not reported in ECAP), granularity 00b, set reserved bits, a descriptor outside
  memory or IQT beyond the queue set FSTS.IQE and stop processing with IQH at the
  offending descriptor, until software clears IQE.

Faults ("Fault Logging", "Fault Status Register", "Fault Recording Registers")
-----------------------------------------------------------------------------
A blocked DMA or interrupt request whose recording FPD does not suppress is recorded
in the one fault recording register: FI (bits 63:12, the page of the faulting address;
for interrupt requests bits 63:48 hold the interrupt index), SID (79:64), FR (103:96,
the reason), T (126: 1 read, 0 write) and F (127). If F is already set the fault is
lost and FSTS.PFO is set. FSTS.PPF reads whether F is set; FRI is 0; PFO and IQE are
write-1-to-clear, as is F.

Events: when a fault is recorded, PFO or IQE set while none of PPF, PFO and IQE was,
a fault event is signalled: with FECTL.IM clear, an interrupt message (FEADDR, FEDATA)
goes to the local APIC; with IM set, FECTL.IP is set and the message is sent when
software clears IM, or forgotten (IP clears) when software clears the status first.
Invalidation events (ICS.IWC set by a wait descriptor whose IWC was clear) work the
same way with IECTL, IEADDR and IEDATA. The unit's own messages are not remapped.

Interrupt remapping ("Interrupt Remapping")
------------------------------------------
With IRES clear every interrupt request passes as it is (compatibility format). With
IRES set, a compatibility-format request (address bit 4 clear) passes only with CFIS
set and is blocked otherwise (fault 25h); a remappable-format one is looked up in the
latched table (cpu/devices/vtd_tables.py) and delivered as its IRTE says, or blocked.

DMA remapping: with TES clear a request's address is used as it is; with TES set it is
translated through the latched root table, page by page.

All mutable state is in one `VtdState` (checkpoints copy the unit whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cpu.devices.vtd_tables import (
    IR_COMPAT_BLOCKED,
    DmaTranslation,
    RemapFault,
    RemappedInterrupt,
    remap_interrupt,
    remappable_index,
    translate,
)
from cpu.errors import Unsupported

VTD_BASE = 0xFED90000
VTD_SIZE = 0x1000

VERSION = 0x10
CAP = 0x00D2008C22260206
ECAP = 0x0000000000F00F4A
CAP_SAGAW_39 = 0x2 << 8
CAP_SLLPS = 0b11 << 34
ECAP_QI = 1 << 1
ECAP_IR = 1 << 3
ECAP_PT = 1 << 6

# Register offsets ("Register Descriptions").
VER_REG = 0x00
CAP_REG = 0x08
ECAP_REG = 0x10
GCMD_REG = 0x18
GSTS_REG = 0x1C
RTADDR_REG = 0x20
CCMD_REG = 0x28
FSTS_REG = 0x34
FECTL_REG = 0x38
FEDATA_REG = 0x3C
FEADDR_REG = 0x40
FEUADDR_REG = 0x44
AFLOG_REG = 0x58
PMEN_REG = 0x64
IQH_REG = 0x80
IQT_REG = 0x88
IQA_REG = 0x90
ICS_REG = 0x9C
IECTL_REG = 0xA0
IEDATA_REG = 0xA4
IEADDR_REG = 0xA8
IEUADDR_REG = 0xAC
IRTA_REG = 0xB8
IVA_REG = 0xF0
IOTLB_REG = 0xF8
FRCD_REG = 0x220

REG32 = {VER_REG: "VER", GCMD_REG: "GCMD", GSTS_REG: "GSTS", FSTS_REG: "FSTS",
         FECTL_REG: "FECTL", FEDATA_REG: "FEDATA", FEADDR_REG: "FEADDR",
         FEUADDR_REG: "FEUADDR", PMEN_REG: "PMEN", ICS_REG: "ICS", IECTL_REG: "IECTL",
         IEDATA_REG: "IEDATA", IEADDR_REG: "IEADDR", IEUADDR_REG: "IEUADDR"}
REG64 = {CAP_REG: "CAP", ECAP_REG: "ECAP", RTADDR_REG: "RTADDR", CCMD_REG: "CCMD",
         AFLOG_REG: "AFLOG", IQH_REG: "IQH", IQT_REG: "IQT", IQA_REG: "IQA",
         IRTA_REG: "IRTA", IVA_REG: "IVA", IOTLB_REG: "IOTLB", FRCD_REG: "FRCD (low)",
         FRCD_REG + 8: "FRCD (high)"}

# GCMD / GSTS bits.
TE = 1 << 31
SRTP = 1 << 30
SFL = 1 << 29
EAFL = 1 << 28
WBF = 1 << 27
QIE = 1 << 26
IRE = 1 << 25
SIRTP = 1 << 24
CFI = 1 << 23
PERSISTENT = TE | QIE | IRE | CFI
RTPS, IRTPS = SRTP, SIRTP   # the status bits sit where their commands do

# FSTS.
FSTS_PFO = 1 << 0
FSTS_PPF = 1 << 1
FSTS_IQE = 1 << 4
FSTS_RW1C = FSTS_PFO | FSTS_IQE
# FECTL / IECTL.
IM = 1 << 31
IP = 1 << 30
ICS_IWC = 1 << 0

ICC = IVT = 1 << 63
CCMD_WRITABLE = 0xE0000003FFFFFFFF
IOTLB_WRITABLE = 0xB003FFFF00000000
IVA_WRITABLE = 0xFFFFFFFFFFFFF07F
RTADDR_TTM = 0b11 << 10
IQA_DW = 1 << 11
IRTA_EIME = 1 << 11
IQT_MASK = 0x7FFF0
FRCD_F = 1 << 63
FRCD_T = 1 << 62

# Invalidation descriptor types and their defined bits (lower, upper quadword).
DESC_CONTEXT = 0x1
DESC_IOTLB = 0x2
DESC_IEC = 0x4
DESC_WAIT = 0x5
DESC_NAMES = {DESC_CONTEXT: "context-cache", DESC_IOTLB: "IOTLB", DESC_IEC: "interrupt entry cache",
              DESC_WAIT: "invalidation wait"}
DESC_DEFINED = {
    DESC_CONTEXT: (0x0003FFFFFFFF003F, 0),                   # G 5:4, DID, SID, FM
    DESC_IOTLB: (0x00000000FFFF00FF, 0xFFFFFFFFFFFFF07F),   # G, DW, DR, DID; ADDR, IH, AM
    DESC_IEC: (0x0000FFFFF800001F, 0),                       # G bit 4, IM 31:27, IIDX
    DESC_WAIT: (0xFFFFFFFF000000FF, 0xFFFFFFFFFFFFFFFC),     # IF, SW, FN, PD, data; address
}
WAIT_IF = 1 << 4
WAIT_SW = 1 << 5
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


class VtdUnsupported(Unsupported):
    """A VT-d behaviour idtlab does not model; the message names it."""


class VtdHost(Protocol):
    """What the unit reaches outside itself: guest-physical memory (None / False
    outside RAM), the local APIC for its own event messages, and the trace."""

    def read_memory(self, address: int, size: int) -> bytes | None: ...

    def write_memory(self, address: int, data: bytes) -> bool: ...

    def event_message(self, kind: str, address: int, data: int) -> None: ...

    def record(self, kind: str, **fields: Any) -> None: ...


@dataclass
class VtdState:
    """Everything about the unit that changes."""

    gsts: int = 0
    rtaddr: int = 0
    root: int = 0             # latched by SRTP
    ccmd: int = 0
    fsts: int = 0             # PFO and IQE (PPF is computed from the record)
    fectl: int = IM           # reset: masked
    fedata: int = 0
    feaddr: int = 0
    iqh: int = 0
    iqt: int = 0
    iqa: int = 0
    ics: int = 0
    iectl: int = IM
    iedata: int = 0
    ieaddr: int = 0
    irta: int = 0
    irt: int = 0              # latched by SIRTP (address | S)
    iva: int = 0
    iotlb: int = 0
    frcd_lo: int = 0
    frcd_hi: int = 0


@dataclass(frozen=True)
class Passed:
    """An interrupt request that passes in compatibility format (IR off, or CFIS)."""

    address: int
    data: int


class IntelIommu:
    """One remapping unit (see the module docstring)."""

    def __init__(self, host: VtdHost) -> None:
        self.host = host
        self.state = VtdState()

    # ----- MMIO ------------------------------------------------------------------------------

    def read(self, offset: int, size: int, now: int = 0) -> int:
        """A load of `size` bytes at `offset` in the register page."""
        del now
        if size == 8 and offset in REG64:
            return self._read64(offset)
        if size == 4 and offset in REG32:
            return self._read32(offset)
        if size == 4 and offset & ~7 in REG64:
            return self._read64(offset & ~7) >> (32 if offset & 4 else 0) & U32
        raise VtdUnsupported(self._bad(offset, size, "read"))

    def write(self, offset: int, size: int, value: int, now: int = 0) -> None:
        """A store of `size` bytes at `offset` in the register page."""
        del now
        if size == 8 and offset in REG64:
            self._write64(offset, value & U64, low=True, high=True)
        elif size == 4 and offset in REG32:
            self._write32(offset, value & U32)
        elif size == 4 and offset & ~7 in REG64:
            reg = offset & ~7
            old = self._read64(reg)
            high = bool(offset & 4)
            merged = (old & U32) | (value & U32) << 32 if high else (old & ~U32) | (value & U32)
            self._write64(reg, merged, low=not high, high=high)
        else:
            raise VtdUnsupported(self._bad(offset, size, "write"))

    @staticmethod
    def _bad(offset: int, size: int, what: str) -> str:
        name = REG32.get(offset) or REG64.get(offset & ~7)
        if name is not None:
            return (f"VT-d: {size}-byte {what} of {name} at offset {offset:#x}: only aligned "
                    "4-byte accesses (and 8-byte ones of 64-bit registers) are defined")
        return (f"VT-d: {size}-byte {what} at offset {offset:#x}: no register of this unit is "
                "there (reserved, or a capability it does not report)")

    def _read32(self, offset: int) -> int:
        s = self.state
        match offset:
            case 0x00:
                return VERSION
            case 0x1C:
                return s.gsts
            case 0x34:
                return s.fsts | (FSTS_PPF if s.frcd_hi & FRCD_F else 0)
            case 0x38:
                return s.fectl
            case 0x3C:
                return s.fedata
            case 0x40:
                return s.feaddr
            case 0x9C:
                return s.ics
            case 0xA0:
                return s.iectl
            case 0xA4:
                return s.iedata
            case 0xA8:
                return s.ieaddr
            case _:
                return 0  # GCMD (write-only), FEUADDR, IEUADDR (no EIM), PMEN (no PMRs)

    def _read64(self, offset: int) -> int:
        s = self.state
        return {CAP_REG: CAP, ECAP_REG: ECAP, RTADDR_REG: s.rtaddr, CCMD_REG: s.ccmd,
                AFLOG_REG: 0, IQH_REG: s.iqh, IQT_REG: s.iqt, IQA_REG: s.iqa,
                IRTA_REG: s.irta, IVA_REG: s.iva, IOTLB_REG: s.iotlb, FRCD_REG: s.frcd_lo,
                FRCD_REG + 8: s.frcd_hi}[offset]

    def _write32(self, offset: int, value: int) -> None:
        s = self.state
        match offset:
            case 0x18:
                self._command(value)
            case 0x34:
                s.fsts &= ~(value & FSTS_RW1C)
                self._status_cleared()
                if value & FSTS_IQE:
                    self._process_queue()  # processing resumes where it stopped
            case 0x38:
                s.fectl = self._control(s.fectl, value, "fault", s.feaddr, s.fedata)
            case 0x3C:
                s.fedata = value & 0xFFFF
            case 0x40:
                s.feaddr = value & 0xFFFFFFFC
            case 0x9C:
                s.ics &= ~(value & ICS_IWC)
                if not s.ics & ICS_IWC:
                    s.iectl &= ~IP
            case 0xA0:
                s.iectl = self._control(s.iectl, value, "invalidation", s.ieaddr, s.iedata)
            case 0xA4:
                s.iedata = value & 0xFFFF
            case 0xA8:
                s.ieaddr = value & 0xFFFFFFFC
            case _:
                pass  # VER, GSTS: read-only; FEUADDR, IEUADDR, PMEN: RsvdZ / read-only here

    def _write64(self, offset: int, value: int, *, low: bool, high: bool) -> None:
        s = self.state
        match offset:
            case 0x20:
                if value & RTADDR_TTM:
                    raise VtdUnsupported(f"VT-d: RTADDR.TTM = {value >> 10 & 3:02b}b: only "
                                         "legacy-mode tables (00b) are modelled (ECAP.SMTS = 0)")
                s.rtaddr = value & ~0xFFF
            case 0x28:
                s.ccmd = (s.ccmd & ~CCMD_WRITABLE) | (value & CCMD_WRITABLE)
                if high and s.ccmd & ICC:
                    granularity = s.ccmd >> 61 & 3
                    self._register_invalidation("CCMD", granularity)
                    s.ccmd = (s.ccmd & ~(ICC | 3 << 59)) | granularity << 59
                    self.host.record("vtd_invalidate", via="register", what="context-cache",
                                     granularity=granularity)
            case 0x88:
                s.iqt = value & IQT_MASK
                if low:
                    self._process_queue()
            case 0x90:
                if s.gsts & QIE:
                    raise VtdUnsupported("VT-d: IQA written while queued invalidation is "
                                         "enabled (the specification forbids it)")
                if value & IQA_DW:
                    raise VtdUnsupported("VT-d: IQA.DW = 1 (256-bit descriptors need scalable "
                                         "mode, ECAP.SMTS = 0)")
                s.iqa = value & 0xFFFFFFFFFFFFF007
            case 0xB8:
                if value & IRTA_EIME:
                    raise VtdUnsupported("VT-d: IRTA.EIME = 1: x2APIC mode is not modelled "
                                         "(ECAP.EIM = 0)")
                s.irta = value & 0xFFFFFFFFFFFFF00F
            case 0xF0:
                s.iva = value & IVA_WRITABLE
            case 0xF8:
                s.iotlb = (s.iotlb & ~IOTLB_WRITABLE) | (value & IOTLB_WRITABLE)
                if high and s.iotlb & IVT:
                    granularity = s.iotlb >> 60 & 3
                    self._register_invalidation("IOTLB", granularity)
                    s.iotlb = (s.iotlb & ~(IVT | 3 << 57)) | granularity << 57
                    self.host.record("vtd_invalidate", via="register", what="IOTLB",
                                     granularity=granularity)
            case 0x228:
                if value & FRCD_F:
                    s.frcd_hi &= ~FRCD_F
                    self._status_cleared()
            case _:
                pass  # CAP, ECAP, IQH, FRCD (low): read-only; AFLOG: RsvdZ (AFL = 0)

    def _register_invalidation(self, name: str, granularity: int) -> None:
        if self.state.gsts & QIE:
            raise VtdUnsupported(f"VT-d: register-based invalidation through {name} while queued "
                                 "invalidation is enabled (the specification forbids it)")
        if granularity == 0:
            raise VtdUnsupported(f"VT-d: {name} invalidation with granularity 00b (reserved)")

    # ----- global command ----------------------------------------------------------------------

    def _command(self, value: int) -> None:
        s = self.state
        if value & (SFL | EAFL):
            raise VtdUnsupported("VT-d: GCMD.SFL/EAFL: advanced fault logging is not reported "
                                 "(CAP.AFL = 0)")
        if value & 0x7FFFFF:
            raise VtdUnsupported(f"VT-d: GCMD bits 22:0 are reserved (wrote {value:#x})")
        if value & SRTP:
            s.root = s.rtaddr
            s.gsts |= RTPS
        if value & SIRTP:
            s.irt = s.irta
            s.gsts |= IRTPS
        changed = (value ^ s.gsts) & PERSISTENT
        if changed & QIE:
            if value & QIE:
                if s.iqt:
                    raise VtdUnsupported("VT-d: GCMD.QIE with IQT != 0 (software must write IQT "
                                         "with 0 before enabling queued invalidation)")
                s.gsts |= QIE
            else:
                s.gsts &= ~QIE
                s.iqh = 0
        if changed & IRE and value & IRE and not s.gsts & IRTPS:
            raise VtdUnsupported("VT-d: GCMD.IRE before an interrupt remapping table pointer was "
                                 "latched (GSTS.IRTPS = 0)")
        s.gsts = (s.gsts & ~(changed & (TE | IRE | CFI))) | (value & changed & (TE | IRE | CFI))
        self.host.record("vtd_command", gcmd=value, gsts=s.gsts)

    # ----- events ------------------------------------------------------------------------------

    def _control(self, control: int, value: int, kind: str, address: int, data: int) -> int:
        """A write to FECTL or IECTL: IM is writable; unmasking with IP set sends."""
        new = (control & ~IM) | (value & IM)
        if not new & IM and new & IP:
            self.host.event_message(kind, address, data)
            new &= ~IP
        return new

    def _event(self, kind: str) -> None:
        s = self.state
        if kind == "fault":
            if s.fectl & IM:
                s.fectl |= IP
            else:
                self.host.event_message("fault", s.feaddr, s.fedata)
        elif s.iectl & IM:
            s.iectl |= IP
        else:
            self.host.event_message("invalidation", s.ieaddr, s.iedata)

    def _fault_status(self) -> int:
        return self._read32(FSTS_REG) & (FSTS_PFO | FSTS_PPF | FSTS_IQE)

    def _status_cleared(self) -> None:
        if not self._fault_status():
            self.state.fectl &= ~IP  # the condition went away before the message was sent

    def _record(self, source_id: int, reason: int, info: int, *, read: bool, detail: str) -> None:
        """Record a fault (see "Faults" in the module docstring)."""
        s = self.state
        quiet = not self._fault_status()
        if s.frcd_hi & FRCD_F:
            s.fsts |= FSTS_PFO
            self.host.record("vtd_fault", reason=reason, sid=source_id, info=info, lost=True,
                             detail=detail)
        else:
            s.frcd_lo = info & ~0xFFF
            s.frcd_hi = FRCD_F | (FRCD_T if read else 0) | reason << 32 | source_id & 0xFFFF
            self.host.record("vtd_fault", reason=reason, sid=source_id, info=info, detail=detail)
        if quiet:
            self._event("fault")

    def _queue_error(self, detail: str) -> None:
        s = self.state
        quiet = not self._fault_status()
        s.fsts |= FSTS_IQE
        self.host.record("vtd_queue_error", iqh=s.iqh, detail=detail)
        if quiet:
            self._event("fault")

    # ----- queued invalidation -----------------------------------------------------------------

    def _process_queue(self) -> None:
        s = self.state
        if not s.gsts & QIE or s.fsts & FSTS_IQE:
            return
        base = s.iqa & ~0xFFF
        entries = 256 << (s.iqa & 7)
        tail = s.iqt >> 4
        if tail >= entries:
            self._queue_error(f"IQT {tail} beyond the queue's {entries} descriptors")
            return
        head = s.iqh >> 4
        while head != tail:
            raw = self.host.read_memory(base + 16 * head, 16)
            if raw is None:
                self._queue_error(f"descriptor {head} at {base + 16 * head:#x} is outside memory")
                return
            lo, hi = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
            problem = self._descriptor(lo, hi)
            if problem is not None:
                self._queue_error(f"descriptor {head} ({hi:#018x}:{lo:#018x}): {problem}")
                return
            head = (head + 1) % entries
            s.iqh = head << 4

    def _descriptor(self, lo: int, hi: int) -> str | None:
        """Carry out one invalidation descriptor; what is wrong with it, or None."""
        kind = (lo & 0xF) | (lo >> 9 & 0x7) << 4
        defined = DESC_DEFINED.get(kind)
        if defined is None:
            return f"type {kind:#x} is not supported by this unit"
        if lo & ~defined[0] or hi & ~defined[1]:
            return f"{DESC_NAMES[kind]} descriptor with reserved bits set"
        name = DESC_NAMES[kind]
        if kind in (DESC_CONTEXT, DESC_IOTLB) and not lo >> 4 & 3:
            return f"{name} descriptor with granularity 00b (reserved)"
        if kind == DESC_WAIT:
            if lo & WAIT_SW:
                address = hi & ~3
                if not self.host.write_memory(address, (lo >> 32).to_bytes(4, "little")):
                    raise VtdUnsupported(f"VT-d: invalidation wait status write to {address:#x}, "
                                         "outside memory")
            if lo & WAIT_IF and not self.state.ics & ICS_IWC:
                self.state.ics |= ICS_IWC
                self._event("invalidation")
            self.host.record("vtd_invalidate", via="queue", what=name, status_write=bool(lo & WAIT_SW),
                             data=lo >> 32, address=hi & ~3)
        else:
            self.host.record("vtd_invalidate", via="queue", what=name,
                             granularity=lo >> 4 & (1 if kind == DESC_IEC else 3))
        return None

    # ----- requests ----------------------------------------------------------------------------

    def dma(self, source_id: int, address: int, size: int, *, write: bool) -> list[tuple[int, int]]:
        """A DMA request of `size` bytes at bus address `address`: the pieces of guest
        memory it reaches, (address, length) in order, up to the first blocked page (the
        fault then recorded)."""
        s = self.state
        if not s.gsts & TE:
            return [(address, size)]
        pieces: list[tuple[int, int]] = []
        done = 0
        while done < size:
            iova = address + done
            try:
                t: DmaTranslation = translate(self.host.read_memory, s.root, source_id, iova,
                                              write=write)
            except RemapFault as fault:
                if not fault.suppressed:
                    self._record(source_id, fault.reason, iova, read=not write, detail=fault.detail)
                else:
                    self.host.record("vtd_fault", reason=fault.reason, sid=source_id, info=iova,
                                     suppressed=True, detail=fault.detail)
                break
            n = min(size - done, t.page_size - (t.address & (t.page_size - 1)))
            pieces.append((t.address, n))
            done += n
        return pieces

    def interrupt(self, address: int, data: int, source_id: int, *,
                  validate: bool = True) -> Passed | RemappedInterrupt | None:
        """An interrupt request (a write of `data` to `address` in 0xFEExxxxx) from
        `source_id` (recorded with a fault; checked against the IRTE unless `validate`
        is False): passed on as it is, remapped, or None when blocked (the fault
        recorded)."""
        s = self.state
        if not s.gsts & IRE:
            return Passed(address, data)
        sid = source_id
        if not address & 1 << 4:
            if s.gsts & CFI:
                return Passed(address, data)
            self._record(sid, IR_COMPAT_BLOCKED, 0, read=False, detail="compatibility-format "
                         "interrupt while interrupt remapping is enabled and GSTS.CFIS = 0")
            return None
        index = 0
        try:
            index = remappable_index(address, data)
            return remap_interrupt(self.host.read_memory, s.irt & ~0xFFF, s.irt & 0xF, index,
                                   source_id if validate else None)
        except RemapFault as fault:
            if not fault.suppressed:
                self._record(sid, fault.reason, index << 48, read=False, detail=fault.detail)
            else:
                self.host.record("vtd_fault", reason=fault.reason, sid=sid, info=index << 48,
                                 suppressed=True, detail=fault.detail)
            return None
