"""Every code block of README.md and docs/*.md runs here, as written.

- ``python`` blocks run in order, one namespace per page, so a page can build
  on its earlier blocks. A block preceded by the line
  ``<!-- runs on 2 processes -->`` runs on 2 gloo processes instead
  (``ignite_ema.run_on_processes``), on its own.
- ``bash`` blocks hold commands for a shell; each ``tox -e NAME`` must name an
  environment of tox.ini and each ``python -m MODULE`` a module that imports.
  (CI itself runs ``tox``, the README's test command.)
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import runpy
import shlex
import warnings
from pathlib import Path

import pytest

from ignite_ema import run_on_processes

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_TWO_PROCESSES = "<!-- runs on 2 processes -->"


def _blocks(page: Path) -> list[tuple[str, str, bool]]:
    """(language, code, on two processes) of each fenced block of a page."""
    text = page.read_text()
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        found.append((match[1], match[2], bool(before) and before[-1].strip() == _TWO_PROCESSES))
    return found


def _run_file(path: str) -> None:
    runpy.run_path(path, run_name="__docs__")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [(code, two) for language, code, two in _blocks(page) if language == "python"]
    if not blocks:
        pytest.skip(f"{page.name} has no python block")
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays in the test's folder
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for index, (code, on_two_processes) in enumerate(blocks):
        if on_two_processes:
            script = tmp_path / f"block{index}.py"
            script.write_text(code)
            run_on_processes(2, _run_file, str(script))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a page may show a warning on purpose
            exec(compile(code, f"{page.name}, python block {index + 1}", "exec"), namespace)


def _tox_envs() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "tox.ini")
    return {section.split(":", 1)[1] for section in parser.sections() if section.startswith("testenv:")}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_bash_blocks_name_what_exists(page: Path) -> None:
    commands = [line for lang, code, _ in _blocks(page) if lang == "bash" for line in code.splitlines() if line.strip()]
    if not commands:
        pytest.skip(f"{page.name} has no bash block")
    envs = _tox_envs()
    for line in commands:
        words = shlex.split(line.split("#", 1)[0])
        for i, word in enumerate(words):
            if word == "-e" and words[i - 1] == "tox":
                assert words[i + 1] in envs, (page.name, line)
            if word == "-m" and words[i - 1] == "python":
                assert importlib.util.find_spec(words[i + 1]) is not None, (page.name, line)
