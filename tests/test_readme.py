"""The README's Python example runs as written (against the default model in the store)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path


def test_readme_python_example_runs(converted_default):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), {})
    assert "Paris" in out.getvalue()
    assert "tok/s" in out.getvalue()


def test_readme_has_exactly_two_setup_commands():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert [c.strip() for c in commands] == ["pip install -e . && skvrt chat", "pip install -e '.[test]' && pytest -q"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "pip install -e '.[test]' && pytest -q" in ci
