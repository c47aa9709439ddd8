"""The README's examples run as written: every Python block executes, every YAML block is a valid config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from phalanx.config import RunConfig, from_mapping

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_every_python_block_of_the_readme_runs_in_order(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 2  # the two Python API examples at least
    monkeypatch.chdir(tmp_path)  # a run directory an example writes lands here
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for number, code in enumerate(blocks, start=1):
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)  # noqa: S102 - our own README


def test_every_yaml_block_of_the_readme_is_a_valid_config():
    blocks = _blocks("yaml")
    assert blocks
    for code in blocks:
        from_mapping(RunConfig, yaml.safe_load(code))
