"""`idtlab lab show`: one self-contained HTML page (no script, no network, no file
beside it) with the lesson, the student's last run (each check's verdict, its timeline)
and the stack pictures of every delivery; and the same in plain text for a terminal.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from idtlab.labs import markdown, pictures
from idtlab.labs.folder import Lab
from idtlab.labs.grading import run_from_json

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0;
       color: #1d1d1f; background: #f3f3f0; }
header { background: #23344a; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 6px 0; font-size: 24px; }
header .score { font-size: 16px; }
header .concepts { font-size: 13px; color: #c8d4e4; }
nav { padding: 8px 32px; background: #dfe5ec; font-size: 14px; }
nav a { margin-right: 18px; }
main { display: block; padding: 0 32px 40px 32px; max-width: 1400px; }
section { background: #fff; margin: 20px 0; padding: 8px 24px 20px 24px;
          border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.12); }
.lesson { max-width: 900px; line-height: 1.5; }
pre { background: #f6f6f3; padding: 10px; overflow-x: auto; font-size: 13px;
      border: 1px solid #e2e2dc; }
code { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 13px; }
table { border-collapse: collapse; margin: 10px 0; }
td, th { border: 1px solid #d0d0c8; padding: 4px 8px; text-align: left; vertical-align: top;
         font-size: 14px; }
table.results td.verdict { font-weight: bold; }
tr.pass td.verdict { color: #17702a; } tr.fail td.verdict { color: #b00020; }
details.check { border: 1px solid #d8d8d0; border-radius: 4px; margin: 12px 0;
                padding: 6px 12px; }
details.check > summary { cursor: pointer; font-weight: bold; font-size: 15px; }
details.fail > summary { color: #b00020; } details.pass > summary { color: #17702a; }
.message { white-space: pre-wrap; font-family: 'DejaVu Sans Mono', Menlo, monospace;
           font-size: 13px; background: #fff4f4; border-left: 4px solid #b00020;
           padding: 8px; }
ol.timeline { font-family: 'DejaVu Sans Mono', Menlo, monospace; font-size: 12.5px;
              list-style: none; padding: 8px; margin: 0; background: #f7f8fa;
              border: 1px solid #dde; }
ol.timeline li { white-space: pre; padding: 1px 0; }
ol.timeline li.deliver { color: #1a4d8f; } ol.timeline li.bad { color: #b00020;
              font-weight: bold; } ol.timeline li.iret { color: #176b3a; }
.pictures { display: flex; flex-direction: column; gap: 14px; }
.picture { overflow-x: auto; }
"""


