"""The race explorer's HTML report: one self-contained page (no server, no network: the
style and the few lines of script are inline) that a kernel developer can read and
send to someone else.

What it shows, top to bottom:

* the verdict (how many schedules break something) and the run's parameters: the
  scenario, the window and its points, the events and how they were scheduled, the
  invariants, whether the `[[expect]]` entries were checked, how host events were
  treated, the mode, the budget, the seed, and the command line that repeats it;
* what the run without the explorer's events already breaks, if anything;
* for a random search, the minimal (shrunk) failing schedule, first;
* a legend: the colours of the statuses, and every symbol of the timelines;
* the findings grouped as in the text report (idtlab/explore_report.py): one row per
  run of schedules that end the same way, with every failure, invariants first; each
  row opens onto one row per schedule (its points, instructions, outcome, failures)
  and links to the timeline of its counterexample; a filter box and status switches;
* one timeline per distinct counterexample (distinct outcome and failures): the
  schedule run again from the start, its records with repeats collapsed ("100 x iret
  ..."), the verdict when the guest got stuck, and at each delivery a picture of the
  frame (idtlab/stack_pictures.py): its slots, the old and new values when it overwrote
  a live frame, the stack it went to (IST n, RSP0, the current one) and the gate.

The page is tested in a real browser (tests/explore/test_explore_html_browser.py).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

from idtlab.explore import HIDDEN_SYMBOLS, Exploration, Finding, replay
from idtlab.explore_report import STATUS_TEXT, Group, groups, parameters, summary
from idtlab.stack_pictures import capture, pictures, svg
from idtlab.trace import HINT, LEGEND, Symbolizer, depths, record_lines, repeats, stuck

MAX_TIMELINES = 12  # distinct counterexamples with a timeline; the rest are counted
MAX_PICTURES = 24  # stack pictures per timeline (an event storm has thousands)

STATUSES = ("breaks", "ok", "refused", "not_applicable")
STATUS_HELP = {
    "breaks": "an invariant or an expectation fails under this schedule",
    "ok": "everything checked holds",
    "refused": "the host's policy refuses the host event at this point: the host would "
               "never do it there, so the schedule is not checked",
    "not_applicable": "the host event cannot happen at this point (the page is not "
                      "swapped out, its page-in is in flight, nothing to revoke)",
}

STYLE = """
:root { --breaks: #c62828; --breaks-bg: #fdecea; --ok: #2e7d32; --ok-bg: #e8f5e9;
  --refused: #9a5b00; --refused-bg: #fff3e0; --not_applicable: #546e7a;
  --not_applicable-bg: #eceff1; --line: #d0d4d8; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329;
  margin: 0; background: #f6f7f9; }
main { max-width: 1400px; margin: 0 auto; padding: 18px 28px 60px; }
h1 { font-size: 22px; margin: 6px 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; }
code, pre, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
.verdict { font-size: 17px; font-weight: 600; padding: 10px 14px; border-radius: 6px;
  border-left: 6px solid var(--ok); background: var(--ok-bg); }
.verdict.breaks { border-color: var(--breaks); background: var(--breaks-bg); }
table.params { border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
table.params th { text-align: left; font-weight: 600; padding: 4px 12px; color: #445;
  vertical-align: top; white-space: nowrap; }
table.params td { padding: 4px 12px; word-break: break-word; }
.note { background: #fff8e1; border-left: 5px solid #f9a825; padding: 8px 12px; }
.minimal { background: #fff; border: 2px solid var(--breaks); border-radius: 6px;
  padding: 8px 14px; }
.legend { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px;
  background: #fff; border: 1px solid var(--line); padding: 10px 14px; margin: 0; }
.legend dt { font-weight: 600; } .legend dd { margin: 0; color: #333; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
  vertical-align: -2px; margin-right: 6px; border: 1px solid #0003; }
.symbols { background: #fff; border: 1px solid var(--line); padding: 8px 14px;
  white-space: pre; overflow-x: auto; }
.controls { display: flex; gap: 18px; align-items: center; flex-wrap: wrap;
  margin-bottom: 10px; }
.controls input[type=search] { width: 380px; padding: 6px 10px; font-size: 14px; }
details.group { background: #fff; border: 1px solid var(--line); border-left: 6px solid;
  margin: 0 0 6px; border-radius: 4px; }
details.group > summary { display: grid; grid-template-columns: minmax(0, 1fr) 96px 110px 300px;
  gap: 10px; padding: 6px 10px 6px 26px; cursor: pointer; list-style: none;
  align-items: baseline; position: relative; }
details.group > summary::-webkit-details-marker { display: none; }
details.group > summary::before { content: "\\25B8"; position: absolute; left: 9px; top: 6px;
  color: #556; }
details.group[open] > summary::before { content: "\\25BE"; }
.st-breaks { border-left-color: var(--breaks) !important; }
.st-ok { border-left-color: var(--ok) !important; }
.st-refused { border-left-color: var(--refused) !important; }
.st-not_applicable { border-left-color: var(--not_applicable) !important; }
.status { font-weight: 700; } .status.breaks { color: var(--breaks); }
.status.ok { color: var(--ok); } .status.refused { color: var(--refused); }
.status.not_applicable { color: var(--not_applicable); }
ul.failures { margin: 0 10px 6px 26px; padding: 0; }
ul.failures li { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px;
  color: var(--breaks); list-style: square; }
ul.failures li.invariant { font-weight: 600; }
.group-body { padding: 0 12px 10px 22px; }
table.schedules { border-collapse: collapse; width: 100%; font-size: 13px; }
table.schedules th { text-align: left; border-bottom: 1px solid var(--line); padding: 3px 6px; }
table.schedules td { border-bottom: 1px solid #eee; padding: 3px 6px; vertical-align: top; }
a.to-timeline { font-weight: 600; }
details.timeline { background: #fff; border: 1px solid var(--line); border-radius: 4px;
  margin: 0 0 10px; }
details.timeline > summary { padding: 8px 12px; cursor: pointer; font-weight: 600; }
.timeline-body { padding: 0 14px 12px; }
ol.lines { list-style: none; padding: 0; margin: 6px 0; font-family: "DejaVu Sans Mono", Menlo,
  Consolas, monospace; font-size: 12.5px; }
ol.lines li { white-space: pre; padding: 1px 4px 1px 20px; position: relative; }
ol.lines details.frame > summary { list-style: none; }
ol.lines details.frame > summary::-webkit-details-marker { display: none; }
ol.lines details.frame > summary::before { content: "\\25B8"; position: absolute; left: 4px;
  color: #0d47a1; }
ol.lines details.frame[open] > summary::before { content: "\\25BE"; }
ol.lines li.k-deliver { color: #0d47a1; } ol.lines li.k-iret { color: #37474f; }
ol.lines li.k-arrival { color: #00838f; } ol.lines li.k-end { font-weight: 700; }
ol.lines li.k-bad { color: var(--breaks); font-weight: 600; background: var(--breaks-bg); }
ol.lines li.repeat { background: #f3f0ff; }
ol.lines details.frame > summary { cursor: pointer; }
.picture { overflow-x: auto; margin: 4px 0 8px 20px; }
.stuck { color: var(--breaks); font-weight: 700; }
.hint { color: #667; font-size: 13px; }
footer { margin-top: 40px; color: #778; font-size: 13px; }
"""

SCRIPT = """
function applyFilter() {
  const q = document.getElementById('filter').value.trim().toLowerCase();
  const on = new Set(Array.from(document.querySelectorAll('input.st-toggle:checked'),
                                c => c.value));
  let shown = 0;
  for (const g of document.querySelectorAll('details.group')) {
    const show = on.has(g.dataset.status) && (!q || g.dataset.text.includes(q));
    g.hidden = !show;
    if (show) shown += 1;
  }
  document.getElementById('shown').textContent = shown;
}
function openTimeline(id) {
  const t = document.getElementById(id);
  if (t) { t.open = true; }
}
document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('filter').addEventListener('input', applyFilter);
  for (const c of document.querySelectorAll('input.st-toggle')) {
    c.addEventListener('change', applyFilter);
  }
  for (const a of document.querySelectorAll('a.to-timeline')) {
    a.addEventListener('click', () => openTimeline(a.getAttribute('href').slice(1)));
  }
  if (location.hash) { openTimeline(location.hash.slice(1)); }
  applyFilter();
});
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _failures(failures: Sequence[str]) -> str:
    if not failures:
        return ""
    items = "".join(f"<li class='{'invariant' if f.startswith('invariant ') else 'expect'}'>"
                    f"{_e(f)}</li>" for f in failures)
    return f"<ul class='failures'>{items}</ul>"


def _key(f: Finding) -> tuple[str, tuple[str, ...]]:
    return f.outcome, f.failures


def _parameters(e: Exploration) -> str:
    s = e.settings
    how = (f"{s.random} random schedules of 1..{s.max_events} events (seed {s.seed}); the "
           "first failing one shrunk to a minimal one" if s.random is not None else
           "one event at every point" if len(s.events) == 1 else
           "every ordered pair of points (the second at or after the first)")
    rows = [
        ("scenario", f"<code>{_e(s.scenario)}</code>"),
        ("window", f"<code>{_e(s.window)}</code>: {len(e.plan.window.points)} points "
                   "(instruction boundaries of the undisturbed run)"),
        ("events", ", ".join(f"<code>{_e(ev)}</code>" for ev in s.events)),
        ("schedules", _e(how)),
        ("seed", _e(s.seed) if s.random is not None else "- (not a random search)"),
        ("invariants", ", ".join(f"<code>{_e(i)}</code>" for i in s.invariants) or "none"),
        ("expectations", "the scenario's <code>[[expect]]</code> entries, each where its "
                         "scope says" if s.expectations else
                         "not checked (<code>--invariants-only</code>)"),
        ("host events", "forced where the schedule puts them (<code>--force</code>)" if s.force
         else "asked of the host's policy at each point (refused points are not checked)"),
        ("mode", _e(s.mode or "the scenario's own")),
        ("budget", _e(f"{s.budget} instructions per event on top of twice the undisturbed run's"
                      if s.budget is not None else "the scenario's own limits")),
    ]
    if s.command:
        rows.append(("command line", f"<code>{_e(s.command)}</code>"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='params' id='parameters'>{body}</table>"


def _legend() -> str:
    statuses = "".join(
        f"<dt><span class='swatch' style='background: var(--{st})'></span>"
        f"<span class='status {st}'>{_e(STATUS_TEXT[st])}</span></dt><dd>{_e(STATUS_HELP[st])}</dd>"
        for st in STATUSES)
    points = ("<dt><code>label (#k)</code></dt><dd>a point: execution about to run the "
              "instruction at that address for the k-th time in the run (loops and "
              "re-entered handlers give each arrival a point of its own)</dd>"
              "<dt><code>a .. b</code></dt><dd>a row covers consecutive schedules that end the "
              "same way, from a to b; open it for one row per schedule</dd>"
              "<dt><code>invariant ...</code> / <code>[[expect]] #n</code></dt><dd>what broke: "
              "the invariants first (they name the mechanism), then the scenario's "
              "expectations</dd>")
    symbols = "\n".join(LEGEND)
    return (f"<section id='legend'><h2>Legend</h2><dl class='legend'>{statuses}{points}</dl>"
            f"<h3>Timelines</h3><div class='symbols mono'>{_e(symbols)}</div></section>")


def _group(g: Group, timeline_of: Callable[[Finding], str | None]) -> str:
    rows = []
    for f in g.findings:
        insns = " / ".join(p.insn for p in f.schedule)
        link = timeline_of(f)
        extra = f" <a class='to-timeline' href='#{link}'>timeline</a>" if link else ""
        result = f.declined.text if f.declined is not None else \
            (_failures(f.failures) or "ok")
        rows.append(f"<tr><td><code>{_e(f.name)}</code></td><td><code>{_e(insns)}</code></td>"
                    f"<td>{_e(f.outcome)}</td><td>{result}{extra}</td></tr>")
    link = timeline_of(g.head)
    to = (f"<p><a class='to-timeline' href='#{link}'>the timeline of this counterexample</a>"
          "</p>" if link else "")
    text = " ".join([g.label, *g.failures, g.result, *(f.name for f in g.findings)]).lower()
    return (f"<details class='group st-{g.status}' data-status='{g.status}' "
            f"data-text='{_e(text)}'><summary><code>{_e(g.label)}</code>"
            f"<span>{len(g.findings)} sched.</span><span>{_e(g.outcome)}</span>"
            f"<span class='status {g.status}'>{_e(g.result)}</span></summary>"
            f"<div class='group-body'>{_failures(g.failures)}{to}"
            "<table class='schedules'><tr><th>schedule</th><th>instruction(s)</th>"
            f"<th>outcome</th><th>result</th></tr>{''.join(rows)}</table></div></details>")


def _line_class(kind: str, text: str) -> str:
    if kind in ("frame_overwritten", "delivery_fault", "iret_fault", "shutdown") \
            or "WRONG" in text:
        return "k-bad"
    if kind in ("nmi_pending", "nmi_latched", "nmi_dropped", "interrupt_pending",
                "ept_revoke", "host_declines"):
        return "k-arrival"
    return f"k-{kind}"


def _timeline(e: Exploration, f: Finding, ident: str, title: str) -> str:
    """One counterexample run again from the start: its timeline, pictures and verdict."""
    captured: dict[str, tuple[dict[int, bytes], dict[int, bytes]]] = {}

    def observe(m: Any) -> None:
        captured["frames"] = capture(m)

    sc, result = replay(e.plan, f.events, f.schedule, observe=observe)
    assert sc.machine is not None
    sym = Symbolizer(sc.symbols, hide=HIDDEN_SYMBOLS, disasm=sc.machine.disassemble)
    records = result.trace.records
    gates, tss = captured["frames"]
    pics = pictures(records, sym, gates, tss)  # one per `deliver` record, in order
    deliver_index = {int(r["seq"]): i for i, r in
                     enumerate(r for r in records if r["kind"] == "deliver")}
    levels = depths(records)
    items = []
    shown_pictures = 0
    for start, period, count in repeats(records):
        block = range(start, start + period)
        last = records[start + period * count - 1]
        first = records[start]
        stamp = str(first["icount"]) if count == 1 else f"{first['icount']}..{last['icount']}"
        if count > 1:
            head = f"{count} \u00d7 " + ("" if period == 1 else
                                         f"the {period} records below, in turn:")
            if period > 1:
                items.append(f"<li class='repeat'>{_e(f'{stamp:>10}  {head}')}</li>")
        for n, i in enumerate(block):
            r = records[i]
            lines, nested = record_lines(r, sym)
            pad = "  " * levels[i] if nested else ""
            prefix = f"{count} \u00d7 " if count > 1 and period == 1 else ""
            col = stamp if (n == 0 and (count == 1 or period == 1)) else ""
            if count > 1 and period > 1:
                col, pad = "", pad + "  "
            text = "\n".join([f"{col:>10}  {pad}{prefix}{lines[0]}"]
                             + [f"{'':>10}  {pad}{line}" for line in lines[1:]])
            cls = _line_class(str(r["kind"]), text) + (" repeat" if count > 1 else "")
            seq = int(r["seq"])
            if r["kind"] == "deliver" and shown_pictures < MAX_PICTURES:
                shown_pictures += 1
                pic = pics[deliver_index[seq]]
                items.append(f"<li class='{cls}'><details class='frame'"
                             f"{' open' if pic.overwrites else ''}><summary>{_e(text)}"
                             f"</summary><div class='picture'>{svg(pic)}</div></details></li>")
            else:
                items.append(f"<li class='{cls}'>{_e(text)}</li>")
    verdict = stuck(records, sym)
    more = len(deliver_index) - shown_pictures
    notes = (f"<p class='stuck'>verdict: {_e(verdict)}</p>" if verdict else "") + (
        f"<p class='hint'>{more} more deliveries without a picture</p>" if more > 0 else "")
    return (f"<details class='timeline' id='{ident}'><summary>{_e(title)}</summary>"
            f"<div class='timeline-body'><p>Schedule <code>{_e(f.name)}</code>, run again "
            f"from the start: outcome <b>{_e(result.outcome)}</b>"
            f"{_e(' (' + result.reason + ')') if result.reason else ''}. Click a delivery "
            "for the picture of its frame (those that overwrote a live frame are open).</p>"
            f"{_failures(f.failures)}<ol class='lines'>{''.join(items)}</ol>{notes}"
            f"<p class='hint'>{_e(HINT)}</p></div></details>")


def render(e: Exploration) -> str:
    """The report of exploration `e` as one HTML page (module docstring)."""
    s = e.settings
    findings = e.findings
    bad = e.breaking
    gs = groups(findings)
    # The counterexamples: the minimal schedule first, then the first schedule of each
    # distinct (outcome, failures) among the breaking ones, in schedule order.
    chosen: list[Finding] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for f in ([e.minimal] if e.minimal is not None else []) + \
            [f for f in findings if f.status == "breaks"]:
        if _key(f) not in seen:
            seen.add(_key(f))
            chosen.append(f)
    distinct = len(chosen)
    chosen = chosen[:MAX_TIMELINES]
    ids = {_key(f): f"cx-{i + 1}" for i, f in enumerate(chosen)}

    def timeline_of(f: Finding) -> str | None:
        return ids.get(_key(f)) if f.status == "breaks" else None

    name = s.scenario.name
    verdict = summary(findings)
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>idtlab explore: {_e(name)}</title><style>{STYLE}</style>"
             f"<script>{SCRIPT}</script></head><body><main>",
             f"<h1>idtlab explore: {_e(name)}</h1>",
             f"<p class='verdict{' breaks' if bad else ''}' id='verdict'>{_e(verdict)}</p>",
             "<h2>What was explored</h2>", _parameters(e)]
    if e.baseline:
        parts.append("<p class='note' id='baseline'><b>Note:</b> the run without the "
                     "explorer's events already breaks; every schedule inherits this:</p>"
                     + _failures(e.baseline))
    if e.minimal is not None:
        m = e.minimal
        link = ids.get(_key(m))
        parts.append(f"<h2>Minimal failing schedule</h2><div class='minimal' id='minimal'>"
                     f"<p><code>{_e(m.name)}</code> (outcome {_e(m.outcome)}): the first "
                     "failing random schedule, shrunk (events dropped, then each moved to "
                     "the earliest point where it still fails).</p>" + _failures(m.failures)
                     + (f"<p><a class='to-timeline' href='#{link}'>its timeline</a></p>"
                        if link else "") + "</div>")
    elif s.random is not None:
        parts.append("<h2>Minimal failing schedule</h2><p id='minimal'>No random schedule "
                     "fails.</p>")
    parts.append(_legend())
    toggles = "".join(
        f"<label><input type='checkbox' class='st-toggle' value='{st}' checked> "
        f"<span class='status {st}'>{_e(STATUS_TEXT[st])}</span> "
        f"({sum(f.status == st for f in findings)})</label>" for st in STATUSES)
    parts.append("<section id='results'><h2>Schedules</h2><div class='controls'>"
                 "<input type='search' id='filter' placeholder='filter: a point, an "
                 "instruction, a failure...' aria-label='filter'>"
                 f"{toggles}<span><span id='shown'>{len(gs)}</span> of {len(gs)} rows</span>"
                 "</div>" + "".join(_group(g, timeline_of) for g in gs) + "</section>")
    parts.append("<section id='timelines'><h2>Counterexamples</h2>")
    if not chosen:
        parts.append("<p>No schedule breaks an expectation or invariant.</p>")
    for i, f in enumerate(chosen):
        first = f.failures[0] if f.failures else f.outcome
        parts.append(_timeline(e, f, f"cx-{i + 1}", f"Counterexample {i + 1}: {f.name} "
                                                  f"\u2014 {first}"))
    if distinct > len(chosen):
        parts.append(f"<p class='hint'>{distinct - len(chosen)} more distinct "
                     "counterexamples without a timeline (idtlab explore --json lists every "
                     "schedule).</p>")
    parts.append("</section>")
    params = "<br>".join(_e(line) for line in parameters(e))
    parts.append(f"<footer>idtlab explore report. {params}</footer></main></body></html>\n")
    return "".join(parts)
