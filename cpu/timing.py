"""The cycle model: a cost profile (instruction classes and events -> cycles) and its loader.

What the model is
-----------------
A cycle-*approximate* cost sum. In fast mode every retired instruction costs the profile's
`cycles_per_instruction`. In timed mode each retired instruction is put in one *instruction
class* by `classify` (Capstone decode: mnemonic tables first, then instruction groups, then
operand access) and charged that class's cost; the machine adds event costs (delivery, IRET,
HLT wake-up, APIC access...) with `Profile.event`. Time is the sum, nothing else.

What it is not
--------------
Not a pipeline model: no overlap, no dependency chains, no ports, no branch prediction, no
caches or TLBs (every load is an L1 hit), no front end (`fetch_decode_penalty` is the only
knob), no frequency scaling. Costs do not depend on operand values (a DIV always costs the
same) and a REP string instruction is charged once each time the engine reports it (with
Unicorn 2.1.4: once per iteration plus once), so `string` is a per-element figure. Use it to
order events plausibly and to make races reachable, not to predict a machine's run time.

Where the figures come from
---------------------------
`cpu/profiles/default.toml`: every entry carries a `source` string: uops.info / Agner Fog
figures for Skylake for ordinary instructions, Linux commits (c198b121b1a1 "x86/asm: Rewrite
sync_core() to use IRET-to-self") and the lastweek/linux-xperf-4.19.44 measurements for the
event paths, and "estimate; calibrate" where no credible public figure exists (NMI and #VE
extras, MSR and APIC accesses...). No data table is copied from another project; individual
figures are cited where they are used.

Calibrating
-----------
Measure on your hardware (kvm-unit-tests `x86/vmexit.c`-style loops around the event, TSC
with fences), then write a profile file that names the built-in profile it refines and
overrides only what you measured; each entry still needs its source::

    [profile]
    base = "default"
    name = "my-box"
    [events]
    deliver_cpl_change = { cost = 612, source = "measured: i7-8650U, 1e6 #PF loops, median" }

and pass its path: `load_profile("my-box.toml")` (or `Machine(profile="my-box.toml")`). A
file without `base` must define every section, class and event. Unknown keys, missing or
negative costs and wrong types raise `ProfileError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import capstone
from capstone import x86_const as CX

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

INSTRUCTION_CLASSES: tuple[str, ...] = (
    "nop", "alu", "load", "store", "atomic", "fence", "branch", "mul", "div", "string",
    "serializing", "msr", "cr", "io", "interrupt_control", "event_instruction", "fp_simd",
    "pause", "system", "other",
)
"""Every class `classify` can return; a profile must cost each of them."""

EVENTS: tuple[str, ...] = (
    "deliver_same_cpl", "deliver_cpl_change", "nmi_extra", "iret_same_cpl", "iret_to_user",
    "hlt_wake", "apic_access", "ve_extra", "fetch_decode_penalty",
    "fred_deliver_same_level", "fred_deliver_switch", "erets", "eretu",
)
"""Every event the machine charges; a profile must cost each of them."""


class ProfileError(ValueError):
    """A cost profile that cannot be used. The one-line message names the file and the key."""


@dataclass(frozen=True)
class Cost:
    cost: int
    source: str


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    frequency_mhz: int
    cycles_per_instruction: int  # fast mode
    instructions: Mapping[str, Cost]  # timed mode, by instruction class
    events: Mapping[str, Cost]

    def event(self, name: str) -> int:
        """The cost in cycles of event `name` (one of `EVENTS`)."""
        try:
            return self.events[name].cost
        except KeyError:
            raise ProfileError(f"profile {self.name!r}: unknown event {name!r} "
                               f"(known events: {', '.join(sorted(self.events))})") from None


# -- loading -------------------------------------------------------------------------------

_SECTIONS = ("profile", "fast", "instructions", "events")
_PROFILE_KEYS = ("name", "description", "frequency_mhz", "base")
_FAST_KEYS = ("cycles_per_instruction", "source")
_ENTRY_KEYS = ("cost", "source")


def builtin_profiles() -> list[str]:
    """Names accepted by `load_profile` besides paths."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(source: str | Path = "default") -> Profile:
    """Load a built-in profile by name (`"default"`) or a profile file by path.

    A string is a path when it ends in `.toml` or contains a path separator. A profile
    is immutable, so one loaded before is handed out again while its file (and every
    file it is based on) is unchanged: every machine loads one, and parsing it was a
    fifth of building a machine."""
    path = _locate(source)
    key = _file_key(path)
    cached = _LOADED.get(path) if key is not None else None
    if cached is not None and cached[0] == key and all(
            _file_key(p) == k for p, k in cached[2]):
        return cached[1]
    profile = _load(path, ())
    if key is not None:
        bases = tuple((b, _file_key(b)) for b in _bases(path))
        _LOADED[path] = (key, profile, bases)
    return profile


