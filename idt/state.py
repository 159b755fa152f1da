"""The abstract CPU state the delivery model reads and writes.

`ArchState` is a plain snapshot of what delivery and IRET need; the machine fills it
from the engine and applies the result back. Guest memory is reached only through
`SystemMemory`, whose accesses translate through guest paging and may raise
`ArchFault` (a #PF with CR2, or #GP/#SS for non-canonical addresses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from idt.vectors import VECTOR_INFO, Kind, vector_name

RFLAGS_CF = 1 << 0
RFLAGS_FIXED1 = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_IOPL = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
RFLAGS_VIF = 1 << 19
RFLAGS_VIP = 1 << 20
RFLAGS_ID = 1 << 21


def is_canonical(addr: int) -> bool:
    """48-bit canonical form: bits 63:47 all equal (4-level paging)."""
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1


def is_canonical_range(start: int, size: int) -> bool:
    """Every byte of the `size`-byte access at `start` is canonical (SDM Vol. 1
    "Canonical Addressing": the check is on the linear address of each byte, before
    paging, so an access that straddles 0x800000000000 is #GP/#SS even when its first
    page would page-fault). The non-canonical hole is far wider than any access, so the
    first and the last byte decide."""
    return is_canonical(start) and is_canonical((start + size - 1) & (2**64 - 1))


class Source(Enum):
    """Where an event comes from; decides EXT, the DPL check and the error code."""

    EXCEPTION = "exception"  # processor-detected exception
    SOFTWARE = "software"  # INT n, INT3, INTO: gate DPL checked, EXT=0, no error code
    PRIV_SOFTWARE = "priv-software"  # INT1/ICEBP: no DPL check, EXT=1 (Bochs), trap
    NMI = "nmi"
    INTERRUPT = "interrupt"  # external (APIC/INTR)

    @property
    def trace_name(self) -> str:
        # INT1 is reported as a software event in the trace ("source" contract).
        return "software" if self is Source.PRIV_SOFTWARE else self.value


@dataclass(frozen=True)
class Event:
    """One event to deliver through the IDT.

    `return_rip` is what gets pushed; `insn_rip` is the address of the instruction that
    caused the event (for faults the same; for INT n the INT itself), which becomes the
    saved RIP of a fault raised *while delivering* this event (the INT is restarted).
    """

    vector: int
    source: Source
    return_rip: int
    insn_rip: int
    error_code: int | None = None
    cr2: int | None = None  # for #PF: the faulting linear address
    trap_like: bool = False  # for #DB: trap-class (RF pushed unchanged either way)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", int(self.vector))  # plain ints in traces

    @property
    def ext(self) -> bool:
        """SDM "Error Code": EXT=1 when the event is external to the program."""
        return self.source not in (Source.SOFTWARE,)

    @property
    def is_exception(self) -> bool:
        return self.source is Source.EXCEPTION

    @property
    def is_fault_class(self) -> bool:
        info = VECTOR_INFO.get(self.vector)
        return self.is_exception and info is not None and info.kind is Kind.FAULT and not (
            self.vector == 1 and self.trap_like
        )

    @property
    def name(self) -> str:
        return vector_name(self.vector)

    @staticmethod
    def exception(
        vector: int, rip: int, error_code: int | None = None, cr2: int | None = None
    ) -> Event:
        return Event(vector, Source.EXCEPTION, rip, rip, error_code, cr2)


class ArchFault(Exception):
    """An exception the architecture raises (during delivery, IRET, or a memory access)."""

    def __init__(self, vector: int, error_code: int | None = None, *, cr2: int | None = None,
                 why: str = "") -> None:
        self.vector = int(vector)
        self.error_code = error_code
        self.cr2 = cr2
        self.why = why
        ec = "" if error_code is None else f"({error_code:#x})"
        super().__init__(f"{vector_name(vector)}{ec}{': ' + why if why else ''}")


@dataclass(frozen=True)
class DataSegment:
    """What IRET needs of a data segment register's descriptor cache: the selector, and
    the DPL and type of the descriptor loaded with it (a code segment may be loaded into
    DS/ES/FS/GS when readable)."""

    selector: int
    dpl: int = 0
    is_code: bool = False
    conforming: bool = False


@dataclass
class ArchState:
    """The registers and internal bits that delivery and IRET read and write."""

    rip: int
    rsp: int
    rflags: int
    cs: int
    ss: int
    cpl: int
    idtr_base: int
    idtr_limit: int
    gdtr_base: int
    gdtr_limit: int
    tr_selector: int
    tr_base: int
    tr_limit: int
    cr2: int = 0
    nmi_blocked: bool = False
    extra: dict[str, int] = field(default_factory=dict)
    # "es", "ds", "fs", "gs" -> their descriptor caches, for IRET's outer-level rule
    # (idt.iret.segments_to_null); a register left out is never nulled.
    data_segments: Mapping[str, DataSegment] = field(default_factory=dict)


class SystemMemory(Protocol):
    """Linear-address access to guest memory through guest paging.

    `user` is the privilege of the access: implicit accesses (IDT/GDT/TSS reads, frame
    pushes) are supervisor accesses even when the event came from CPL3 (SDM "Access
    Rights"). `stack` marks SS-relative accesses, which raise #SS(0) instead of #GP(0)
    for a non-canonical address. Failures raise `ArchFault`.
    """

    def read(self, linear: int, size: int, *, user: bool = False, stack: bool = False) -> bytes:
        ...

    def write(self, linear: int, data: bytes, *, user: bool = False, stack: bool = False) -> None:
        ...
