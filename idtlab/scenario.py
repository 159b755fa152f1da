"""Scenario files (TOML): parse, validate, build a machine, run it, check expectations.

The format is documented in docs/scenario-format.md. Every problem with the file is a
`BadInput` whose message names the file, the table and the key (and, for assembly, the
line), so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpu.devices.apf import LAYOUTS, POLICIES
from cpu.elf import load_elf
from cpu.ept import EptMisconfig
from cpu.machine import (
    APF_FAIL_ACTIONS,
    EVENT_KINDS,
    MODES,
    OUTCOMES,
    PORT_POINTS,
    RESERVED_END,
    Machine,
    PageSpec,
    RunResult,
    VmxConfig,
)
from cpu.timing import ProfileError, load_profile
from idt.vectors import parse_vector_name, vector_name
from idtlab.assemble import CodeBlock, assemble_blocks, resolve_address
from idtlab.errors import BadInput

Value = int | str

_TOP = ("machine", "code", "data", "image", "idt", "tss", "pages", "run", "inject", "vmx", "ept",
        "host", "apf", "swapped", "expect")
_KEYS: dict[str, tuple[str, ...]] = {
    "machine": ("memory", "max_events", "mode", "profile", "sti_blocks_nmi", "apic"),
    "inject": ("event", "vector", "before", "hit", "icount", "cycle", "label", "token", "gpa",
               "at_port"),
    "apf": ("policy", "layout", "on_fail"),
    "swapped": ("gpa", "size", "latency", "fail"),
    "vmx": ("ept_violation_ve", "ve_info", "eptp_index"),
    "ept": ("gpa", "size", "read", "write", "exec", "suppress_ve", "not_present_level"),
    "host": ("on_ept_violation",),
    "code": ("at", "asm", "file"),
    "data": ("at", "symbol", "size", "u64", "u32", "u8"),
    "image": ("elf", "multiboot", "cmdline"),
    "gate": ("handler", "ist", "type", "dpl", "present", "selector"),
    "tss": ("rsp0", "rsp1", "rsp2", "ist1", "ist2", "ist3", "ist4", "ist5", "ist6", "ist7"),
    "pages": ("va", "pa", "count", "present", "writable", "user", "nx"),
    "run": ("entry", "cpl", "rsp", "rflags", "regs", "max_insns"),
    "expect": ("reg", "mem", "size", "equals", "outcome", "deliveries", "exit_code", "serial",
               "kinds"),
}
_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15", "rip", "rflags", "cr2", "cr3")


@dataclass
class Expectation:
    where: str
    spec: dict[str, Any]


@dataclass
class Failure:
    where: str
    what: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: expected {self.expected}, got {self.actual}"


@dataclass
class Scenario:
    path: Path
    data: dict[str, Any]
    machine: Machine | None = None
    symbols: dict[str, int] = field(default_factory=dict)
    expects: list[Expectation] = field(default_factory=list)
    run_args: dict[str, Any] = field(default_factory=dict)


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Checker:
    def __init__(self, path: Path) -> None:
        self.name = path.name

    def fail(self, where: str, msg: str) -> BadInput:
        return BadInput(f"{self.name}: {where}: {msg}")

    def keys(self, table: Mapping[str, Any], kind: str, where: str) -> None:
        allowed = _KEYS[kind]
        for key in table:
            if key not in allowed:
                raise self.fail(where, f"unknown key '{key}'{_did_you_mean(key, allowed)}")

    def int_(self, value: Any, where: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {type(value).__name__} {value!r}")
        if not lo <= value <= hi:
            raise self.fail(where, f"{value:#x} outside {lo:#x}..{hi:#x}")
        return value

    def bool_(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value

    def addr(self, value: Any, where: str) -> Value:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(where, f"expected an address (integer or symbol), got {value!r}")
        return value

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a table, got {type(value).__name__}")
        return value

    def array_of_tables(self, value: Any, where: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(where, f"expected an array of tables ([[{where.strip('[]')}]])")
        return value


def parse_size(text: Any, where: str, chk: _Checker) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return chk.int_(text, where, 1)
    if not isinstance(text, str):
        raise chk.fail(where, f"expected a size like \"16M\", got {text!r}")
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise chk.fail(where, f"cannot read size {text!r} (use e.g. \"16M\", \"512K\", \"1G\")")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def load(path: str | Path, *, mode: str | None = None) -> Scenario:
    """Parse and validate a scenario file and build its machine (not yet run)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read scenario: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path.name}: TOML syntax error: {exc}") from None
    return build(path, data, text, mode=mode)


