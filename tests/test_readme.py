"""README.md's Python snippets run as printed: a newcomer's first code must not raise."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def run(source: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "README.md", "exec"), {})
    return printed.getvalue()


def test_readme_has_the_two_starts() -> None:
    blocks = python_blocks()
    assert len(blocks) == 2 and "LLM()" in blocks[0] and "Pipeline.launch(" in blocks[1]


def test_the_offline_start_prints_a_reply_and_the_first_steps() -> None:
    printed = run(python_blocks()[0]).splitlines()
    assert printed[0].strip(), "a reply"
    steps = printed[1:]
    assert len(steps) == 3 and "kind='prompt'" in steps[0] and "kind='decode'" in steps[1], printed


@pytest.mark.slow
def test_the_pipeline_start_runs_on_free_ports() -> None:
    source = python_blocks()[1]
    assert 'ports="auto"' in source, "the README's pipeline must not take 8001-8006 from a running server"
    printed = run(source)
    assert "worker_id" in printed and "step" in printed  # the steps frame was printed
