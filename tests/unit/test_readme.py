"""The README's library example runs as written and prints what it promises."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> tuple[str, str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Library example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "README has no python block under 'Library example'"
    source = code.group(1)
    promised = re.search(r"^# -> (.*)$", source, re.MULTILINE)
    assert promised is not None, "the example must state its output as '# -> ...'"
    return source, promised.group(1)


def test_readme_example_is_short_and_prints_the_promised_scores() -> None:
    source, promised = _example()
    assert len([line for line in source.splitlines() if line.strip()]) <= 10
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(source, str(README), "exec"), {})
    assert ast.literal_eval(output.getvalue().strip()) == ast.literal_eval(promised)
    assert output.getvalue().strip() == promised