def build(path: Path, data: dict[str, Any], text: str = "", *, mode: str | None = None) -> Scenario:
    """Validate `data` and build its machine; `mode` overrides `[machine] mode`."""
    chk = _Checker(path)
    for key in data:
        if key not in _TOP:
            raise chk.fail("top level", f"unknown table '{key}'{_did_you_mean(key, _TOP)}")
    sc = Scenario(path=path, data=data)

    mach = chk.table(data.get("machine", {}), "[machine]")
    chk.keys(mach, "machine", "[machine]")
    memory = parse_size(mach.get("memory", "16M"), "[machine] memory", chk)
    if memory % 4096 or memory < RESERVED_END + 0x1000 or memory > 4 << 30:
        raise chk.fail("[machine] memory", f"{memory:#x} must be a multiple of 4 KiB between "
                       f"{RESERVED_END + 0x1000:#x} and 4 GiB")
    max_events = chk.int_(mach.get("max_events", 100_000), "[machine] max_events", 1)
    if mode is None:
        mode = mach.get("mode", "fast")
    if mode not in MODES:
        raise chk.fail("[machine] mode", f"'{mode}' is not one of {', '.join(MODES)}")
    profile = mach.get("profile", "default")
    if not isinstance(profile, str):
        raise chk.fail("[machine] profile", "expected a profile name or a path to a .toml file")
    if profile.endswith(".toml"):
        profile = str((path.parent / profile).resolve())
    try:
        prof = load_profile(profile)
    except ProfileError as exc:
        raise chk.fail("[machine] profile", str(exc)) from None
    vmx: VmxConfig | None = None
    if "vmx" in data or "ept" in data:
        vt = chk.table(data.get("vmx", {}), "[vmx]")
        chk.keys(vt, "vmx", "[vmx]")
        ve_info = vt.get("ve_info")
        if ve_info is not None:
            ve_info = chk.int_(ve_info, "[vmx] ve_info")
            if ve_info % 4096 or ve_info + 4096 > memory:
                raise chk.fail("[vmx] ve_info", f"{ve_info:#x} must be a 4-KiB aligned page inside "
                               "guest memory")
        vmx = VmxConfig(ept_violation_ve=chk.bool_(vt.get("ept_violation_ve", False),
                                                   "[vmx] ept_violation_ve"),
                        ve_info=ve_info,
                        eptp_index=chk.int_(vt.get("eptp_index", 0), "[vmx] eptp_index", 0, 0xFFFF))
        if vmx.ept_violation_ve and ve_info is None:
            raise chk.fail("[vmx]", "ept_violation_ve = true needs ve_info (the VE-information page)")
    m = Machine(memory, max_events=max_events, mode=mode, profile=prof, vmx=vmx,
                sti_blocks_nmi=chk.bool_(mach.get("sti_blocks_nmi", True),
                                         "[machine] sti_blocks_nmi"),
                apic=chk.bool_(mach.get("apic", True), "[machine] apic"))
    sc.machine = m
    symbols: dict[str, int] = dict(m.symbols)
    symbols["pml4"] = 0x3000  # build_identity_map starts the tables at PT_BASE
    regions: list[tuple[int, int, str]] = [(0, RESERVED_END, "the machine's system area")]

    def region(at: int, size: int, what: str) -> None:
        if at + size > memory:
            raise chk.fail(what, f"{at:#x}..{at + size:#x} is outside guest memory (0..{memory:#x})")
        for lo, hi, other in regions:
            if at < hi and lo < at + size:
                raise chk.fail(what, f"{at:#x}..{at + size:#x} overlaps {other} ({lo:#x}..{hi:#x})")
        regions.append((at, at + size, what))

    # A multiboot image boots itself: it brings its own GDT, IDT, TSS and page tables and
    # starts at its own 32-bit entry (cpu/multiboot.py).
    images = chk.array_of_tables(data.get("image", []), "[[image]]")
    for i, im in enumerate(images, 1):
        chk.keys(im, "image", f"[[image]] #{i}")
    multiboot = any(chk.bool_(im.get("multiboot", False), f"[[image]] #{i} multiboot")
                    for i, im in enumerate(images, 1))
    if multiboot:
        if len(images) != 1:
            raise chk.fail("[[image]]", "a multiboot image must be the only [[image]]")
        for table in ("code", "data", "idt", "tss", "pages"):
            if table in data:
                raise chk.fail(f"[{table}]" if table in ("idt", "tss") else f"[[{table}]]",
                               "not with a multiboot image (the image builds its own "
                               "structures and loads its own code)")
        for key in ("entry", "rsp", "cpl", "rflags", "regs"):
            if key in chk.table(data.get("run", {}), "[run]"):
                raise chk.fail(f"[run] {key}", "not with a multiboot image (it starts at its own "
                               "32-bit entry, in the state the multiboot specification defines)")
    elif any("cmdline" in im for im in images):
        raise chk.fail("[[image]] cmdline", "only for a multiboot image (multiboot = true)")

    # [[data]] blocks: zero-filled or initialised, optionally named.
    for i, d in enumerate(chk.array_of_tables(data.get("data", []), "[[data]]"), 1):
        where = f"[[data]] #{i}"
        chk.keys(d, "data", where)
        if "at" not in d:
            raise chk.fail(where, "missing key 'at'")
        at = chk.int_(d["at"], f"{where} at")
        blob = bytearray()
        for key, width in (("u64", 8), ("u32", 4), ("u8", 1)):
            if key in d:
                if not isinstance(d[key], list):
                    raise chk.fail(f"{where} {key}", "expected an array of integers")
                for j, v in enumerate(d[key]):
                    blob += chk.int_(v, f"{where} {key}[{j}]", 0, 2 ** (8 * width) - 1).to_bytes(
                        width, "little")
        size = chk.int_(d.get("size", len(blob) or 8), f"{where} size", 1)
        if len(blob) > size:
            raise chk.fail(where, f"{len(blob)} initialised bytes exceed size {size}")
        blob += bytes(size - len(blob))
        region(at, size, where)
        m.load(at, bytes(blob))
        if "symbol" in d:
            sym = d["symbol"]
            if not isinstance(sym, str) or not re.fullmatch(r"[A-Za-z_.$][\w.$]*", sym):
                raise chk.fail(f"{where} symbol", f"{sym!r} is not a valid symbol name")
            if sym in symbols:
                raise chk.fail(f"{where} symbol", f"'{sym}' is already defined")
            symbols[sym] = at

    # [[image]] ELF files.
    for i, im in enumerate(images, 1):
        where = f"[[image]] #{i}"
        if multiboot:
            _load_multiboot(m, im, where, path, chk)
            symbols.clear()  # the machine's own structures (gdt, idt...) are not there
            symbols.update(m.symbols)
            continue
        if not isinstance(im.get("elf"), str):
            raise chk.fail(where, "missing key 'elf' (path to an x86-64 ELF file)")
        elf_path = (path.parent / im["elf"]).resolve()
        _maybe_build_guest_image(elf_path)
        image = load_elf(elf_path)
        for seg in image.segments:
            if seg.memsz == 0:
                continue
            region(seg.paddr, seg.memsz, f"{where} segment at {seg.paddr:#x}")
            m.load(seg.paddr, seg.data + bytes(seg.memsz - len(seg.data)))
        for lo, hi in image.code_ranges:
            m.add_code(lo, m.phys.read(lo, hi - lo))
        for name, value in image.symbols.items():
            if name in symbols and symbols[name] != value:
                raise chk.fail(where, f"symbol '{name}' from {im['elf']} is already defined")
            symbols[name] = value

    # [[code]] blocks, assembled together so labels are global.
    blocks: list[CodeBlock] = []
    for i, c in enumerate(chk.array_of_tables(data.get("code", []), "[[code]]"), 1):
        where = f"[[code]] #{i}"
        chk.keys(c, "code", where)
        if "at" not in c:
            raise chk.fail(where, "missing key 'at'")
        at = chk.int_(c["at"], f"{where} at")
        if ("asm" in c) == ("file" in c):
            raise chk.fail(where, "give exactly one of 'asm' (inline source) or 'file'")
        if "asm" in c:
            if not isinstance(c["asm"], str):
                raise chk.fail(f"{where} asm", "expected a string")
            blocks.append(CodeBlock(at, c["asm"], f"{path.name} {where}",
                                    _asm_first_line(text, i, c["asm"])))
        else:
            src = path.parent / str(c["file"])
            try:
                blocks.append(CodeBlock(at, src.read_text(), src.name, 1))
            except OSError as exc:
                raise chk.fail(f"{where} file", f"cannot read {src}: {exc.strerror}") from None
    if blocks:
        assembled, code_symbols = assemble_blocks(blocks, symbols)
        for blk in assembled:
            region(blk.at, max(1, len(blk.code)), blk.origin)
            m.load(blk.at, blk.code, code=True)
        symbols.update(code_symbols)
    m.symbols.update(symbols)
    sc.symbols = symbols

    def addr(value: Any, where: str) -> int:
        return resolve_address(chk.addr(value, where), symbols, f"{path.name}: {where}")

    # [idt]
    idt = chk.table(data.get("idt", {}), "[idt]")
    for key, gate in idt.items():
        try:
            vector = int(key, 0)
        except ValueError:
            raise chk.fail("[idt]", f"key '{key}' is not a vector number") from None
        where = f"[idt] {key}"
        if not 0 <= vector <= 255:
            raise chk.fail(where, f"vector {vector} outside 0..255")
        gate = chk.table(gate, where)
        chk.keys(gate, "gate", where)
        if "handler" not in gate:
            raise chk.fail(where, "missing key 'handler'")
        gtype = gate.get("type", "interrupt")
        if gtype not in ("interrupt", "trap"):
            raise chk.fail(f"{where} type", f"'{gtype}' is not 'interrupt' or 'trap'")
        m.set_gate(vector, addr(gate["handler"], f"{where} handler"),
                   ist=chk.int_(gate.get("ist", 0), f"{where} ist", 0, 7),
                   gate_type=gtype, dpl=chk.int_(gate.get("dpl", 0), f"{where} dpl", 0, 3),
                   present=chk.bool_(gate.get("present", True), f"{where} present"),
                   selector=chk.int_(gate.get("selector", 0x08), f"{where} selector", 0, 0xFFFF))

    # [tss]
    tss = chk.table(data.get("tss", {}), "[tss]")
    chk.keys(tss, "tss", "[tss]")
    m.set_tss(**{k: addr(v, f"[tss] {k}") for k, v in tss.items()})

    # [[pages]]
    for i, p in enumerate(chk.array_of_tables(data.get("pages", []), "[[pages]]"), 1):
        where = f"[[pages]] #{i}"
        chk.keys(p, "pages", where)
        if "va" not in p:
            raise chk.fail(where, "missing key 'va'")
        va = addr(p["va"], f"{where} va")
        pa = addr(p.get("pa", va), f"{where} pa")
        count = chk.int_(p.get("count", 1), f"{where} count", 1, 1 << 20)
        if va % 4096 or pa % 4096:
            raise chk.fail(where, "va and pa must be 4-KiB aligned")
        if va >= 1 << 47:
            raise chk.fail(f"{where} va", f"{va:#x} is not a lower-half canonical address")
        if pa + 4096 * count > memory and m.ept is None:
            # (In a VMX guest a guest-physical page outside RAM is legitimate: EPT decides
            # what an access to it does, e.g. a violation at a not-present PML4 entry.)
            raise chk.fail(f"{where} pa", f"{pa:#x} is outside guest memory (0..{memory:#x})")
        flags = {k: chk.bool_(p[k], f"{where} {k}") for k in ("present", "writable", "user", "nx")
                 if k in p}
        for n in range(count):
            m.set_page(PageSpec(va=va + 4096 * n, pa=pa + 4096 * n, **flags))

    # [[ept]] and [host]
    for i, ep in enumerate(chk.array_of_tables(data.get("ept", []), "[[ept]]"), 1):
        where = f"[[ept]] #{i}"
        chk.keys(ep, "ept", where)
        assert m.ept is not None
        if "gpa" not in ep:
            raise chk.fail(where, "missing key 'gpa'")
        gpa = addr(ep["gpa"], f"{where} gpa")
        rights: dict[str, bool] = {k: chk.bool_(ep.get(k, True), f"{where} {k}")
                                   for k in ("read", "write", "exec")}
        suppress = chk.bool_(ep.get("suppress_ve", False), f"{where} suppress_ve")
        if gpa % 4096:
            raise chk.fail(f"{where} gpa", f"{gpa:#x} must be 4-KiB aligned")
        try:
            if "not_present_level" in ep:
                level = {"pml4": 4, "pdpt": 3, "pd": 2, "pt": 1}.get(str(ep["not_present_level"]))
                if level is None:
                    raise chk.fail(f"{where} not_present_level", "expected pml4, pdpt, pd or pt")
                m.ept.set_not_present(gpa, level, suppress_ve=suppress)
            else:
                size = chk.int_(ep.get("size", 4096), f"{where} size", 4096)
                if size % 4096:
                    raise chk.fail(f"{where} size", f"{size:#x} must be a multiple of 4 KiB")
                m.ept.set_range(gpa, size, read=rights["read"], write=rights["write"],
                                execute=rights["exec"], suppress_ve=suppress)
        except (ValueError, EptMisconfig) as exc:
            raise chk.fail(where, str(exc)) from None
    host = chk.table(data.get("host", {}), "[host]")
    chk.keys(host, "host", "[host]")
    if "on_ept_violation" in host:
        if m.ept is None:
            raise chk.fail("[host] on_ept_violation", "needs [vmx] or [[ept]] (a VMX guest)")
        if host["on_ept_violation"] not in ("resume-fixed", "stop"):
            raise chk.fail("[host] on_ept_violation",
                           f"{host['on_ept_violation']!r} is not 'resume-fixed' or 'stop'")
        m.on_ept_violation = host["on_ept_violation"]

    # [apf] and [[swapped]]: a KVM host with async page faults
    if "apf" in data or "swapped" in data:
        apf_t = chk.table(data.get("apf", {}), "[apf]")
        chk.keys(apf_t, "apf", "[apf]")
        for key, known in (("policy", POLICIES), ("layout", LAYOUTS), ("on_fail", APF_FAIL_ACTIONS)):
            if key in apf_t and apf_t[key] not in known:
                raise chk.fail(f"[apf] {key}", f"{apf_t[key]!r} is not one of {', '.join(known)}"
                               + _did_you_mean(str(apf_t[key]), known))
        m.enable_apf(policy=apf_t.get("policy", "kvm"), layout=apf_t.get("layout", "2020"),
                     on_fail=apf_t.get("on_fail", "retry"))
    for i, sw in enumerate(chk.array_of_tables(data.get("swapped", []), "[[swapped]]"), 1):
        where = f"[[swapped]] #{i}"
        chk.keys(sw, "swapped", where)
        if "gpa" not in sw:
            raise chk.fail(where, "missing key 'gpa'")
        gpa = addr(sw["gpa"], f"{where} gpa")
        size = chk.int_(sw.get("size", 4096), f"{where} size", 1)
        if gpa % 4096 or gpa + size > memory:
            raise chk.fail(f"{where} gpa", f"{gpa:#x}..{gpa + size:#x} must be 4-KiB aligned and "
                           "inside guest memory")
        m.swap_out(gpa, size, latency=chk.int_(sw.get("latency", 5000), f"{where} latency"),
                   fail=chk.bool_(sw.get("fail", False), f"{where} fail"))

    # [run]
    run = chk.table(data.get("run", {}), "[run]")
    chk.keys(run, "run", "[run]")
    if "entry" not in run and not multiboot:
        raise chk.fail("[run]", "missing key 'entry'")
    regs = chk.table(run.get("regs", {}), "[run] regs")
    for r in regs:
        if r not in _REGS[:16]:
            raise chk.fail(f"[run] regs {r}", f"unknown register{_did_you_mean(r, _REGS[:16])}")
    sc.run_args = {
        "entry": addr(run["entry"], "[run] entry") if not multiboot else None,
        "rsp": addr(run.get("rsp", 0x70000), "[run] rsp"),
        "cpl": chk.int_(run.get("cpl", 0), "[run] cpl", 0, 3),
        "rflags": chk.int_(run.get("rflags", 0x202), "[run] rflags"),
        "regs": {r: addr(v, f"[run] regs {r}") for r, v in regs.items()},
        "max_insns": chk.int_(run.get("max_insns", 10_000_000), "[run] max_insns", 1),
    }
    if sc.run_args["cpl"] not in (0, 3):
        raise chk.fail("[run] cpl", "must be 0 or 3")
    if multiboot:
        sc.run_args = {"max_insns": sc.run_args["max_insns"]}

    # [[inject]]
    for i, inj in enumerate(chk.array_of_tables(data.get("inject", []), "[[inject]]"), 1):
        where = f"[[inject]] #{i}"
        chk.keys(inj, "inject", where)
        event = inj.get("event")
        if event not in EVENT_KINDS:
            raise chk.fail(f"{where} event", f"{event!r} is not one of {', '.join(EVENT_KINDS)}"
                           + _did_you_mean(str(event), EVENT_KINDS))
        points = [k for k in ("before", "icount", "cycle", "at_port") if k in inj]
        if len(points) > 1:
            raise chk.fail(where, "give at most one of before, icount, cycle, at_port (got "
                           f"{', '.join(points)})")
        if "hit" in inj and "before" not in inj and "at_port" not in inj:
            raise chk.fail(f"{where} hit", "'hit' counts arrivals at a 'before' address or writes "
                           "to an 'at_port' port")
        if "at_port" in inj and inj["at_port"] not in PORT_POINTS:
            raise chk.fail(f"{where} at_port", f"{inj['at_port']!r} is not one of "
                           f"{', '.join(PORT_POINTS)}")
        inj_vector: int | None = None
        if event == "interrupt":
            if "vector" not in inj:
                raise chk.fail(where, "an interrupt needs 'vector' (16..255)")
            inj_vector = chk.int_(inj["vector"], f"{where} vector", 16, 255)
        elif "vector" in inj:
            raise chk.fail(f"{where} vector", f"an {event} has no vector")
        if "token" in inj and event != "async_pf":
            raise chk.fail(f"{where} token", "'token' belongs to event = \"async_pf\"")
        if "gpa" in inj and event not in ("async_pf", "ept_revoke"):
            raise chk.fail(f"{where} gpa", "'gpa' belongs to event = \"async_pf\" or "
                           "\"ept_revoke\"")
        if event == "ept_revoke" and "gpa" not in inj:
            raise chk.fail(where, "an ept_revoke needs 'gpa' (the page the host revokes)")
        label = inj.get("label", "")
        if not isinstance(label, str):
            raise chk.fail(f"{where} label", "expected a string")
        try:
            _inject(m, event, inj_vector, inj, where, addr, chk, label or f"inject #{i}")
        except ValueError as exc:
            raise chk.fail(where, str(exc)) from None

    # [[expect]]
    for i, e in enumerate(chk.array_of_tables(data.get("expect", []), "[[expect]]"), 1):
        where = f"[[expect]] #{i}"
        chk.keys(e, "expect", where)
        kinds = [k for k in ("reg", "mem", "outcome", "deliveries", "exit_code", "serial", "kinds")
                 if k in e]
        if len(kinds) != 1:
            raise chk.fail(where, "give exactly one of reg, mem, outcome, deliveries, exit_code, "
                           "serial, kinds")
        if "kinds" in e and (not isinstance(e["kinds"], list)
                             or not all(isinstance(k, str) for k in e["kinds"])):
            raise chk.fail(f"{where} kinds", "expected a list of trace kinds (strings)")
        spec = dict(e)
        if "reg" in e and e["reg"] not in _REGS:
            raise chk.fail(f"{where} reg", f"unknown register '{e['reg']}'"
                           f"{_did_you_mean(str(e['reg']), _REGS)}")
        if "mem" in e:
            spec["mem"] = addr(e["mem"], f"{where} mem")
            spec["size"] = e.get("size", 8)
            if spec["size"] not in (1, 2, 4, 8):
                raise chk.fail(f"{where} size", "must be 1, 2, 4 or 8")
        if "reg" in e or "mem" in e:
            if "equals" not in e:
                raise chk.fail(where, "missing key 'equals'")
            spec["equals"] = addr(e["equals"], f"{where} equals")
        if "outcome" in e and e["outcome"] not in OUTCOMES:
            raise chk.fail(f"{where} outcome", f"'{e['outcome']}' is not one of "
                           f"{', '.join(OUTCOMES)}")
        if "deliveries" in e:
            names = e["deliveries"]
            if not isinstance(names, list):
                raise chk.fail(f"{where} deliveries", "expected a list of vector names or numbers")
            vecs = []
            for n in names:
                v = n if isinstance(n, int) else parse_vector_name(str(n))
                if v is None:
                    raise chk.fail(f"{where} deliveries", f"unknown vector name {n!r}")
                vecs.append(v)
            spec["deliveries"] = vecs
        sc.expects.append(Expectation(where, spec))
    return sc


