"""`idtlab lab list|start|check|show|new`: the teaching labs from the command line.

Exit status: `check` 0 when every check passes, 1 when one fails; every command 2 on bad
input (an unknown lab, a missing directory or file, a lab folder with bad metadata),
with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from idtlab.errors import BadInput
from idtlab.labs import folder, grading, page, pictures

TEMPLATE = Path(__file__).resolve().parent / "template"


def add_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--labs-dir", type=Path, metavar="DIR",
                        help="a course's own labs (a folder of lab folders) instead of the "
                             "built-in ones")
    p = sub.add_parser("lab", help="teaching labs: list, start, check, show, new")
    lab_sub = p.add_subparsers(dest="lab_command", required=True)
    p_list = lab_sub.add_parser("list", parents=[common],
                                help="each lab's title, concepts and your status")
    p_list.add_argument("dir", nargs="?", type=Path, default=Path("."),
                        help="where your lab directories are (.)")
    p_start = lab_sub.add_parser("start", parents=[common],
                                 help="copy a lab's lesson, starter files and visible checks")
    p_start.add_argument("name", help="the lab: 05-nmi-ist, 5 or nmi-ist")
    p_start.add_argument("dir", nargs="?", type=Path, help="where (./NAME)")
    p_check = lab_sub.add_parser("check", parents=[common],
                                 help="run every check, print points, exit 0 only if all pass")
    p_check.add_argument("dir", nargs="?", type=Path, default=Path("."),
                         help="your lab directory (.)")
    p_check.add_argument("--lab", help="the lab to grade DIR against (default: the one "
                         "`lab start` recorded in DIR)")
    p_check.add_argument("--only", metavar="CHECK", help="run only this check")
    p_check.add_argument("--json", action="store_true",
                         help="the results as autograder JSON (a list of tests with name, "
                              "score, max_score, output) on stdout")
    p_check.add_argument("--pictures", action="store_true",
                         help="also print every check's timeline and the stack picture of "
                              "every delivery")
    p_show = lab_sub.add_parser("show", parents=[common],
                                help="write one HTML page: the lesson, your last run, the "
                                     "stack pictures")
    p_show.add_argument("dir", nargs="?", type=Path, default=Path("."))
    p_show.add_argument("--lab", help="the lab (default: the one recorded in DIR)")
    p_show.add_argument("-o", "--output", type=Path, metavar="FILE.html",
                        help="where to write the page (DIR/lab.html)")
    p_show.add_argument("--text", action="store_true",
                        help="print the last run with its pictures in plain text instead")
    p_new = lab_sub.add_parser("new", parents=[common],
                               help="scaffold a new lab folder (for teachers)")
    p_new.add_argument("name", help="the folder name, e.g. 08-fred")


def _colour(word: str, ok: bool) -> str:
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return word
    return f"\033[{'32' if ok else '31'};1m{word}\033[0m"


def _list(args: argparse.Namespace) -> int:
    labs = folder.all_labs(args.labs_dir)
    if not labs:
        raise BadInput(f"{folder.labs_root(args.labs_dir)}: no lab folders (each has a "
                       f"{folder.LAB_FILE})")
    progress: dict[str, tuple[Path, dict[str, Any]]] = {}
    base: Path = args.dir
    if not base.is_dir():
        raise BadInput(f"{base}: no such directory")
    for d in [base, *sorted(p for p in base.iterdir() if p.is_dir())]:
        state = grading.read_state(d)
        if state is not None:
            progress.setdefault(str(state["lab"]), (d, state))
    width = max(len(lab.name) for lab in labs)
    twidth = max(len(lab.title) for lab in labs)
    print(f"{'lab':<{width}}  {'title':<{twidth}}  status")
    for lab in labs:
        status = "-"
        if lab.name in progress:
            d, st = progress[lab.name]
            if st.get("score") is None:
                status = f"started in {d}"
            else:
                ok = not st.get("failing")
                word = "PASSED" if ok else "in progress"
                status = (f"{_colour(word, ok)} {st['score']}/{st['max_score']} "
                          f"(best {st.get('best_score', st['score'])}) in {d}")
        print(f"{lab.name:<{width}}  {lab.title:<{twidth}}  {status}")
        print(f"{'':<{width}}    concepts: {', '.join(lab.concepts)}")
    return 0


def _start(args: argparse.Namespace) -> int:
    lab = folder.find_lab(args.name, args.labs_dir)
    dest: Path = args.dir if args.dir is not None else Path(lab.name)
    copies: list[tuple[Path, Path]] = [(lab.path / folder.LESSON_FILE, dest / folder.LESSON_FILE)]
    copies += [(p, dest / p.name) for p in sorted((lab.path / "starter").iterdir()) if p.is_file()]
    for c in lab.checks:
        if c.visible:
            copies.append((lab.check_path(c), dest / "checks" / c.scenario))
    for _src, dst in copies:
        if dst.exists():
            raise BadInput(f"{dst}: already exists; not overwriting (start the lab in another "
                           "directory)")
    state = grading.read_state(dest) if dest.is_dir() else None
    if state is not None:
        raise BadInput(f"{dest}: already a lab directory (lab {state['lab']})")
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    grading.write_state(dest, {"lab": lab.name, "labs_dir": str(args.labs_dir.resolve())
                               if args.labs_dir else None, "score": None,
                               "max_score": lab.max_score})
    visible = sum(c.visible for c in lab.checks)
    print(f"started lab {lab.name} ({lab.title}) in {dest}")
    print(f"  read   {dest / folder.LESSON_FILE}")
    print(f"  edit   {', '.join(str(dest / f) for f in lab.files)}")
    print(f"  check  idtlab lab check {dest}    ({len(lab.checks)} checks, {visible} of them "
          f"visible in {dest / 'checks'}: idtlab run {dest / 'checks' / lab.checks[0].scenario})")
    return 0


def _failure_pictures(r: grading.CheckResult) -> list[str]:
    """For a check that failed because a frame was overwritten (its invariant, or the run
    did not come back): the picture of the first delivery that overwrote a live frame
    (every picture: --pictures)."""
    problems = r.run.problems
    if not any(p.invariant == "frames-intact" or p.detail.startswith("outcome")
               for p in problems):
        return []
    out: list[str] = []
    for p in [p for p in pictures.pictures(r.run) if p.overwrites][:1]:
        out.append("")
        out.extend(f"{'':>24}{line}" for line in pictures.text(p, gate=False))
    return out


def _check(args: argparse.Namespace) -> int:
    student: Path = args.dir
    lab, labs_dir = grading.lab_of(student, args.lab, args.labs_dir)
    g = grading.grade(lab, student, args.only)
    if args.only is None:
        grading.record(student, g, labs_dir)
    if args.json:
        print(json.dumps(grading.as_json(g), indent=1))
        return 0 if g.passed else 1
    print(f"lab {lab.name}: {lab.title}")
    width = max(len(r.check.name) for r in g.results)
    for r in g.results:
        lines = grading.result_lines(r, width)
        print(lines[0].replace("PASS", _colour("PASS", True), 1) if r.passed
              else lines[0].replace("FAIL", _colour("FAIL", False), 1))
        for line in lines[1:]:
            print(line)
        if not r.passed and not args.pictures:
            for line in _failure_pictures(r):
                print(line)
    if args.pictures:
        for r in g.results:
            print()
            print(f"== {r.check.name}: timeline")
            for tl in page.collapse(r.run.timeline):
                print(f"   {tl}")
            for p in pictures.pictures(r.run):
                print()
                for pl in pictures.text(p):
                    print(f"   {pl}")
    print(grading.total_line(g))
    if not g.passed and not args.pictures:
        print("every delivery's stack picture: idtlab lab check --pictures, or idtlab lab show")
    return 0 if g.passed else 1


def _show(args: argparse.Namespace) -> int:
    student: Path = args.dir
    lab, _ = grading.lab_of(student, args.lab, args.labs_dir)
    last = grading.read_last_run(student)
    if last is not None and last.get("lab") != lab.name:
        last = None
    if args.text:
        for line in page.text(lab, last):
            print(line)
        return 0
    out: Path = args.output if args.output is not None else student / "lab.html"
    out.write_text(page.render(lab, last))
    note = "" if last is not None else " (no run yet: idtlab lab check runs the checks)"
    print(f"wrote {out}{note}")
    return 0


def _new(args: argparse.Namespace) -> int:
    root: Path = args.labs_dir if args.labs_dir is not None else Path(".")
    if not root.is_dir():
        raise BadInput(f"--labs-dir {root}: no such directory")
    name: str = args.name
    if not folder.NAME_RE.fullmatch(name):
        raise BadInput(f"lab new {name!r}: a lab folder's name is lower-case letters, digits "
                       "and '-', numbered for the order (e.g. 08-fred)")
    dest = root / name
    if dest.exists():
        raise BadInput(f"{dest}: already exists")
    shutil.copytree(TEMPLATE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    meta = dest / folder.LAB_FILE
    title = re.sub(r"^\d+-", "", name).replace("-", " ").capitalize()
    meta.write_text(meta.read_text().replace("TITLE", title))
    folder.load_lab(dest)  # the scaffold is a valid lab
    print(f"new lab {name} in {dest}: edit {meta}, {dest / folder.LESSON_FILE}, "
          f"{dest / 'starter'} and {dest / 'checks'} (format: docs/labs.md)")
    print(f"  try it: idtlab lab start {name} --labs-dir {root} /tmp/{name} && "
          f"idtlab lab check /tmp/{name}")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    """Dispatch `idtlab lab ...`; `BadInput` propagates to the main CLI (exit 2)."""
    handlers = {"list": _list, "start": _start, "check": _check, "show": _show, "new": _new}
    result: int = handlers[args.lab_command](args)
    return result
