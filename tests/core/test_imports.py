"""The two import rules of built-in plugins, checked on the source of every module under
plugins/: the core only through the public toolkit (``spheregen`` / ``spheregen.api``),
and no module of another built-in plugin (a plugin package may import its own modules)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import spheregen.api

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
PACKAGE = "spheregen_plugins"  # what pyproject maps plugins/ to
TOOLKIT = {"spheregen", "spheregen.api"}
MODULES = sorted(p for p in PLUGINS.rglob("*.py"))


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join((PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``; ``from X import name`` also
    yields ``X.name``, which is the module imported when ``name`` is one."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def violations(path: Path, root: Path = PLUGINS) -> list[str]:
    own = module_name(path, root).split(".")[:2]
    where = path.relative_to(root.parent)
    out = []
    for line, target in imported(path, root):
        parts = target.split(".")
        if parts[0] == "spheregen" and target not in TOOLKIT and not _toolkit_name(parts):
            out.append(f"{where}:{line} imports the core module {target}")
        if parts[0] == PACKAGE and len(parts) > 1 and parts[:2] != own:
            out.append(f"{where}:{line} imports another plugin: {target}")
    return out


def _toolkit_name(parts: list[str]) -> bool:
    """``from spheregen import X`` / ``from spheregen.api import X`` with X a toolkit name."""
    owner, _, name = ".".join(parts).rpartition(".")
    return owner in TOOLKIT and (name in spheregen.api.__all__ or name in ("api", "hookimpl"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PLUGINS)) for p in MODULES])
def test_plugin_imports_only_the_toolkit_and_itself(path):
    assert violations(path) == []


def test_the_check_sees_both_kinds_of_violation(tmp_path):
    root = tmp_path / "plugins"
    (root / "alpha").mkdir(parents=True)
    bad = root / "alpha" / "mod.py"
    bad.write_text("from spheregen.interfaces import DataSpec\nfrom spheregen_plugins.beta import x\n"
                   "from .. import beta\nfrom spheregen.api import guided\nfrom . import own\nimport spheregen\n")
    found = violations(bad, root)
    assert [v.split(" imports ")[1] for v in found] == [
        "the core module spheregen.interfaces", "the core module spheregen.interfaces.DataSpec",
        "another plugin: spheregen_plugins.beta", "another plugin: spheregen_plugins.beta.x",
        "another plugin: spheregen_plugins.beta",
    ]


def test_toolkit_exports_exist():
    missing = [n for n in spheregen.api.__all__ if not hasattr(spheregen.api, n)]
    assert missing == []
    assert spheregen.guided is spheregen.api.guided



def test_a_core_module_imports_first_in_a_fresh_interpreter():
    """A job of `run --jobs` starts with whichever core module it needs: `from spheregen
    import fit` (or any submodule) must import that module alone, not the toolkit,
    which would import spheregen.fit half-way (a circular import)."""
    import subprocess
    import sys

    code = ("import sys\nfrom spheregen import distributed\n"
            "assert 'spheregen.api' not in sys.modules, 'the toolkit was imported for a submodule'\n"
            "import spheregen.fit\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
