"""Teaching labs: graded exercises from a first IDT gate to the nested-NMI, async-#PF and
#VE re-arm races (`idtlab lab list|start|check|show|new`).

What makes them different from a handout and a `make grade`: a check can hand the
student's handler to the race explorer, which puts an event at *every* instruction
boundary of a window (or every ordered pair of boundaries for two events) and checks the
lab's expectations after each schedule. A handler that passes survives every schedule
the lab's events allow, not only the one the teacher thought of; a handler that fails is
shown the first boundary and event that broke it, the run's timeline, and a picture of
the stack at every delivery (`pictures`: the slots pushed, which stack, RSP before and
after, the gate decoded, an overwritten frame's old and new values).

Modules:
  folder    a lab folder (lab.toml, lesson.md, starter/, checks/): load and validate
  runner    the only door to idtlab.scenario / idtlab.explore / idtlab.trace
  grading   checks -> points and messages; progress in the student's directory
  pictures  stack and gate pictures, SVG and plain text
  markdown  the lessons' Markdown subset -> HTML
  page      `lab show`: one self-contained HTML page
  cli       the `idtlab lab` commands
  invariants  explorer invariants the built-in labs use (MODULE:FUNCTION)

The built-in labs are package data in `catalog/`; teachers point `--labs-dir` at their
own folder of labs (format: docs/labs.md). Reference solutions live in the project's
tests (tests/labs/), not in the installed package.
"""
