"""Prometheus metrics of one engine (`Miner.metrics`): what is counted, read and served."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sealtools import miner, run

from sectorfsm import __version__
from sectorfsm.sealing import Miner, SectorState, StateChange
from sectorfsm.sealing.chain import ExitCode
from sectorfsm.sealing.metrics import MetricsError, MetricsServer, parse_listen
from sectorfsm.sealing.notify import StateChanges

FAST = {"retry": {"base": 30.0, "factor": 2.0, "cap": 600.0, "budget": 6}}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    """The value of one sample (KeyError naming it if absent)."""
    return got[(name, tuple(sorted(labels.items())))]


def total(got: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in got.items() if n == name and want <= set(ls))


def scrape(m: Miner) -> Samples:
    """The registry's exposition, parsed (read on the loop, as a scrape in-process is)."""
    return samples(generate_latest(m.metrics.registry).decode())


def test_metrics_start_at_first_use_and_cost_nothing_before(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            assert not m.changes.active  # no listener: the planner builds no change
            n = await m.pledge()
            await m.wait(n, "Proving")
            got = scrape(m)
            assert m.changes.active and m.metrics is m.metrics
            assert value(got, "sectorfsm_sectors", state="Proving") == 1  # levels: always
            assert total(got, "sectorfsm_sector_transitions_total") == 0  # counted from now
            n = await m.pledge()
            await m.wait(n, "Proving")
            assert total(scrape(m), "sectorfsm_sector_transitions_total", state="Proving") == 1

    run(body)


def test_a_pledge_to_proving_shows_in_every_family(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            first = scrape(m)
            assert value(first, "sectorfsm_sectors", state="Proving") == 0
            assert value(first, "sectorfsm_sched_queued_tasks", task="PC1") == 0
            numbers = [await m.pledge() for _ in range(2)]
            for n in numbers:
                await m.wait(n, "Proving")
            await m.idle()
            got = scrape(m)
        # Every state is present (zeros included), and the counts are the engine's.
        assert total(got, "sectorfsm_sectors") == 2
        assert value(got, "sectorfsm_sectors", state="Proving") == 2
        assert {dict(ls)["state"] for n, ls in got if n == "sectorfsm_sectors"} == {
            s.name for s in SectorState
        }
        assert value(got, "sectorfsm_sectors_in_group", group="proving") == 2
        assert total(got, "sectorfsm_sectors_in_group") == 2
        assert total(got, "sectorfsm_sector_transitions_total", state="Proving") == 2
        assert total(got, "sectorfsm_sector_transitions_total", event="SectorStartCC") == 2
        assert total(got, "sectorfsm_sector_failures_total") == 0
        # One PC1 job per sector on the default worker, timed on the engine clock.
        [worker] = [w.name for w in m.sched.workers()]
        pc1 = value(got, "sectorfsm_sched_job_duration_seconds_count", task="PC1", worker=worker)
        assert pc1 == 2
        assert value(got, "sectorfsm_sched_job_duration_seconds_sum", task="PC1", worker=worker) > 0
        assert total(got, "sectorfsm_chain_messages_total", exit_code="0") >= 2
        assert value(got, "sectorfsm_engine_commit_duration_seconds_count") >= 1
        assert value(got, "sectorfsm_engine_transactions_total") >= 1
        assert value(got, "sectorfsm_worker_enabled", worker=worker) == 1
        assert value(got, "sectorfsm_worker_cpu_threads", worker=worker) > 0
        assert total(got, "sectorfsm_storage_capacity_bytes") > 0
        info = [ls for n, ls in got if n == "sectorfsm_build_info"]
        assert dict(info[0])["version"] == __version__

    run(body)


def test_failures_and_retries_are_counted_by_state_and_event(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path, config=FAST) as m:
            assert m.metrics.registry is m.metrics.registry  # counting starts at first use
            m.chain.faults.message_exits["PreCommitSector"] = [ExitCode.ErrIllegalArgument]
            n = await m.pledge()
            await m.wait(n, "Proving", timeout=86400.0)
            await m.idle()
            got = scrape(m)
        assert (
            value(
                got,
                "sectorfsm_sector_failures_total",
                state="PreCommitFailed",
                event="SectorChainPreCommitFailed",
            )
            == 1
        )
        assert (
            value(
                got,
                "sectorfsm_sector_retries_total",
                state="PreCommitFailed",
                event="SectorRetryPreCommit",
            )
            == 1
        )
        bad = str(int(ExitCode.ErrIllegalArgument))
        assert (
            value(got, "sectorfsm_chain_messages_total", method="PreCommitSector", exit_code=bad)
            == 1
        )

    run(body)


def test_a_restart_does_not_count_replayed_chain_messages(tmp_path: Path) -> None:
    async def body() -> None:
        async with miner(tmp_path) as m:
            scrape(m)
            n = await m.pledge()
            await m.wait(n, "Proving")
            assert total(scrape(m), "sectorfsm_chain_messages_total") >= 2
        async with miner(tmp_path) as m:
            m.chain.head()  # replays every stored message
            assert total(scrape(m), "sectorfsm_chain_messages_total") == 0
            assert value(scrape(m), "sectorfsm_sectors", state="Proving") == 1

    run(body)


def test_listeners_get_every_durable_change_and_a_broken_one_harms_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    changes = StateChanges(lambda callback, *args: callback(*args, None))
    assert not changes.active
    got: list[StateChange] = []

    def broken(change: StateChange) -> None:
        raise RuntimeError("boom")

    changes.add_listener(broken)
    changes.add_listener(got.append)
    assert changes.active
    hop = StateChange(1, SectorState.Packing, SectorState.GetTicket, "SectorPacked")
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # unbounded: nothing is dropped, unlike a subscription
            changes.staged(hop)
    assert got == [hop] * 3
    assert "state-change listener failed" in caplog.text
    changes.remove_listener(broken)
    changes.remove_listener(got.append)
    assert not changes.active


def test_a_failed_commit_counts_no_transition() -> None:
    failing = StateChanges(lambda callback, *args: callback(*args, OSError("disk full")))
    got: list[StateChange] = []
    failing.add_listener(got.append)
    failing.staged(StateChange(1, SectorState.Packing, SectorState.GetTicket, "SectorPacked"))
    assert got == []


def test_the_exposition_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")

    async def body() -> bytes:
        async with miner(tmp_path) as m:
            n = await m.pledge()
            await m.wait(n, "Proving")
            return generate_latest(m.metrics.registry)

    text = run(body)
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert done.stdout.strip() == b"", done.stdout.decode()  # not even a lint warning


def test_the_server_serves_the_registry_read_on_the_engine_loop(tmp_path: Path) -> None:
    async def body() -> str:
        server = MetricsServer("127.0.0.1:0")
        try:
            url = f"http://127.0.0.1:{server.port}/metrics"
            before = await asyncio.to_thread(_get, url)
            assert "sectorfsm_sectors" not in before  # nothing attached yet
            async with miner(tmp_path) as m:
                server.attach(m.metrics.registry)
                n = await m.pledge()
                await m.wait(n, "Proving")
                # The HTTP thread hands the reading to this loop, which keeps running.
                return await asyncio.to_thread(_get, url)
        finally:
            server.close()

    text = run(body)
    assert value(samples(text), "sectorfsm_sectors", state="Proving") == 1


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.read().decode())


@pytest.mark.parametrize(
    "listen", ["9283", "127.0.0.1", "127.0.0.1:", ":9283", "127.0.0.1:http", "127.0.0.1:70000"]
)
def test_a_malformed_address_is_one_clear_line(listen: str) -> None:
    with pytest.raises(MetricsError) as err:
        MetricsServer(listen)
    assert "expected HOST:PORT" in str(err.value) and "\n" not in str(err.value)


def test_addresses_parse_with_ipv6_brackets() -> None:
    assert parse_listen("127.0.0.1:9283") == ("127.0.0.1", 9283)
    assert parse_listen("[::1]:9283") == ("::1", 9283)
    assert parse_listen("localhost:0") == ("localhost", 0)


def test_a_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError) as err:
            MetricsServer(f"127.0.0.1:{port}")
    msg = str(err.value)
    assert msg.startswith(f"metrics address 127.0.0.1:{port}: cannot listen there")
    assert "in use" in msg and "\n" not in msg


def test_broken_observers_neither_fail_jobs_nor_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("observer bug")

    async def body() -> None:
        async with miner(tmp_path) as m:
            scrape(m)  # the metrics' observers come first
            m.sched.add_job_listener(broken)
            m.store.committer.observe_commits(broken)
            n = await m.pledge()
            await m.wait(n, "Proving")  # no job failed, no commit was refused
            await m.idle()
            got = scrape(m)
            assert m.status(n).retries == 0
        # The metrics' own observers still saw everything.
        assert value(got, "sectorfsm_sectors", state="Proving") == 1
        assert total(got, "sectorfsm_sector_failures_total") == 0
        assert total(got, "sectorfsm_sched_job_duration_seconds_count") >= 6

    with caplog.at_level(logging.ERROR):
        run(body)
    assert "job listener failed" in caplog.text
    assert "commit observer failed" in caplog.text
