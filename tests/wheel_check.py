"""The package as a stranger gets it: ``tox -e wheel`` runs this in a fresh venv that holds the built wheel alone.

Not a pytest module (no ``test_`` prefix): it needs the installed wheel and no extras, which tox's ``wheel``
environment sets up, and ``python -I``, so that neither the script's folder nor PYTHONPATH puts the source tree on
``sys.path``. It checks that

- ``ignite_ema`` and each of its modules import from the installed wheel, and every third-party module the
  package's source imports is a declared dependency (not an extra);
- the wheel carries LICENSE;
- the python blocks of README.md's "Use" section, read from the README now, run;
- an sdist built by ``python -m build --sdist`` carries LICENSE and CHANGELOG.md and no test module (the tests
  need tests/helpers.py and examples/, which the sdist does not ship, so shipped alone they could not run).

Usage: ``python -I tests/wheel_check.py REPOSITORY_ROOT``; it works in a temporary folder outside the repository.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

DIST = "ignite-ema"
PACKAGE = "ignite_ema"
_EXTRA = re.compile(r"\bextra\s*==")  # a requirement of an extra, not of the package
_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]")  # what ends a requirement's name: "torch>=2.6,<3" -> "torch"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def check_imports() -> None:
    """The installed package imports only declared dependencies, from site-packages, every module of it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{PACKAGE} is not installed")
    location = Path(spec.origin).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if not location.is_relative_to(site):
        raise SystemExit(f"{PACKAGE} would be imported from {location}, not from the installed wheel under {site}")

    # read before importing, so that an undeclared dependency is named rather than met as an ImportError
    requires = importlib.metadata.requires(DIST) or []
    declared = {_canonical(_NOT_NAME.split(req, maxsplit=1)[0]) for req in requires if not _EXTRA.search(req)}
    providers = importlib.metadata.packages_distributions()
    undeclared = set()
    for source in sorted(location.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top in (PACKAGE, "__future__"):
                    continue
                dists = {_canonical(d) for d in providers.get(top, [])}
                if not dists & declared:
                    undeclared.add(f"{source.name} imports {top} (installed by {sorted(dists) or 'nothing'})")
    if undeclared:
        raise SystemExit(f"imports that install_requires ({sorted(declared)}) does not declare: {sorted(undeclared)}")

    package = importlib.import_module(PACKAGE)
    # `import ignite_ema` may load its modules lazily: import each one
    for module in pkgutil.walk_packages(package.__path__, f"{PACKAGE}."):
        importlib.import_module(module.name)
    print(f"ok: {PACKAGE} {package.__version__} imports from {location}, dependencies {sorted(declared)}", flush=True)


def check_wheel_license() -> None:
    """The installed distribution's files (the wheel's RECORD) hold the BSD-3-Clause LICENSE."""
    files = importlib.metadata.files(DIST) or []
    licenses = [f for f in files if f.name == "LICENSE" and f.parts[0].endswith(".dist-info")]
    if not licenses:
        metadata = [str(f) for f in files if f.parts[0].endswith(".dist-info")]
        raise SystemExit(f"the wheel carries no LICENSE; its metadata files: {metadata}")
    text = licenses[0].read_text()
    if "Redistribution and use in source and binary forms" not in text:
        raise SystemExit(f"the wheel's {licenses[0]} is not the BSD-3-Clause text")
    print(f"ok: the wheel carries {licenses[0]}", flush=True)


def use_blocks(readme: str) -> list[str]:
    """The python blocks of the README's "## Use" section, up to the next "## " heading."""
    start = readme.find("\n## Use\n")
    if start < 0:
        raise SystemExit('README.md has no "## Use" section')
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end >= 0 else len(readme)]
    blocks = [match[2] for match in _FENCE.finditer(section) if match[1] == "python"]
    if not blocks:
        raise SystemExit('README.md\'s "## Use" section has no python block')
    return blocks


def run_readme_usage(root: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for index, code in enumerate(use_blocks((root / "README.md").read_text())):
        exec(compile(code, f"README.md, Use, python block {index + 1}", "exec"), namespace)
    print("ok: README.md's Use section runs against the installed wheel", flush=True)


def check_sdist(root: Path) -> None:
    """``python -m build --sdist`` (isolated, as a release is built) holds LICENSE, CHANGELOG.md, no test module."""
    with tempfile.TemporaryDirectory() as out:
        built = subprocess.run(
            [sys.executable, "-m", "build", "--sdist", "--outdir", out, str(root)], capture_output=True, text=True
        )
        if built.returncode != 0:
            raise SystemExit(f"python -m build --sdist failed:\n{built.stdout}{built.stderr}")
        (archive,) = Path(out).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            # members are "ignite_ema-0.1.0/<path>"
            names = {Path(*Path(member).parts[1:]) for member in tar.getnames() if len(Path(member).parts) > 1}
    missing = [name for name in ("LICENSE", "CHANGELOG.md") if Path(name) not in names]
    tests = sorted(
        str(name)
        for name in names
        if "tests" in name.parts or name.name.startswith("test_") or name.name in ("conftest.py", "helpers.py")
    )
    if missing or tests:
        raise SystemExit(f"{archive.name}: missing {missing}; test files that could not run from it: {tests}")
    print(f"ok: {archive.name} holds LICENSE and CHANGELOG.md and no tests")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = Path(sys.argv[1]).resolve()
    source_paths = [entry for entry in sys.path if Path(entry or ".").resolve() in (root, root / "tests")]
    if source_paths:
        raise SystemExit(f"the source tree is on sys.path ({source_paths}): run this with python -I")
    with tempfile.TemporaryDirectory() as outside:
        os.chdir(outside)  # whatever the README's code writes lands outside the repository
        check_imports()
        check_wheel_license()
        run_readme_usage(root)
        check_sdist(root)


if __name__ == "__main__":
    main()
