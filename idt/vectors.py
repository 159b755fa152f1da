"""Vector numbers and the one table of per-vector architectural metadata.

Source: SDM Vol. 3A, "Exception and Interrupt Reference" (Table "Protected-Mode
Exceptions and Interrupts", 2016 numbering Table 6-1) and Table 6-4 "Interrupt and
Exception Classes" for the #DF classes. #VE (20) is in the page-fault class as the SDM
says (QEMU and KVM put it in benign: see docs/sdm-map.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum


class Vector(IntEnum):
    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    CSO = 9
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21

    def __repr__(self) -> str:
        return f"{vector_name(self.value)}({self.value})"

    __str__ = __repr__


class Kind(Enum):
    """How the saved RIP is chosen (SDM "Exception Classifications")."""

    FAULT = "fault"
    TRAP = "trap"
    ABORT = "abort"
    INTERRUPT = "interrupt"


class DFClass(Enum):
    """Classes of SDM Table 6-4, which drive the #DF matrix of Table 6-5."""

    BENIGN = "benign"
    CONTRIBUTORY = "contributory"
    PAGE_FAULT = "page-fault"


@dataclass(frozen=True)
class VectorInfo:
    mnemonic: str
    kind: Kind
    error_code: bool
    df_class: DFClass


_B, _C, _P = DFClass.BENIGN, DFClass.CONTRIBUTORY, DFClass.PAGE_FAULT
_F, _T, _A, _I = Kind.FAULT, Kind.TRAP, Kind.ABORT, Kind.INTERRUPT

VECTOR_INFO: dict[int, VectorInfo] = {
    0: VectorInfo("#DE", _F, False, _C),
    1: VectorInfo("#DB", _F, False, _B),  # fault or trap by cause; the event says which
    2: VectorInfo("NMI", _I, False, _B),
    3: VectorInfo("#BP", _T, False, _B),
    4: VectorInfo("#OF", _T, False, _B),
    5: VectorInfo("#BR", _F, False, _B),
    6: VectorInfo("#UD", _F, False, _B),
    7: VectorInfo("#NM", _F, False, _B),
    8: VectorInfo("#DF", _A, True, _B),
    9: VectorInfo("#CSO", _F, False, _B),
    10: VectorInfo("#TS", _F, True, _C),
    11: VectorInfo("#NP", _F, True, _C),
    12: VectorInfo("#SS", _F, True, _C),
    13: VectorInfo("#GP", _F, True, _C),
    14: VectorInfo("#PF", _F, True, _P),
    16: VectorInfo("#MF", _F, False, _B),
    17: VectorInfo("#AC", _F, True, _B),
    18: VectorInfo("#MC", _A, False, _B),
    19: VectorInfo("#XM", _F, False, _B),
    20: VectorInfo("#VE", _F, False, _P),
    21: VectorInfo("#CP", _F, True, _C),
}


def vector_name(vector: int) -> str:
    """`#PF` for architectural exceptions, `NMI`, else `vec 0x80`."""
    info = VECTOR_INFO.get(vector)
    if info is not None:
        return info.mnemonic
    return f"vec {vector:#04x}"


def df_class(vector: int) -> DFClass:
    info = VECTOR_INFO.get(vector)
    return info.df_class if info is not None else DFClass.BENIGN


def pushes_error_code(vector: int) -> bool:
    """True when a *hardware exception* on this vector pushes an error code (SDM Vol. 3A, "Error Code").

    INT n, external interrupts and NMI never push one, whatever the vector; the caller
    decides by the event's source.
    """
    info = VECTOR_INFO.get(vector)
    return info is not None and info.error_code


def parse_vector_name(text: str) -> int | None:
    """Inverse of `vector_name` for the architectural mnemonics ("#PF", "PF", "nmi")."""
    t = text.strip().upper().lstrip("#")
    if t.startswith("VEC "):
        try:
            v = int(t[4:], 0)
        except ValueError:
            return None
        return v if 0 <= v <= 255 else None
    for v, info in VECTOR_INFO.items():
        if info.mnemonic.lstrip("#").upper() == t:
            return v
    return None
