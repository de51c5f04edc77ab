"""Every example in README.md runs as written.

* Every ```python block (indented ones inside lists too) runs in its own subprocess, in an empty temporary folder,
  with only the package on ``PYTHONPATH``: a block that uses a name it does not define or import, or a file it does
  not create, fails here. A block whose failure is an optional extra that is not installed is skipped, naming it.
* Every ``deformattn ...`` line of a ```bash block parses with the real command-line parser (so a renamed or
  removed option fails here), and the quick ones run, in order, in one empty folder per block: commands that need
  a trained run (paths under ``runs/``), training itself, or minutes of work (``SLOW_COMMANDS``) are only parsed.

New README sections need nothing here: every block is found by the parser below.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK_TIMEOUT_S = 600  # generous: the machine may be shared; each block is meant to take well under 20 s alone
SLOW_COMMANDS = {"train", "eval", "export", "complexity"}  # parsed, not run (minutes, or a trained run needed)
OPTIONAL_MODULES = ("onnx", "onnxruntime", "onnxscript", "timm", "sklearn", "matplotlib", "torchvision", "yaml",
                    "tqdm", "deformable_attention", "PIL")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str
    section: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"L{self.line}-{slug}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, indentation (list items) removed."""
    blocks, lines, section = [], text.splitlines(), "top"
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", line)
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md:{i + 1}: code fence never closed")
        blocks.append(Block(lang.lower(), i + 1, "\n".join(body) + "\n", section))
        i = j + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.lang in ("python", "py")]
BASH = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console")]


def _env() -> dict[str, str]:
    src = str(REPO / "src")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
                MPLBACKEND="Agg")


def _skip_if_optional_missing(output: str) -> None:
    m = re.search(r"No module named '([\w.]+)'|pip install 'deformattn\[(\w+)\]'", output)
    if m:
        missing = (m.group(1) or "").split(".")[0]
        if missing in OPTIONAL_MODULES or (m.group(2) and not missing):
            pytest.skip(f"optional dependency not installed: {m.group(0)}")


def test_readme_has_examples():
    assert len(PYTHON) >= 5 and len(BASH) >= 3


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs_in_an_empty_folder(block, tmp_path):
    script = tmp_path.parent / f"{tmp_path.name}_readme_block.py"  # outside the working folder: it starts empty
    script.write_text(block.code, encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=BLOCK_TIMEOUT_S)
    if r.returncode != 0:
        _skip_if_optional_missing(r.stderr)
    assert r.returncode == 0, f"README.md:{block.line} ({block.section}) failed:\n{block.code}\n{r.stderr[-3000:]}"


def _commands(code: str) -> list[list[str]]:
    """The ``deformattn`` invocations of a shell block as argument lists (after ``deformattn``)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in re.split(r"\s*(?:&&|;)\s*", line.split(" #")[0].strip()):
            words = shlex.split(part) if part else []
            if words[:1] == ["deformattn"]:
                out.append(words[1:])
            elif "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["deformattn"]:
                out.append(words[words.index("-m") + 2:])
    return out


def test_every_cli_line_parses():
    from deformattn.cli import build_parser

    lines = [(b, argv) for b in BASH for argv in _commands(b.code)]
    assert len(lines) >= 8
    for block, argv in lines:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"README.md:{block.line}: 'deformattn {' '.join(argv)}' does not parse") from exc


def _quick(argv: list[str]) -> bool:
    return bool(argv) and argv[0] not in SLOW_COMMANDS and not any(a.startswith("runs/") for a in argv)


QUICK_BASH = [b for b in BASH if any(_quick(a) for a in _commands(b.code))]


@pytest.mark.parametrize("block", QUICK_BASH, ids=[b.id for b in QUICK_BASH])
def test_quick_cli_lines_run(block, tmp_path):
    for argv in _commands(block.code):
        if not _quick(argv):
            continue
        r = subprocess.run([sys.executable, "-m", "deformattn", *argv], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=BLOCK_TIMEOUT_S)
        if r.returncode != 0:
            _skip_if_optional_missing(r.stderr)
        assert r.returncode == 0, f"README.md:{block.line}: deformattn {' '.join(argv)}\n{r.stderr[-3000:]}"


def test_block_parser_handles_indented_and_unclosed_fences():
    text = "# A\n\n* item\n\n  ```python\n  import os\n  if os:\n      pass\n  ```\n\n```bash\ndeformattn info\n```\n"
    blocks = readme_blocks(text)
    assert [b.lang for b in blocks] == ["python", "bash"]
    assert blocks[0].code == "import os\nif os:\n    pass\n" and blocks[0].line == 5 and blocks[0].section == "A"
    compile(blocks[0].code, "block", "exec")
    with pytest.raises(AssertionError, match="never closed"):
        readme_blocks("```python\nx = 1\n")
    assert _commands("deformattn a --b c  # note\npip install x && deformattn d\ntorchrun -m deformattn e \\\n  --f\n") \
        == [["a", "--b", "c"], ["d"], ["e", "--f"]]