def _inject(m: Machine, event: str, vector: int | None, inj: dict[str, Any], where: str,
            addr: Any, chk: _Checker, label: str) -> None:
    m.inject(event, vector=vector,
             before=addr(inj["before"], f"{where} before") if "before" in inj else None,
             hit=chk.int_(inj.get("hit", 1), f"{where} hit", 1),
             icount=chk.int_(inj["icount"], f"{where} icount") if "icount" in inj else None,
             cycle=chk.int_(inj["cycle"], f"{where} cycle") if "cycle" in inj else None,
             label=label,
             token=chk.int_(inj["token"], f"{where} token", 1, 0xFFFFFFFE) if "token" in inj else None,
             gpa=addr(inj["gpa"], f"{where} gpa") if "gpa" in inj else None,
             at_port=inj.get("at_port"))


def _asm_first_line(text: str, index: int, asm: str) -> int:
    """Line number in the TOML file where the index-th [[code]] block's asm text starts."""
    if not text:
        return 1
    lines = text.splitlines()
    seen = 0
    first = asm.splitlines()[0].strip() if asm.strip() else ""
    for n, line in enumerate(lines, 1):
        if line.strip() == "[[code]]":
            seen += 1
        if seen == index and re.match(r"\s*asm\s*=", line):
            rest = line.split("=", 1)[1].strip()
            if rest.startswith(('"""', "'''")) and rest[3:].strip() == "":
                return n + 1  # multi-line string: TOML drops the first newline
            return n if first and first in line else n + 1
    return 1


