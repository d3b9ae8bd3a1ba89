"""Every ```python block of README.md runs as printed, each in a fresh namespace, on the CPU too.

Blocks are found by their fence (```python or ```py, indented or not), so a block added later is run
as well; text that must not run belongs in a ```text / ```bash fence. Blocks keep their shapes tiny.
"""
import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^([ \t]*)```(?:python|py)[ \t]*\n(.*?)^\1```[ \t]*$", re.S | re.M)
OPTIONAL = {"transformers"}          # an extra (pyproject [hf]); skip, not fail, where it is not installed


def python_blocks(text):
    """(first line number, dedented code) of each ```python block of `text`."""
    return [(text.count("\n", 0, m.start()) + 2, textwrap.dedent(m.group(2))) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_fence_parser_finds_every_python_block():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n  ```py\n  y = 2\n  ```\n```text\nz\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\n")]
    assert len(BLOCKS) >= 5                  # the README's ops, layers, GPT, retrofit and stability examples


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)              # whatever a block writes lands in a scratch directory
    try:
        exec(compile(code, f"{README.name}:{line}", "exec"), {"__name__": "__readme__"})
    except ModuleNotFoundError as e:
        if e.name not in OPTIONAL:
            raise
        pytest.skip(f"optional dependency {e.name} is not installed")