# Profiles loaded, by path: (the file's identity, the profile, its bases' identities).
_LOADED: dict[Path, tuple[tuple[int, int], Profile, tuple[tuple[Path, tuple[int, int] | None],
                                                          ...]]] = {}


def _bases(path: Path) -> list[Path]:
    """The files a profile may be based on: the built-in profiles (`profile.base`)."""
    return sorted(p for p in PROFILE_DIR.glob("*.toml") if p != path)


def _file_key(path: Path) -> tuple[int, int] | None:
    """(modification time in ns, size) of a file, None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _locate(source: str | Path) -> Path:
    if isinstance(source, Path) or source.endswith(".toml") or "/" in source or "\\" in source:
        return Path(source)
    path = PROFILE_DIR / f"{source}.toml"
    if not path.is_file():
        raise ProfileError(f"unknown built-in profile {source!r} "
                           f"(built-in: {', '.join(builtin_profiles())}; or give a path to a .toml)")
    return path


def _load(path: Path, seen: tuple[Path, ...]) -> Profile:
    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read profile: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: invalid TOML: {exc}") from None
    return _Reader(where).profile(data, path, seen)


class _Reader:
    """Validates one parsed profile file; every error names the file and the dotted key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.where}: {key}: {problem}")

    def table(self, data: Mapping[str, Any], key: str, allowed: tuple[str, ...],
              what: str = "key") -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {_show(value)}")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}", f"unknown {what} (known: {', '.join(allowed)})")
        return value

    def integer(self, value: Any, key: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {_show(value)}")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {_show(value)}")
        return value

    def costs(self, data: Mapping[str, Any], section: str, known: tuple[str, ...], what: str,
              inherited: Mapping[str, Cost] | None) -> dict[str, Cost]:
        entries = self.table(data, section, known, what)
        out = dict(inherited or {})
        for name, entry in entries.items():
            key = f"{section}.{name}"
            if not isinstance(entry, dict):
                raise self.fail(key, f"must be a table {{ cost = ..., source = \"...\" }}, "
                                     f"got {_show(entry)}")
            for k in entry:
                if k not in _ENTRY_KEYS:
                    raise self.fail(f"{key}.{k}", "unknown key (known: cost, source)")
            for k in _ENTRY_KEYS:
                if k not in entry:
                    raise self.fail(key, f"missing {k!r}")
            out[name] = Cost(self.integer(entry["cost"], f"{key}.cost", 0),
                             self.text(entry["source"], f"{key}.source"))
        for name in known:
            if name not in out:
                raise self.fail(section, f"missing {what} {name!r}")
        return {name: out[name] for name in known}

    def profile(self, data: Mapping[str, Any], path: Path, seen: tuple[Path, ...]) -> Profile:
        for k in data:
            if k not in _SECTIONS:
                raise self.fail(k, f"unknown section (known: {', '.join(_SECTIONS)})")
        head = self.table(data, "profile", _PROFILE_KEYS)
        fast = self.table(data, "fast", _FAST_KEYS)
        base = self.base(head, path, seen)
        if base is None:
            for section in _SECTIONS:
                if section not in data:
                    raise self.fail(section, "missing section (or name a `base` profile under [profile])")

        def field(table: dict[str, Any], section: str, key: str, inherited: object) -> Any:
            if key in table:
                return table[key]
            if base is None:
                raise self.fail(section, f"missing {key!r}")
            return inherited

        # A refined profile is named after its file unless it says otherwise: reports must
        # not call a calibrated profile "default".
        name = self.text(field(head, "profile", "name", path.stem), "profile.name")
        description = self.text(field(head, "profile", "description",
                                      base.description if base else None), "profile.description")
        frequency = self.integer(field(head, "profile", "frequency_mhz",
                                       base.frequency_mhz if base else None),
                                 "profile.frequency_mhz", 1)
        cpi = self.integer(field(fast, "fast", "cycles_per_instruction",
                                 base.cycles_per_instruction if base else None),
                           "fast.cycles_per_instruction", 1)
        if "source" in fast or base is None:
            self.text(field(fast, "fast", "source", None), "fast.source")
        return Profile(
            name=name, description=description, frequency_mhz=frequency,
            cycles_per_instruction=cpi,
            instructions=MappingProxyType(self.costs(
                data, "instructions", INSTRUCTION_CLASSES, "instruction class",
                base.instructions if base else None)),
            events=MappingProxyType(self.costs(
                data, "events", EVENTS, "event", base.events if base else None)),
        )

    def base(self, head: dict[str, Any], path: Path, seen: tuple[Path, ...]) -> Profile | None:
        """The built-in profile named by `profile.base`, loaded, or None."""
        if "base" not in head:
            return None
        name = self.text(head["base"], "profile.base")
        if name not in builtin_profiles():
            raise self.fail("profile.base", f"unknown built-in profile {name!r} "
                                            f"(built-in: {', '.join(builtin_profiles())})")
        base_path = PROFILE_DIR / f"{name}.toml"
        chain = (*seen, path.resolve())
        if base_path.resolve() in chain:
            raise self.fail("profile.base", f"{name!r} refers back to this profile")
        return _load(base_path, chain)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# -- classification ------------------------------------------------------------------------