def _load_multiboot(m: Machine, im: dict[str, Any], where: str, path: Path,
                    chk: _Checker) -> None:
    from cpu import multiboot as mbt  # imports idtlab.errors: not at module level

    if not isinstance(im.get("elf"), str):
        raise chk.fail(where, "missing key 'elf' (path to a multiboot ELF32 or ELF64 image)")
    cmdline = im.get("cmdline")
    if cmdline is not None and not isinstance(cmdline, str):
        raise chk.fail(f"{where} cmdline", "expected a string")
    elf_path = (path.parent / im["elf"]).resolve()
    _maybe_build_guest_image(elf_path)
    try:
        mbt.load(m, mbt.read_image(elf_path), cmdline=cmdline)
    except BadInput as exc:
        raise chk.fail(f"{where} elf", str(exc)) from None


def _maybe_build_guest_image(elf_path: Path) -> None:
    """Build guest_images/build/<name>.elf from its committed source if needed."""
    from guest_images import build as gib

    build_dir = Path(gib.__file__).resolve().parent / "build"
    if elf_path.parent == build_dir and elf_path.suffix == ".elf":
        gib.build_image(elf_path.stem)


def run(sc: Scenario) -> RunResult:
    assert sc.machine is not None
    return sc.machine.run(**sc.run_args)


