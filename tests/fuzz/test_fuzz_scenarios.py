"""Mutated scenarios are input errors or runs, never crashes: a shipped example with
values replaced by values of other types and sizes (negative, huge, strings where
numbers go, tables where strings go) either loads and runs to a documented outcome or
fails with one `BadInput` line.

Budget: IDTLAB_FUZZ_EXAMPLES examples (default 60)."""

from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cpu.errors import BadInput
from cpu.outcomes import OUTCOMES
from idtlab import scenario as scn

EXAMPLES = int(os.environ.get("IDTLAB_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = ROOT / "idtlab" / "examples"
BASES = [p for p in sorted(EXAMPLE_DIR.rglob("*.toml")) if "multiboot" not in p.read_text()]

values = st.one_of(
    st.integers(-2**65, 2**65), st.sampled_from([0, 1, -1, 2**64, 2**63, 0xFFF, 0x1000, 255, 256]),
    st.text(max_size=12), st.sampled_from(["4G", "16M", "0x100000", "main", "\\n", "", "nmi"]),
    st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(-5, 300), max_size=3),
    st.dictionaries(st.sampled_from(["at", "asm", "va", "size", "gpa"]), st.integers(-1, 2**40),
                    max_size=2))


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path to a value in a parsed TOML document (list items by index)."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(paths(v, (*prefix, k)))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Path, dict[str, Any]]:
    base = draw(st.sampled_from(BASES))
    data = tomllib.loads(base.read_text())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(data)))
        node: Any = data
        for k in where[:-1]:
            node = node[k]
        old = node[where[-1]]
        if isinstance(old, int) and not isinstance(old, bool) and draw(st.booleans()):
            # Same type, another size: most of these load, and then they run.
            node[where[-1]] = draw(st.sampled_from([0, 1, 2, old + 1, old - 1, old * 2, old | 0xFFF,
                                                    2**32, 2**47, 2**63, 2**64 - 1, -1]))
        elif isinstance(old, str) and draw(st.booleans()):
            node[where[-1]] = draw(st.sampled_from([old[:-1], old + "x", old.upper(), "\\n",
                                                    old.replace("\n", "\\n"), old + "\n.byte 6"]))
        else:
            node[where[-1]] = draw(values)
    return base, copy.deepcopy(data)


@FUZZ
@given(mutated())
def test_a_mutated_scenario_loads_and_runs_or_is_bad_input(case: tuple[Path, dict[str, Any]]) -> None:
    path, data = case
    try:
        sc = scn.build(path, data)
    except BadInput as exc:
        assert "\n" not in str(exc).strip()
        event("bad input")
        return
    event("loaded and ran")
    sc.run_args["max_insns"] = min(int(sc.run_args.get("max_insns", 5000)), 5000)
    assert scn.run(sc).outcome in OUTCOMES