# Mnemonic tables come first: they name what groups and operands cannot tell apart (a DIV with
# a memory operand is a `div`, an OUT is `io`, CPUID has no group at all). Prefixes are
# stripped first ("rep movsq" -> "movsq", "lock add" -> "add" with the lock noted).
_BY_MNEMONIC: dict[str, str] = {
    **dict.fromkeys(("nop", "endbr64", "endbr32"), "nop"),
    "pause": "pause",
    **dict.fromkeys(("int", "int1", "int3", "into", "iret", "iretd", "iretq", "hlt", "syscall",
                     "sysret", "sysretq", "sysenter", "sysexit", "sysexitq", "ud0", "ud1", "ud2"),
                    "event_instruction"),
    # Serializing per the SDM ("Serializing Instructions"), except those with their own class
    # (WRMSR: msr, MOV to CR/DR: cr, IRET: event_instruction).
    **dict.fromkeys(("cpuid", "wbinvd", "wbnoinvd", "invd", "invlpg", "invlpga", "invpcid",
                     "invept", "invvpid", "lgdt", "lidt", "lldt", "ltr", "serialize", "rsm"),
                    "serializing"),
    **dict.fromkeys(("rdmsr", "wrmsr"), "msr"),
    **dict.fromkeys(("clts", "lmsw", "smsw"), "cr"),
    **dict.fromkeys(("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"), "io"),
    **dict.fromkeys(("cli", "sti", "pushf", "pushfd", "pushfq", "popf", "popfd", "popfq"),
                    "interrupt_control"),
    **dict.fromkeys(("mfence", "lfence", "sfence"), "fence"),
    **dict.fromkeys(("mul", "imul", "mulx"), "mul"),
    **dict.fromkeys(("div", "idiv"), "div"),
    **dict.fromkeys(("swapgs", "clac", "stac", "rdtsc", "rdtscp", "rdpmc", "rdrand", "rdseed",
                     "xgetbv", "xsetbv", "monitor", "mwait", "rdfsbase", "rdgsbase", "wrfsbase",
                     "wrgsbase"), "system"),
    # Implicit or mis-reported memory access (Capstone 5 reports MOVNTI's and CLFLUSH's
    # destination as read): named here rather than inferred from operands.
    **dict.fromkeys(("push", "enter", "movnti", "clflush", "clflushopt", "clwb", "cmpxchg",
                     "cmpxchg8b", "cmpxchg16b"), "store"),
    **dict.fromkeys(("pop", "leave", "xlatb", "prefetch", "prefetchw", "prefetcht0", "prefetcht1",
                     "prefetcht2", "prefetchnta"), "load"),
    # LEA computes an address and touches no memory; the rest have no explicit operands.
    **dict.fromkeys(("lea", "cbw", "cwde", "cdqe", "cwd", "cdq", "cqo", "clc", "stc", "cmc", "cld", "std",
                     "lahf", "sahf"), "alu"),
}

_STRING = frozenset(f"{op}{size}" for op in ("movs", "stos", "lods", "cmps", "scas")
                    for size in "bwdq")