def check(sc: Scenario, result: RunResult) -> list[Failure]:
    """Compare every [[expect]] with the run; return the failures (empty = all hold)."""
    m = sc.machine
    assert m is not None
    out: list[Failure] = []
    for exp in sc.expects:
        s = exp.spec
        if "outcome" in s:
            if result.outcome != s["outcome"]:
                out.append(Failure(exp.where, "outcome", s["outcome"],
                                   f"{result.outcome} ({result.reason})"))
        elif "exit_code" in s:
            if result.exit_code != s["exit_code"]:
                out.append(Failure(exp.where, "exit code", str(s["exit_code"]),
                                   str(result.exit_code)))
        elif "serial" in s:
            if result.serial != s["serial"]:
                out.append(Failure(exp.where, "serial output", repr(s["serial"]),
                                   repr(result.serial)))
        elif "deliveries" in s:
            got = [r["vector"] for r in result.deliveries]
            if got != s["deliveries"]:
                out.append(Failure(exp.where, "deliveries",
                                   "[" + ", ".join(vector_name(v) for v in s["deliveries"]) + "]",
                                   "[" + ", ".join(vector_name(v) for v in got) + "]"))
        elif "kinds" in s:
            wanted = set(s["kinds"])
            got_kinds = [r["kind"] for r in result.trace.records if r["kind"] in wanted]
            if got_kinds != s["kinds"]:
                out.append(Failure(exp.where, "trace kinds", str(s["kinds"]), str(got_kinds)))
        elif "reg" in s:
            actual = m.engine.read_reg(s["reg"])
            if actual != s["equals"]:
                out.append(Failure(exp.where, s["reg"], f"{s['equals']:#x}", f"{actual:#x}"))
        elif "mem" in s:
            try:
                actual = int.from_bytes(m.read_linear(s["mem"], s["size"]), "little")
            except Exception as exc:  # an unmapped address is a failed expectation
                out.append(Failure(exp.where, f"mem {s['mem']:#x}", f"{s['equals']:#x}",
                                   f"unreadable ({exc})"))
                continue
            if actual != s["equals"]:
                out.append(Failure(exp.where, f"mem {s['mem']:#x} ({s['size']} bytes)",
                                   f"{s['equals']:#x}", f"{actual:#x}"))
    return out
