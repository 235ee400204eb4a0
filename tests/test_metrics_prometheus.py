"""A real Prometheus scraping a running `sectors run --metrics` engine, and the CLI's checks.

Needs Debian's `prometheus` package (`prometheus` and `promtool`; `.ci/run` installs it); the
tests that use the server skip without it. Every wait polls something observable (a printed
line, Prometheus's HTTP API) with a deadline, and the spawn fixture kills every process.
Prometheus listens on a port the kernel picks (and logs): a port chosen beforehand could be
taken by another process before Prometheus binds it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import HANG_GUARD, Spawner, until

SIM = '[miner]\nsealer = "sim"\nblock_time = 0.1\n'
SECTORS = 3
METRICS_LINE = r"metrics: http://(127\.0\.0\.1:\d+)/metrics"
#: Prometheus's log line with the address it really listens on (the port it was given is 0).
LISTENING = r'msg="Listening on" address=(127\.0\.0\.1:\d+)'


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=HANG_GUARD) as resp:
        return str(resp.read().decode())


def _query(api: str, promql: str) -> list[dict[str, object]] | None:
    """An instant query's result vector, or None while Prometheus cannot answer yet."""
    url = f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        body = json.loads(_get(url))
    except OSError:
        return None
    if body.get("status") != "success":
        return None
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def test_prometheus_reads_the_engine_s_proving_count(spawn: Spawner, tmp_path: Path) -> None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        pytest.skip("prometheus not installed (Debian package prometheus; .ci/run installs it)")
    repo = tmp_path / "repo"
    config = tmp_path / "sectors.toml"
    config.write_text(SIM)
    engine = spawn.python(
        "-m",
        "sectorfsm",
        "run",
        "--config",
        config,
        "--pledge",
        str(SECTORS),
        "--metrics",
        "127.0.0.1:0",
        env=_env(repo),
        name="engine",
    )
    target = engine.wait_for_line(METRICS_LINE, anywhere=True).group(1)
    for n in range(1, SECTORS + 1):
        engine.wait_for_line(rf"sector {n}: .*-> Proving\b", anywhere=True)

    # The live exposition is valid, lint included.
    exposition = _get(f"http://{target}/metrics").encode()
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=HANG_GUARD
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout.decode()

    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: sectorfsm\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    server = spawn(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--web.listen-address=127.0.0.1:0",
        ],
        name="prometheus",
        cwd=tmp_path,
    )
    api = f"http://{server.wait_for_line(LISTENING).group(1)}"
    # (Two goroutines log these lines: either may come first.)
    server.wait_for_line("Server is ready to receive web requests", anywhere=True)

    def proving() -> float | None:
        result = _query(api, 'sectorfsm_sectors{job="sectorfsm",state="Proving"}')
        if not result:
            return None  # not scraped yet
        value = result[0]["value"]
        assert isinstance(value, list)
        return float(value[1])

    seen = until(lambda: proving() == SECTORS or None, "Proving sectors in Prometheus")
    listed = subprocess.run(
        [sys.executable, "-m", "sectorfsm", "list", "--json"],
        env=_env(repo),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert listed.returncode == 0, listed.stderr
    in_list = sum(1 for s in json.loads(listed.stdout) if s["state"] == "Proving")
    assert seen and in_list == SECTORS
    # Counters reach Prometheus too: one PC1 job per sector, labelled by worker.
    jobs = until(
        lambda: _query(api, 'sum(sectorfsm_sched_job_duration_seconds_count{task="PC1"})'),
        "PC1 job count in Prometheus",
    )
    assert float(jobs[0]["value"][1]) == SECTORS  # type: ignore[index]


def test_a_taken_port_is_refused_before_the_engine_starts(spawn: Spawner, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = spawn.run(
            [sys.executable, "-m", "sectorfsm", "run", "--metrics", f"127.0.0.1:{port}"],
            env=_env(repo),
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen there" in lines[0], done.stderr
    assert not repo.exists()  # the engine never started: nothing was created


def test_a_bad_address_in_the_config_is_one_line(spawn: Spawner, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    config = tmp_path / "sectors.toml"
    config.write_text('[metrics]\nlisten = "localhost"\n')
    done = spawn.run([sys.executable, "-m", "sectorfsm", "run", "--config", config], env=_env(repo))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: {config}: [metrics] listen: expected HOST:PORT with a port from 0 to 65535, "
        "got 'localhost'"
    )
    assert not repo.exists()
    bad_flag = spawn.run(
        [sys.executable, "-m", "sectorfsm", "run", "--metrics", "127.0.0.1:x"], env=_env(repo)
    )
    assert bad_flag.returncode == 1
    assert bad_flag.stderr.strip().splitlines() == [
        "error: metrics address: expected HOST:PORT with a port from 0 to 65535, got '127.0.0.1:x'"
    ]
    assert not repo.exists()
