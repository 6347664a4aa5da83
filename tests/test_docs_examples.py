"""The Python examples of the docs pages that promise runnable ones run as written (each ```python block, in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
RUNNABLE = ["models.md"]  # the other pages' snippets are fragments (a rank's script, a call on a user's run)
EXAMPLES = [
    pytest.param(block, id=f"{path.name}-{n}")
    for path in (DOCS / name for name in RUNNABLE)
    for n, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S))
]


def test_there_are_examples():
    assert any("models.md" in p.id for p in EXAMPLES)


@pytest.mark.parametrize("code", EXAMPLES)
def test_docs_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAVISE_CACHE", str(tmp_path / "cache"))
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})
    if "# {" in code:  # an example that says what it prints
        expected = re.findall(r"print\(.*\)\s+# (.*)", code)
        assert capsys.readouterr().out.split("\n")[: len(expected)] == expected
