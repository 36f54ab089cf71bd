"""Every code block of README.md and docs/*.md runs here, as written.

- ``python`` blocks run in order, one namespace per page, so a page can build
  on its earlier blocks.
- A python block preceded by the line ``<!-- file: NAME -->`` is a script
  instead: it is saved as NAME and run by the page's own ``torchrun ... NAME``
  line, in a subprocess, as a user would launch it.
- ``bash`` blocks hold commands for a shell; each ``tox -e NAME`` must name an
  environment of tox.ini, each ``python -m MODULE`` a module that imports, and
  each ``torchrun`` line a script the page gives. (CI itself runs ``tox``, the
  README's test command.)
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FILE = re.compile(r"<!-- file: (\S+) -->")


def _blocks(page: Path, text: str | None = None) -> list[tuple[str, str, str | None]]:
    """(language, code, file name) of each fenced block of a page (or of ``text``, a part of it).

    The file name is NAME where the line before the block is ``<!-- file: NAME -->``, else None.
    """
    text = page.read_text() if text is None else text
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marker = _FILE.fullmatch(before[-1].strip()) if before else None
        found.append((match[1], match[2], marker[1] if marker else None))
    return found


def _commands(page: Path) -> list[list[str]]:
    """The words of each command line of a page's bash blocks, comments left out."""
    lines = [line for lang, code, _ in _blocks(page) if lang == "bash" for line in code.splitlines()]
    return [words for line in lines if (words := shlex.split(line.split("#", 1)[0]))]


def _exec_blocks(page: Path, blocks: list[str], namespace: dict[str, object]) -> None:
    for index, code in enumerate(blocks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a page may show a warning on purpose
            exec(compile(code, f"{page.name}, python block {index + 1}", "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [code for language, code, file in _blocks(page) if language == "python" and file is None]
    if not blocks:
        pytest.skip(f"{page.name} has no python block that runs in place")
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays in the test's folder
    _exec_blocks(page, blocks, {"__name__": "__docs__"})


def test_readme_use_goes_on_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training script copied from README's "Use" section leaves the swap in train mode (BatchNorm still learns)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start = text.index("\n## Use\n")
    section = text[start : text.index("\n## ", start + 1)]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    _exec_blocks(readme, [code for language, code, _ in _blocks(readme, section) if language == "python"], namespace)
    model = namespace["model"]
    assert isinstance(model, nn.Module)
    assert [name for name, module in model.named_modules() if not module.training] == []


SCRIPT_PAGES = [page for page in PAGES if any(file for _, _, file in _blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", SCRIPT_PAGES, ids=[p.name for p in SCRIPT_PAGES])
def test_scripts_run_as_launched(page: Path, tmp_path: Path) -> None:
    scripts = {file: code for _, code, file in _blocks(page) if file is not None}
    for name, code in scripts.items():
        (tmp_path / name).write_text(code)
    launches = [words for words in _commands(page) if words[0] == "torchrun"]
    assert {words[-1] for words in launches} == set(scripts), (page.name, launches, sorted(scripts))
    for words in launches:
        # torchrun is torch's console script for this module; its own process group, so a hang is killed whole
        with subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *words[1:]],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as launched:
            try:
                output, _ = launched.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                os.killpg(launched.pid, signal.SIGKILL)
                output, _ = launched.communicate()
                pytest.fail(f"{page.name}: {shlex.join(words)} ran for over 240 s\n{output}")
        assert launched.returncode == 0, f"{page.name}: {shlex.join(words)} failed\n{output}"


def _tox_envs() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "tox.ini")
    return {section.split(":", 1)[1] for section in parser.sections() if section.startswith("testenv:")}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_bash_blocks_name_what_exists(page: Path) -> None:
    commands = _commands(page)
    if not commands:
        pytest.skip(f"{page.name} has no bash block")
    envs = _tox_envs()
    scripts = {file for _, _, file in _blocks(page) if file is not None}
    for words in commands:
        if words[0] == "torchrun":
            assert words[-1] in scripts, (page.name, shlex.join(words), "launches a script the page does not give")
        for i, word in enumerate(words):
            if word == "-e" and words[i - 1] == "tox":
                assert words[i + 1] in envs, (page.name, shlex.join(words))
            if word == "-m" and words[i - 1] == "python":
                assert importlib.util.find_spec(words[i + 1]) is not None, (page.name, shlex.join(words))
