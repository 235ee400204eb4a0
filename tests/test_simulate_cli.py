"""`sectors simulate` end to end in-process: the table and JSON, determinism, faults, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sectorfsm.cli.app import app

TINY = """
[sealing]
batch_pre_commits = false
aggregate_commits = false

[simulate]
{simulate}
[simulate.pledge]
mode = "rate"
per_day = 12
{faults}

[[workers]]
name = "pc1-box"
cpus = 64
memory = "1TiB"
tasks = ["AP", "PC1", "FIN"]
resources = {{ PC1_32G_MAX_CONCURRENT = 2 }}
[[workers.paths]]
id = "pc1-nvme"
capacity = "1PiB"
store = true

[[workers]]
name = "gpu-box"
cpus = 32
memory = "512GiB"
gpus = ["g"]
tasks = ["PC2", "C1", "C2", "FIN"]
bandwidth = "10Gbit"
[[workers.paths]]
id = "gpu-nvme"
capacity = "1PiB"
store = true
"""


def _config(tmp_path: Path, simulate: str = "", faults: str = "") -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(TINY.format(simulate=simulate, faults=faults))
    return path


def _differences(a: str, b: str) -> list[str]:
    """Where two summaries differ: run index and top-level key, for the failure message."""
    ra, rb = json.loads(a)["runs"], json.loads(b)["runs"]
    pairs = enumerate(zip(ra, rb, strict=True))
    return [f"run {i} {k}" for i, (x, y) in pairs for k in x if x[k] != y[k]]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["simulate", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_end_to_end_writes_the_summary_and_prints_the_table(tmp_path: Path) -> None:
    config = _config(tmp_path)
    out = tmp_path / "report"
    code, stdout, stderr = _run(
        "--config", str(config), "--days", "1.5", "--out", str(out),
        "--what-if", "policy pc1-box PreCommit1Max=1",
    )  # fmt: skip
    assert code == 0, stderr
    data = json.loads((out / "summary.json").read_text())
    runs = {(r["variant"], r["assigner"]) for r in data["runs"]}
    variants = ("baseline", "policy pc1-box PreCommit1Max=1")
    assert runs == {(v, a) for v in variants for a in ("balanced", "lotus")}
    base = data["runs"][0]
    assert (base["variant"], base["assigner"]) == ("baseline", "balanced")
    assert base["sectors"]["proving_total"] > 0
    assert base["bound"]["limiting"] == ["PC1"]
    # PC2 runs on gpu-box: cache and sealed files move pc1-box -> gpu-box over the link.
    assert {(p["from"], p["to"]) for p in base["fetch"]["pairs"]} == {("pc1-box", "gpu-box")}
    assert set(base["disk"]["paths"]) == {"pc1-nvme", "gpu-nvme"}
    assert base["disk"]["paths"]["pc1-nvme"]["peak"] > 0
    assert len(base["utilisation"]["workers"]["pc1-box"]["PC1"]["series"]) == 36
    assert set(base["queue_wait"]) >= {"AP", "PC1", "PC2", "C1", "C2", "FIN"}
    assert [c["delta_per_day"] is not None for c in data["comparison"]] == [True, True]
    assert "variant" in stdout and "baseline" in stdout and "PC1 on pc1-box" in stdout
    assert f"summary written to {out / 'summary.json'}" in stdout
    assert str(tmp_path) not in json.dumps(data)  # no temporary or machine paths in the JSON


def test_same_seed_gives_the_same_json(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        faults="[simulate.faults]\nworker_mtbf_hours = 12\nworker_repair_hours = 2\n"
        "message_failure_rate = 0.2",
    )
    texts = []
    for name in ("a", "b"):
        code, _, stderr = _run(
            "--config", str(config), "--days", "2", "--seed", "7", "--out", str(tmp_path / name)
        )
        assert code == 0, stderr
        texts.append((tmp_path / name / "summary.json").read_text())
    assert texts[0] == texts[1], _differences(texts[0], texts[1])
    data = json.loads(texts[0])
    failures = data["runs"][0]["failures"]
    assert sum(failures["worker_crashes"].values()) > 0
    assert sum(failures["failed_messages"].values()) > 0
    # Lost tasks and failed messages send sectors through failed states and back.
    assert failures["by_state"] and failures["retries_by_state"]


@pytest.mark.parametrize(
    ("simulate", "what_if", "message"),
    [
        ("", "add-worker no-such-box", "no worker named 'no-such-box'"),
        ("", "policy pc1-box PreCommit1Max=lots", "'lots' is not a value"),
        ("", "policy pc1-box NoSuchKey=1", "NoSuchKey"),
        ("", "remove-worker pc1-box", "expected 'add-worker NAME'"),
        ("sample_hours = -1", None, "[simulate] sample_hours"),
        ("colour = 'blue'", None, "colour"),
        ('sector_size = "3GiB"', None, "sector_size"),
        ("[simulate.durations]\nPC1 = 'soon'", None, "durations"),
        ("[simulate.durations]\nPC1 = '30h'", None, "sealing tickets expire after 24.0 h"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, simulate: str, what_if: str | None, message: str
) -> None:
    config = _config(tmp_path, simulate=simulate)
    out = tmp_path / "report"
    args = ["--config", str(config), "--out", str(out), "--days", "1"]
    if what_if is not None:
        args += ["--what-if", what_if]
    code, stdout, stderr = _run(*args)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0]
    assert not out.exists()
    assert stdout == ""


def test_pledge_mode_needs_its_figure(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(_config(tmp_path).read_text().replace("per_day = 12", ""))
    code, _, stderr = _run("--config", str(config))
    assert code == 1
    assert "[simulate.pledge] per_day: required with mode = 'rate'" in stderr


def test_help_shows_the_table_names() -> None:
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "([[workers]], [sealing]) with a [simulate] section" in result.stdout
    assert "(default: [simulate] seed, 0)" in result.stdout
