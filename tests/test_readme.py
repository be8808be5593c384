"""Every README example runs as written after the two set-up commands (issue 10, items 7 and 8).

The README's indented command lines that start with `onnxforge` run in order in a folder whose
`artifacts/` holds the default (tiny) builds, as after `make demo`; then its Python blocks. A line says
when it cannot run on the defaults: `# needs recipe NAME` (a full-size or real-weights recipe),
`# interactive`, or a `<placeholder>` the user fills in. Anything else must exit 0, and so must every Python
block.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SKIP = re.compile(r"#\s*(needs recipe|interactive)|<[a-z][a-z -]*>")


def readme_commands() -> list[str]:
    lines, out, pending = (REPO / "README.md").read_text().splitlines(), [], ""
    for line in lines:
        if not line.startswith("    ") or line.startswith("     ") and not pending:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if text.startswith("onnxforge "):
            out.append(text)
    return out


def runnable(cmd: str) -> bool:
    return not SKIP.search(cmd)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_the_readme_says_what_each_skipped_example_needs():
    cmds = readme_commands()
    assert len(cmds) >= 15 and sum(runnable(c) for c in cmds) >= 12
    for cmd in cmds:
        if "gpt2-medium" in cmd or "sd-v1-4" in cmd or "sam-vit-base" in cmd:
            assert not runnable(cmd), f"a full-size example must say which recipe it needs: {cmd}"


def test_readme_examples_run_as_written_on_the_default_artifacts(default_artifacts, tmp_path):
    (tmp_path / "artifacts").symlink_to(default_artifacts, target_is_directory=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])  # .venv/bin, as after activation
    failures = []
    for cmd in filter(runnable, readme_commands()):
        argv = shlex.split(cmd, comments=True)
        proc = subprocess.run([sys.executable, "-m", "onnxforge.cli", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        if proc.returncode != 0:
            failures.append(f"{cmd}\n  -> exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    assert not failures, "README examples that fail on the defaults:\n" + "\n".join(failures)
    blocks = python_blocks()  # in order, after the commands (a block may read what a command wrote)
    assert len(blocks) >= 3
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{block}\n-> {proc.stderr[-2000:]}"
