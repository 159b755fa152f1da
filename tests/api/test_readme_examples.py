"""The Python examples in README.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_python_example_runs_as_written() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_raises_reports_a_quiet_instruction_as_none_and_a_fault_with_its_saved_rip() -> None:
    from idtlab import raises

    assert raises("nop") is None
    r = raises("xor ecx, ecx; div ecx")
    assert r is not None and (r.vector, r.error_code, r.rip) == (0, None, 0x100002)