def collapse(lines: list[str], column: int = 12) -> list[str]:
    """Runs of lines that repeat (ignoring the icount column) as one line and a count:
    a guest looping through a clobbered frame repeats the same IRET thousands of times."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        j = i + 1
        while j < len(lines) and lines[j][column:] == lines[i][column:]:
            j += 1
        out.append(lines[i])
        if j - i > 2:
            out.append(f"{'':>{column}}... the same {j - i - 1} more times, the last at icount "
                       f"{lines[j - 1][:column].strip()}")
        elif j - i == 2:
            out.append(lines[i + 1])
        i = j
    return out


def _timeline_html(lines: list[str]) -> str:
    items = []
    for line in collapse(lines):
        cls = "event"
        if "!!" in line or "SHUTDOWN" in line or "WRONG" in line or "<- changed" in line:
            cls = "bad"
        elif " -> " in line and "stack=" in line:
            cls = "deliver"
        elif "iret at" in line:
            cls = "iret"
        items.append(f"<li class='{cls}'>{html.escape(line)}</li>")
    return "<ol class='timeline'>" + "".join(items) + "</ol>"


def _check_html(c: Mapping[str, Any], first_open: bool) -> str:
    run = run_from_json(c["run"])
    pics = pictures.pictures(run)
    state = "pass" if c["passed"] else "fail"
    open_attr = " open" if (not c["passed"] or first_open) else ""
    parts = [f"<details class='check {state}' id='check-{html.escape(c['name'])}'{open_attr}>",
             f"<summary>{'PASS' if c['passed'] else 'FAIL'} {c['score']}/{c['points']} "
             f"{html.escape(c['name'])}: {html.escape(c['title'])}"
             f"{'' if c['visible'] else ' (hidden check)'}</summary>",
             f"<p>{html.escape(c['summary'])}</p>"]
    if not c["passed"]:
        parts.append("<div class='message'>" + html.escape("\n".join(c["lines"])) + "</div>")
        parts.append(f"<p>Hint: the lesson's section <a href='#{markdown.slug(c['hint'])}'>"
                     f"{html.escape(c['hint'])}</a>.</p>")
    shown = "the first schedule that broke the check" if c["kind"] == "explore" and \
        not c["passed"] else "the check's run" + (" (without the explorer's events)"
                                                  if c["kind"] == "explore" else "")
    parts.append(f"<h4>Timeline: {shown}</h4>")
    parts.append(_timeline_html(run.timeline) if run.timeline else
                 "<p>(no run: the scenario did not load)</p>")
    if pics:
        parts.append(f"<h4>The stack at each of the {len(pics)} deliveries</h4>"
                     "<div class='pictures'>")
        parts += [f"<div class='picture'>{pictures.svg(p)}</div>" for p in pics]
        parts.append("</div>")
    parts.append("</details>")
    return "".join(parts)


def render(lab: Lab, last: Mapping[str, Any] | None) -> str:
    """The page: the lesson, then the last run (or a note that there is none)."""
    title = f"idtlab lab {lab.name}: {lab.title}"
    lesson = markdown.to_html(lab.lesson, base=lab.path)
    head = [f"<header><h1>{html.escape(lab.title)}</h1>",
            f"<div class='concepts'>lab {html.escape(lab.name)} &middot; "
            + html.escape(", ".join(lab.concepts)) + "</div>"]
    body: list[str] = []
    if last is None:
        head.append("<div class='score'>not checked yet</div>")
        body.append("<section id='last-run'><h2>Last run</h2><p>No run yet: "
                    "<code>idtlab lab check</code> runs the checks.</p></section>")
    else:
        checks = list(last["checks"])
        failing = sum(not c["passed"] for c in checks)
        verdict = "all checks pass" if not failing else f"{failing} of {len(checks)} checks fail"
        head.append(f"<div class='score'>score {last['score']}/{last['max_score']} "
                    f"&mdash; {verdict}</div>")
        rows = []
        for c in checks:
            state = "pass" if c["passed"] else "fail"
            first = c["lines"][0] if c["lines"] else c["summary"]
            rows.append(f"<tr class='{state}'><td class='verdict'>{state.upper()}</td>"
                        f"<td>{c['score']}/{c['points']}</td><td><a href='#check-"
                        f"{html.escape(c['name'])}'>{html.escape(c['name'])}</a></td>"
                        f"<td>{'visible' if c['visible'] else 'hidden'}</td>"
                        f"<td>{html.escape(first)}</td></tr>")
        body.append("<section id='last-run'><h2>Last run</h2><table class='results'>"
                    "<tr><th></th><th>points</th><th>check</th><th></th><th>what happened</th>"
                    "</tr>" + "".join(rows) + "</table>"
                    + "".join(_check_html(c, i == 0 and not failing) for i, c in
                              enumerate(checks)) + "</section>")
    head.append("</header>")
    nav = "<nav><a href='#lesson'>Lesson</a><a href='#last-run'>Last run</a></nav>"
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            + "".join(head) + nav + "<main>"
            + f"<section id='lesson' class='lesson'>{lesson}</section>"
            + "".join(body) + "</main></body></html>\n")


def text(lab: Lab, last: Mapping[str, Any] | None) -> list[str]:
    """The last run in plain text: each check, its timeline and its stack pictures."""
    if last is None:
        return [f"lab {lab.name}: no run yet (idtlab lab check runs the checks)"]
    out = [f"lab {lab.name}: {lab.title}: score {last['score']}/{last['max_score']}"]
    for c in last["checks"]:
        run = run_from_json(c["run"])
        out.append("")
        out.append(f"== {'PASS' if c['passed'] else 'FAIL'} {c['score']}/{c['points']} "
                   f"{c['name']}: {c['title']}")
        out.append(f"   {c['summary']}")
        out.extend(f"   {line}" for line in c["lines"])
        out.append("   timeline:")
        out.extend(f"   {line}" for line in collapse(run.timeline))
        for p in pictures.pictures(run):
            out.append("")
            out.extend(f"   {line}" for line in pictures.text(p))
    return out
