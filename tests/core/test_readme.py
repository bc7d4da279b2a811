"""The README's result tables are generated from the committed reports, not written by
hand: each block between `spheregen report NAME` markers equals what `spheregen report
EXPERIMENT --readme README.md` writes from reports/NAME/ (and the report's rows are
current for the experiment file, or read_results refuses them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spheregen.experiment import load_experiment
from spheregen.report import readme_block, readme_markers, update_readme
from spheregen.errors import SpheregenError
from spheregen.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"<!-- spheregen report ([a-z0-9_-]+): generated", README)
EXPERIMENTS = {load_experiment(p).name: p for p in (ROOT / "experiments").glob("*.toml")}


def test_the_readme_has_generated_blocks():
    assert "quickstart" in BLOCKS


@pytest.mark.parametrize("name", BLOCKS)
def test_readme_block_equals_the_committed_report(name, tmp_path):
    ws = Workspace(load_experiment(EXPERIMENTS[name]), tmp_path / "runs", ROOT / "reports")
    begin, end = readme_markers(ws)
    shown = README.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == readme_block(ws).strip(), (
        f"README's {name} tables differ from reports/{name}/: run "
        f"`spheregen report {EXPERIMENTS[name].relative_to(ROOT)} --readme README.md`")


def test_update_readme_needs_the_markers(tmp_path):
    ws = Workspace(load_experiment(EXPERIMENTS["quickstart"]), tmp_path / "runs", ROOT / "reports")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    with pytest.raises(SpheregenError, match="no block to fill"):
        update_readme(ws, readme)
    begin, end = readme_markers(ws)
    readme.write_text(f"before\n{begin}\nold\n{end}\nafter\n")
    update_readme(ws, readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert readme_block(ws) in text