_PREFIXES = frozenset(("rep", "repe", "repne", "repz", "repnz", "lock", "notrack", "bnd",
                       "xacquire", "xrelease", "data16"))
_SIMD_GROUPS = frozenset((
    CX.X86_GRP_FPU, CX.X86_GRP_MMX, CX.X86_GRP_3DNOW, CX.X86_GRP_SSE1, CX.X86_GRP_SSE2,
    CX.X86_GRP_SSE3, CX.X86_GRP_SSSE3, CX.X86_GRP_SSE41, CX.X86_GRP_SSE42, CX.X86_GRP_SSE4A,
    CX.X86_GRP_AVX, CX.X86_GRP_AVX2, CX.X86_GRP_AVX512, CX.X86_GRP_FMA, CX.X86_GRP_FMA4,
    CX.X86_GRP_F16C, CX.X86_GRP_XOP, CX.X86_GRP_AES, CX.X86_GRP_PCLMUL, CX.X86_GRP_SHA,
))
_EVENT_GROUPS = frozenset((CX.X86_GRP_INT, CX.X86_GRP_IRET))
_BRANCH_GROUPS = frozenset((CX.X86_GRP_JUMP, CX.X86_GRP_CALL, CX.X86_GRP_RET,
                            CX.X86_GRP_BRANCH_RELATIVE))


@cache
def _cs() -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


def classify(code: bytes, address: int) -> str:
    """The instruction class of the first instruction in `code` ("other" if undecodable).

    Deterministic and independent of `address` (it only feeds the decoder). In order:
    1. LOCK prefix or XCHG with memory: `atomic`, 2. mnemonic tables (prefixes stripped),
    3. MOV to/from a control or debug register: `cr`, 4. string instructions: `string`,
    5. x87/MMX/SSE/AVX groups: `fp_simd`, 6. software interrupt / IRET groups:
    `event_instruction`, 7. jump/call/ret groups: `branch`, 8. other privileged instructions:
    `system`, 9. a memory operand: written -> `store` (read-modify-write included), else
    `load`, 10. register and immediate operands only: `alu`, 11. anything else: `other`.
    """
    insn = next(_cs().disasm(bytes(code[:15]), address, 1), None)
    if insn is None:
        return "other"
    words = insn.mnemonic.split()
    locked = "lock" in words[:-1]
    mnemonic = next((w for w in words if w not in _PREFIXES), words[-1])
    groups = set(insn.groups)
    operands = list(insn.operands)
    memory = [op for op in operands if op.type == CX.X86_OP_MEM]

    if locked or (mnemonic == "xchg" and memory):  # XCHG with memory is locked implicitly
        return "atomic"
    if mnemonic in _BY_MNEMONIC:
        return _BY_MNEMONIC[mnemonic]
    if mnemonic == "mov" and any(op.type == CX.X86_OP_REG
                                 and insn.reg_name(op.reg)[:2] in ("cr", "dr") for op in operands):
        return "cr"
    simd = bool(groups & _SIMD_GROUPS)
    if mnemonic in _STRING and not simd:  # not SSE2 MOVSD/CMPSD
        return "string"
    if simd:
        return "fp_simd"
    if groups & _EVENT_GROUPS:
        return "event_instruction"
    if groups & _BRANCH_GROUPS:
        return "branch"
    if CX.X86_GRP_PRIVILEGE in groups:
        return "system"
    if any(op.access & capstone.CS_AC_WRITE for op in memory):
        return "store"
    if memory:
        return "load"
    if operands and all(op.type in (CX.X86_OP_REG, CX.X86_OP_IMM) for op in operands):
        return "alu"
    return "other"


class CostModel:
    """Timed-mode instruction costs from a profile, cached by the instruction's bytes.

    Pass the instruction's own bytes (as the engine's code hook reports them) for the best
    hit rate; longer `code` works too, keyed on its first 15 bytes (the longest instruction).
    The class does not depend on the address, so neither does the cache."""

    CACHE_LIMIT = 1 << 16

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._costs: dict[bytes, int] = {}

    def instruction_cost(self, code: bytes, address: int) -> int:
        key = bytes(code[:15])
        cost = self._costs.get(key)
        if cost is None:
            cost = self.profile.instructions[classify(key, address)].cost
            if len(self._costs) >= self.CACHE_LIMIT:  # code the guest keeps rewriting
                self._costs.clear()
            self._costs[key] = cost
        return cost
