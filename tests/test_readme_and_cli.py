"""The README's example and the CLI entry points work as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_block(block: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_readme_python_examples_run(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    miner = next(b for b in blocks if "Miner.open" in b)
    assert _run_block(miner, tmp_path) == "Proving 1 True"
    engine = next(b for b in blocks if "StateGroup(" in b)
    assert _run_block(engine, tmp_path) == "Order(state='Done', paid=10)"


def test_readme_config_example_is_valid(tmp_path: Path) -> None:
    from sectorfsm.cli.runconfig import load_run_config

    text = (ROOT / "README.md").read_text()
    [toml] = re.findall(r"```toml\n(.*?)```", text, re.S)
    path = tmp_path / "sectors.toml"
    path.write_text(toml)
    cfg = load_run_config(path)
    assert cfg.sealer == "reference" and cfg.workers is not None
    assert cfg.workers[0].name == "pc1-box"


def test_readme_statechart_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    embedded = text.split("<!-- statechart:begin -->\n```mermaid\n", 1)[1].split("```\n<!--", 1)[0]
    assert embedded == (ROOT / "statecharts" / "lifecycle.mmd").read_text()


def test_quickstart_commands_are_the_documented_ones() -> None:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, re.S)
    assert commands == [
        "pip install -e . && sectors run --pledge 3 --until-proving",
        "pip install -e '.[test]' && pytest",
    ]
    assert "pip install -e '.[test]' && pytest" in (ROOT / ".ci" / "run").read_text()


def test_python_m_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sectorfsm", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.startswith("sectorfsm ")


def test_demo_resumes_from_its_repo(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "sectorfsm", "demo", "--repo", str(tmp_path / "r")]
    first = subprocess.run([*cmd, "-n", "30"], capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert re.search(r"Proving\s*│\s*30", first.stdout), first.stdout
    second = subprocess.run(
        [*cmd, "-n", "45"], capture_output=True, text=True, env=env, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert re.search(r"Proving\s*│\s*45", second.stdout), second.stdout


def test_demo_bad_input_is_a_clear_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sectorfsm", "demo", "--machines", "zero"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--machines" in out.stderr
