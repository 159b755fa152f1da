"""The runs whose output is pinned byte for byte: every shipped scenario (fast and timed
mode: JSONL trace and the printed timeline with cycles), every self-logging multiboot
image (JSONL trace), and the race explorer's `--json` report for every shipped explore
example with its documented command line.

`python tests/golden/cases.py --record` rewrites `tests/golden/data/` from the current
code. Do that only for a change that is *meant* to change behaviour, and say so in the
commit: the point of these files is that a refactor leaves them alone.
"""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
EXAMPLES = ROOT / "idtlab" / "examples"

SCENARIOS = sorted(
    [p for p in EXAMPLES.rglob("*.toml")]
    + [ROOT / "guest_images" / "bp_ist.toml", ROOT / "guest_images" / "pf_demo.toml",
       ROOT / "guest_images" / "vmx_ve" / "guest.toml"])
IMAGES = ("bp_stacks", "db_breakpoint", "int_gates", "nmi_apic", "np_df", "pf_codes",
          "rf_frames")
# The explore examples' own command lines (each file's header).
EXPLORE = {
    "cr2_race": ["--event", "nmi", "--window", "pf_handler..pf_done",
                 "--invariant", "cr2-consistent"],
    "cr2_race_safe": ["--event", "nmi", "--window", "pf_handler..pf_done",
                      "--invariant", "cr2-consistent"],
    "nested_nmi_naive": ["--event", "nmi", "--window", "nmi_handler..main_done",
                         "--invariant", "frames-intact"],
    "nested_nmi_safe": ["--event", "nmi", "--window", "nmi_handler..main_done"],
    "ve_rearm_clear_then_iret": ["--event", "nmi", "--window", "ve_handler..ve_iret",
                                 "--invariant", "frames-intact"],
    "ve_rearm_deferred": ["--event", "nmi", "--window", "ve_handler..ve_iret",
                          "--invariant", "frames-intact"],
}


@dataclass(frozen=True)
class Case:
    name: str  # the file under data/
    argv: tuple[str, ...]  # `idtlab` arguments; "{out}" is the output file
    output: str  # "file": what argv wrote to {out}; "stdout": what it printed


def _stem(path: Path) -> str:
    return str(path.relative_to(ROOT)).replace("/", "__").removesuffix(".toml")


def cases() -> list[Case]:
    out: list[Case] = []
    for path in SCENARIOS:
        rel = str(path.relative_to(ROOT))
        for mode in ("fast", "timed"):
            out.append(Case(f"{_stem(path)}.{mode}.jsonl",
                            ("run", rel, "--mode", mode, "-q", "--trace", "{out}"), "file"))
            out.append(Case(f"{_stem(path)}.{mode}.timeline",
                            ("run", rel, "--mode", mode, "--cycles"), "stdout"))
    for image in IMAGES:
        out.append(Case(f"mb__{image}.jsonl", ("run", "--image", image, "--trace", "{out}"),
                        "file"))
    for name, args in EXPLORE.items():
        rel = f"idtlab/examples/explore/{name}.toml"
        out.append(Case(f"explore__{name}.json", ("explore", rel, *args, "--json"), "stdout"))
    return out


def produce(case: Case, tmp: Path) -> bytes:
    """Run `case` in this process (as `idtlab ARGS` would) and return its output."""
    from idtlab.cli import main

    target = tmp / case.name
    argv = [a.replace("{out}", str(target)) for a in case.argv]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.chdir(ROOT):
        main(argv)
    if case.output == "file":
        return target.read_bytes()
    return buf.getvalue().encode()


def record() -> None:
    import tempfile

    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases():
            (DATA / case.name).write_bytes(produce(case, Path(tmp)))
            print(case.name)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/golden/cases.py --record")
    record()
