"""`sectors simulate`'s HTML report: every plot from a real small run, the bottleneck named,
the hint without matplotlib, a malformed summary refused, and the docs script still runs."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sectorfsm.cli.app import app
from sectorfsm.simulate.report import HINT, ReportError, write_report

ROOT = Path(__file__).resolve().parents[1]

CLUSTER = """
[sealing]
batch_pre_commits = false
aggregate_commits = false

[simulate]
[simulate.pledge]
mode = "rate"
per_day = 12
[simulate.faults]
worker_mtbf_hours = 12
worker_repair_hours = 2
message_failure_rate = 0.2

[[workers]]
name = "pc1-box"
cpus = 64
memory = "1TiB"
tasks = ["AP", "PC1", "FIN"]
resources = { PC1_32G_MAX_CONCURRENT = 2 }
[[workers.paths]]
id = "pc1-nvme"
capacity = "4TiB"
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

#: The title of each plot, as the SVG text shows it.
TITLES = [
    "Sectors reaching Proving per day against the bound",
    "Per-stage utilisation over time per worker",
    "Queue wait per task type",
    "Bytes fetched between workers",
    "Disk use per path over time against capacity",
    "Failures and retries by state",
]


def _simulate(tmp: Path, *extra: str) -> tuple[int, str, str]:
    config = tmp / "cluster.toml"
    config.write_text(CLUSTER)
    args = ["simulate", "--config", str(config), "--days", "1.5", "--out", str(tmp / "out")]
    result = CliRunner().invoke(app, [*args, *extra])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real small run with a what-if and faults: its out dir and stdout."""
    tmp = tmp_path_factory.mktemp("report")
    code, stdout, stderr = _simulate(tmp, "--what-if", "add-worker pc1-box")
    assert code == 0, stderr
    return tmp / "out", stdout


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, re.S)


def test_the_report_has_every_plot_with_its_title(run: tuple[Path, str]) -> None:
    out, stdout = run
    page = (out / "report.html").read_text()
    assert f"report written to {out / 'report.html'}" in stdout
    svgs = _svgs(page)
    assert len(svgs) == len(TITLES) == page.count("<svg")
    for svg, title in zip(svgs, TITLES, strict=True):
        assert title in svg, title  # text stays text (svg.fonttype none): the title is there
    summary = json.loads((out / "summary.json").read_text())
    ratios = {r["assigner"]: r["bound"]["ratio"] for r in summary["runs"][:2]}
    assert (
        f"ratio to the bound: balanced {ratios['balanced']:.2f}, lotus {ratios['lotus']:.2f}"
        in (svgs[0])
    )
    # One line per (variant, assigner) and a bound per variant in the main plot.
    for r in summary["runs"]:
        assert f"{r['variant']} / {r['assigner']}: steady" in svgs[0]
        assert f"bound ({r['variant']}): {r['bound']['per_day']:.1f}/day" in svgs[0]
    # Each plot shows its data, not an empty frame.
    assert "pc1-box (balanced)" in svgs[1] and "PC1 (2 slots" in svgs[1]
    assert "pc1-box -&gt; gpu-box" in svgs[3] or "pc1-box -> gpu-box" in svgs[3]
    assert "pc1-nvme: peak" in svgs[4] and "of 4 TiB" in svgs[4]
    assert "SealPreCommit1Failed" in svgs[5]


def test_the_report_names_the_bottleneck_and_compares_the_what_if(run: tuple[Path, str]) -> None:
    out, _ = run
    page = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for r in summary["runs"]:
        assert "PC1 on pc1-box" in r["bottleneck"]["text"] or r["variant"] != "baseline"
        assert r["bottleneck"]["text"] in page
    assert "PC1 on pc1-box is the bottleneck" in page
    [row] = re.findall(r"<tr><td>add-worker pc1-box</td><td>balanced</td>.*?</tr>", page)
    delta = summary["comparison"][0]["delta_per_day"]
    assert f"<td>{delta:+.1f}</td>" in row


def test_the_report_is_self_contained_and_reproducible(run: tuple[Path, str]) -> None:
    out, _ = run
    page = (out / "report.html").read_text()
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page  # inlined, not pasted files
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "two inlined plots share an id"
    summary = json.loads((out / "summary.json").read_text())
    again = write_report(summary, out / "again")
    assert again.read_text() == page


def test_without_matplotlib_the_json_is_written_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    code, _, stderr = _simulate(tmp_path)
    assert code == 0, stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert not (tmp_path / "out" / "report.html").exists()
    assert stderr.strip() == HINT
    assert "pip install 'sectorfsm[simulate]'" in HINT


def test_no_report_writes_only_the_json(tmp_path: Path) -> None:
    code, stdout, stderr = _simulate(tmp_path, "--no-report")
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]
    assert "report written" not in stdout and HINT not in stderr


def _break(summary: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    broken = copy.deepcopy(summary)
    *parents, last = path.split(".")
    node: Any = broken
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return broken


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema", 2, "schema: must be 1, got 2"),
        ("runs", [], "runs: List should have at least 1 item"),
        ("runs.0.sectors.proving_per_day", "many", "runs[0] sectors.proving_per_day: must be a"),
        ("runs.0.bound", KeyError, "runs[0] bound: is required"),
        ("runs.1.utilisation.sample_hours", 0, "runs[1] utilisation.sample_hours: must be grea"),
        ("runs.0.fetch.pairs.0.bytes", -1, "runs[0] fetch.pairs[0] bytes: must be greater"),
    ],
)
def test_a_malformed_summary_is_a_one_line_error_and_writes_nothing(
    run: tuple[Path, str], tmp_path: Path, path: str, value: object, message: str
) -> None:
    summary = json.loads((run[0] / "summary.json").read_text())
    with pytest.raises(ReportError) as info:
        write_report(_break(summary, path, value), tmp_path / "out")
    text = str(info.value)
    assert "\n" not in text and text.startswith("summary: ")
    assert message in text, text
    assert not (tmp_path / "out").exists()


def test_a_summary_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"^summary: "):
        write_report([1, 2], tmp_path)  # type: ignore[arg-type]
    assert not (tmp_path / "report.html").exists()


def test_sectors_without_a_report_never_imports_matplotlib() -> None:
    code = (
        "import sys\n"
        "from sectorfsm.cli.app import app\n"
        "import sectorfsm.cli.simulate, sectorfsm.simulate.report\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_docs_script_writes_the_capacity_png(tmp_path: Path) -> None:
    png = tmp_path / "capacity.png"
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "docs" / "capacity_plot.py"), "--days", "1.5"),
            *("--png", str(png), "--report", str(tmp_path / "report")),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in proc.stdout
    assert (tmp_path / "report" / "report.html").exists()


def test_the_readme_shows_the_example_cluster_the_docs_script_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- file: example-cluster.toml -->\n```toml\n(.*?)^```$", readme, re.M | re.S
    )
    assert block is not None, "the Capacity planning section lost its example config"
    assert block[1] == (ROOT / "docs" / "example-cluster.toml").read_text()
    assert "![Sectors reaching Proving per day" in readme and (ROOT / "docs/capacity.png").exists()
