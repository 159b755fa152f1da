"""How much does idtlab cost over bare Unicorn?

Three figures, measured in one process run:

  (a) raw Unicorn 2.1.4: a tight loop on a plain `mem_map`, UC_MODE_64, no hooks;
  (b) the same loop under `cpu.machine.Machine` on its fast path (no event pending: the
      native instruction counter, Python-owned paging through the TLB-fill hook, and the
      IRET/HLT interception sites are the only extras);
  (c) the event rate: a loop that executes `int3` into a handler that only `iretq`s, so
      each iteration is one delivery and one IRET through the pure model in `idt/`.

The loop is `mov rcx, N; l: dec rcx; jnz l; hlt`, i.e. 2N + 1 instructions before the
HLT. Only the run itself is timed (engine creation and assembly are not). Usage:

    python bench/bench_loop.py [--iterations N] [--events K] [--repeat R]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from unicorn import (  # type: ignore[attr-defined]  # noqa: E402  # Uc is not re-exported
    UC_ARCH_X86,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
)
from unicorn import x86_const as X  # noqa: E402

from cpu.machine import Machine  # noqa: E402
from idtlab.assemble import CodeBlock, assemble_blocks  # noqa: E402

CODE = 0x10_0000
HANDLER = 0x10_1000
STACK_TOP = 0x7_0000


def assemble(source: str, at: int) -> bytes:
    blocks, _ = assemble_blocks([CodeBlock(at, source, origin="bench", first_line=1)],
                                known={})
    return blocks[0].code


def loop_source(iterations: int, body: str = "") -> str:
    return f"mov rcx, {iterations}\nl:\n{body}dec rcx\njnz l\nhlt\n"


@dataclass(frozen=True)
class Measurement:
    name: str
    count: int  # instructions, or events for (c)
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")


def best_of(repeat: int, once: Callable[[], tuple[int, float]], name: str) -> Measurement:
    runs = [once() for _ in range(repeat)]
    count, seconds = min(runs, key=lambda r: r[1])
    return Measurement(name, count, seconds)


def raw_unicorn(iterations: int) -> tuple[int, float]:
    code = assemble(loop_source(iterations), CODE)
    hlt_at = CODE + len(code) - 1
    uc: Any = Uc(UC_ARCH_X86, UC_MODE_64)  # type: ignore[no-untyped-call]
    uc.mem_map(0, 2 << 20, UC_PROT_ALL)
    uc.mem_write(CODE, code)
    uc.reg_write(X.UC_X86_REG_RSP, STACK_TOP)
    start = time.perf_counter()
    uc.emu_start(CODE, hlt_at)  # stop *before* the HLT: fact 11, HLT would just stop it
    seconds = time.perf_counter() - start
    if int(uc.reg_read(X.UC_X86_REG_RCX)) != 0:
        raise RuntimeError("raw Unicorn loop did not finish")
    return 2 * iterations + 1, seconds


def machine_loop(iterations: int) -> tuple[int, float]:
    m = Machine(2 << 20, max_insns=2 * iterations + 16)
    m.load(CODE, assemble(loop_source(iterations), CODE), code=True)
    m.start_state(entry=CODE, rsp=STACK_TOP)
    start = time.perf_counter()
    result = m.run()
    seconds = time.perf_counter() - start
    if result.outcome != "hlt" or result.icount != 2 * iterations + 2:
        raise RuntimeError(f"Machine loop ended with {result.outcome} after {result.icount}")
    return 2 * iterations + 1, seconds


def machine_events(iterations: int) -> tuple[int, float]:
    m = Machine(2 << 20, max_insns=8 * iterations + 16, max_events=iterations + 16)
    m.load(CODE, assemble(loop_source(iterations, body="int3\n"), CODE), code=True)
    m.load(HANDLER, assemble("iretq\n", HANDLER), code=True)
    m.set_gate(3, HANDLER)
    m.start_state(entry=CODE, rsp=STACK_TOP)
    start = time.perf_counter()
    result = m.run()
    seconds = time.perf_counter() - start
    delivered = len(result.deliveries)
    irets = len(result.trace.of_kind("iret"))
    if result.outcome != "hlt" or delivered != iterations or irets != iterations:
        raise RuntimeError(f"event loop: {result.outcome}, {delivered} deliveries, {irets} IRETs")
    return delivered + irets, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--iterations", type=int, default=50_000_000,
                    help="loop iterations for (a) and (b); 2N+1 instructions (default 50M)")
    ap.add_argument("--events", type=int, default=20_000,
                    help="int3/iretq round trips for (c) (default 20000)")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of R runs each")
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.events < 1 or args.repeat < 1:
        ap.error("--iterations, --events and --repeat must be positive")

    raw = best_of(args.repeat, lambda: raw_unicorn(args.iterations), "raw Unicorn")
    mach = best_of(args.repeat, lambda: machine_loop(args.iterations), "cpu.machine.Machine")
    ev = best_of(args.repeat, lambda: machine_events(args.events), "int3 + iretq")

    print(f"unicorn {version('unicorn')}, Python {platform.python_version()}, "
          f"{platform.machine()}; loop of {args.iterations:,} iterations "
          f"({2 * args.iterations + 1:,} instructions), best of {args.repeat}")
    print()
    print(f"{'run':<28}{'instructions':>16}{'seconds':>10}{'MIPS':>10}")
    for r in (raw, mach):
        print(f"{r.name:<28}{r.count:>16,}{r.seconds:>10.3f}{r.rate / 1e6:>10.1f}")
    print(f"{'ratio Machine / raw':<28}{'':>16}{'':>10}{mach.rate / raw.rate:>10.3f}"
          f"   ({raw.rate / mach.rate:.1f}x slower)")
    print()
    print(f"{'events':<28}{'deliveries+IRETs':>16}{'seconds':>10}{'events/s':>10}"
          f"{'us/event':>10}")
    print(f"{ev.name + f' x {args.events:,}':<28}{ev.count:>16,}{ev.seconds:>10.3f}"
          f"{ev.rate:>10,.0f}{1e6 / ev.rate:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
