"""Prometheus metrics of one engine: `Miner.metrics.registry`, served by `sectors run --metrics`.

`Miner.metrics` builds this on first use, so an engine nobody monitors pays nothing per
transition. From then on, counters and histograms are fed by hooks as things happen (durable
state changes, finished scheduler jobs, executed chain messages, LMDB commits, the latter
timed on the writer thread).
Everything that is a level (sectors per state, the queue, the workers' load, free space,
transactions so far) is read when Prometheus scrapes, by `_ScrapeCollector`, so nothing is
done per transition that a scrape can do. The scrape runs on the HTTP server's thread and
hands the reading to the engine's event loop, where that state lives.

Names follow Prometheus's conventions: `sectorfsm_` prefix, `_total` counters, base units
(`_seconds`, `_bytes`); the README's "Monitoring" section lists them with the dashboard.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import platform
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..sched import Job, TaskType
from .chain import Receipt
from .notify import StateChange
from .states import FAILED_STATES
from .stats import sector_stats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .miner import Miner

#: How long a scrape waits for the engine's loop to read its state.
SCRAPE_TIMEOUT = 10.0

#: Sealing work runs from milliseconds (the sim sealer) to hours (PC1 of a 64 GiB sector).
JOB_BUCKETS = (0.01, 0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
#: One LMDB transaction: tens of microseconds (no fsync) to seconds (a slow disk).
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5)  # fmt: skip


#: What a metrics address must look like (the config error quotes it).
LISTEN_FORMAT = "expected HOST:PORT with a port from 0 to 65535"


class MetricsError(ValueError):
    """A metrics address that cannot be served (malformed, or the port is taken)."""


class EngineMetrics:
    """The registry of one `Miner`, with the hooks that feed its counters."""

    def __init__(self, miner: Miner) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.transitions = Counter(
            "sectorfsm_sector_transitions",
            "Sector state changes made durable, by the state entered and the round's last event.",
            ["state", "event"],
            registry=r,
        )
        self.retries = Counter(
            "sectorfsm_sector_retries",
            "Sectors retried out of a failed state (SectorRetry* events), by that state.",
            ["state", "event"],
            registry=r,
        )
        self.failures = Counter(
            "sectorfsm_sector_failures",
            "Sectors that entered a failed state, by that state and the event.",
            ["state", "event"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "sectorfsm_sched_job_duration_seconds",
            "Run time of a scheduled task's work (engine clock), by task type and worker.",
            ["task", "worker"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.fetch_bytes = Counter(
            "sectorfsm_fetch_bytes",
            "Bytes of sector files moved to a worker before its task ran.",
            ["task", "worker"],
            registry=r,
        )
        self.chain_messages = Counter(
            "sectorfsm_chain_messages",
            "Chain messages executed since the start, by method and exit code.",
            ["method", "exit_code"],
            registry=r,
        )
        self.commit_seconds = Histogram(
            "sectorfsm_engine_commit_duration_seconds",
            "Time the writer thread spent committing one LMDB transaction.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        r.register(_ScrapeCollector(miner))
        miner.changes.add_listener(self._on_change)
        miner.sched.add_job_listener(self._on_job)
        miner.chain.on_receipt(self._on_receipt)
        miner.store.committer.observe_commits(self.commit_seconds.observe)

    def _on_change(self, change: StateChange) -> None:
        after, event = change.after.value, change.event
        self.transitions.labels(after, event).inc()
        if change.after in FAILED_STATES:
            self.failures.labels(after, event).inc()
        if change.before in FAILED_STATES and event.startswith("SectorRetry"):
            self.retries.labels(change.before.value, event).inc()

    def _on_job(self, job: Job, seconds: float) -> None:
        task, worker = job.task_type.short, job.worker.name
        self.job_seconds.labels(task, worker).observe(max(seconds, 0.0))
        if job.placement.fetch_bytes:
            self.fetch_bytes.labels(task, worker).inc(job.placement.fetch_bytes)

    def _on_receipt(self, method: str, receipt: Receipt) -> None:
        self.chain_messages.labels(method, str(int(receipt.exit_code))).inc()


class _ScrapeCollector(Collector):
    """The gauges, read from the engine at scrape time on its event loop."""

    def __init__(self, miner: Miner) -> None:
        self._miner = miner
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def collect(self) -> Iterable[Metric]:
        """Every level metric, read on the engine's loop (waits up to `SCRAPE_TIMEOUT`)."""
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return self._read()
        done: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def read() -> None:
            try:
                done.set_result(self._read())
            except BaseException as exc:  # handed to the scraping thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(read)
        return done.result(timeout=SCRAPE_TIMEOUT)

    def _read(self) -> list[Metric]:
        m = self._miner
        out: list[Metric] = [_build_info()]
        # The engine keeps these counts per commit: reading them is no scan of the sectors.
        counts = m.sector_counts()
        sectors = GaugeMetricFamily(
            "sectorfsm_sectors",
            "Sectors in each state (every state, zeros included).",
            labels=["state"],
        )
        for state, n in counts.items():
            sectors.add_metric([state], n)
        out.append(sectors)
        groups = GaugeMetricFamily(
            "sectorfsm_sectors_in_group",
            "Sectors per Lotus SectorStats group (staging, sealing, failed, proving, removed).",
            labels=["group"],
        )
        for group, n in sector_stats(counts).as_dict().items():
            if group not in ("total", "cur_sealing"):
                groups.add_metric([group], n)
        out.append(groups)
        committer = m.store.committer
        out.append(
            CounterMetricFamily(
                "sectorfsm_engine_transactions",
                "LMDB transactions committed by the engine since the start.",
                value=committer.transactions,
            )
        )
        out.append(
            CounterMetricFamily(
                "sectorfsm_engine_commit_batches",
                "Group-commit batches (each one or more transactions) since the start.",
                value=committer.batches_committed,
            )
        )
        out.extend(_queue(m))
        out.extend(_workers(m))
        out.extend(_storage(m))
        return out


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _build_info() -> Metric:
    info = GaugeMetricFamily(
        "sectorfsm_build_info",
        "Always 1; the labels say which sectorfsm and Python run the engine.",
        labels=["version", "python_version"],
    )
    info.add_metric([__version__, platform.python_version()], 1)
    return info


def _queue(miner: Miner) -> Iterator[Metric]:
    sched = miner.sched
    now = sched.clock.now()
    depth: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for req in sched.queue:
        task = req.task_type.short
        depth[task] = depth.get(task, 0) + 1
        oldest[task] = max(oldest.get(task, 0.0), now - req.enqueued_at)
    queued = GaugeMetricFamily(
        "sectorfsm_sched_queued_tasks", "Tasks waiting for a worker.", labels=["task"]
    )
    wait = GaugeMetricFamily(
        "sectorfsm_sched_oldest_wait_seconds",
        "How long the oldest queued task of each type has waited (engine clock).",
        labels=["task"],
    )
    for t in TaskType:
        queued.add_metric([t.short], depth.get(t.short, 0))
        wait.add_metric([t.short], max(oldest.get(t.short, 0.0), 0.0))
    yield queued
    yield wait
    jobs = GaugeMetricFamily(
        "sectorfsm_sched_jobs",
        "Tasks holding a worker, by worker, task type and phase (assigned/preparing/running).",
        labels=["worker", "task", "phase"],
    )
    held: dict[tuple[str, str, str], int] = {}
    for j in sched.jobs():
        if j.worker is not None:
            key = (j.worker, j.task, j.phase)
            held[key] = held.get(key, 0) + 1
    for key, n in sorted(held.items()):
        jobs.add_metric(list(key), n)
    yield jobs


@dataclass(frozen=True, slots=True)
class _WorkerGauge:
    name: str
    doc: str
    read: Callable[[Any], float]


_WORKER_GAUGES = (
    _WorkerGauge("sectorfsm_worker_enabled", "1 if the worker takes work.", lambda w: w.enabled),
    _WorkerGauge("sectorfsm_worker_cpu_threads", "CPU threads the worker has.", lambda w: w.cpus),
    _WorkerGauge(
        "sectorfsm_worker_cpu_threads_used",
        "CPU threads held by the worker's tasks.",
        lambda w: w.cpus_used,
    ),
    _WorkerGauge(
        "sectorfsm_worker_memory_bytes",
        "Physical memory of the worker.",
        lambda w: w.mem_physical,
    ),
    _WorkerGauge(
        "sectorfsm_worker_memory_used_bytes",
        "Memory held by the worker's tasks (their minimum).",
        lambda w: w.mem_used,
    ),
    _WorkerGauge("sectorfsm_worker_gpus", "GPUs of the worker.", lambda w: w.gpus),
    _WorkerGauge(
        "sectorfsm_worker_gpus_used", "GPU share held by the worker's tasks.", lambda w: w.gpus_used
    ),
    _WorkerGauge(
        "sectorfsm_worker_utilization_ratio",
        "The worker's most-used resource (CPU, memory or GPU), 0 to 1.",
        lambda w: w.utilization,
    ),
)


def _workers(miner: Miner) -> Iterator[Metric]:
    snapshots = miner.sched.workers()
    for g in _WORKER_GAUGES:
        family = GaugeMetricFamily(g.name, g.doc, labels=["worker"])
        for w in snapshots:
            family.add_metric([w.name], float(g.read(w)))
        yield family


def _storage(miner: Miner) -> Iterator[Metric]:
    free = GaugeMetricFamily(
        "sectorfsm_storage_available_bytes",
        "Free bytes of a storage path after sector files and reservations.",
        labels=["path", "worker"],
    )
    capacity = GaugeMetricFamily(
        "sectorfsm_storage_capacity_bytes",
        "Capacity of a storage path.",
        labels=["path", "worker"],
    )
    for p in miner.sched.index.paths.values():
        labels = [p.id, p.worker or ""]
        free.add_metric(labels, max(p.available, 0))
        capacity.add_metric(labels, p.capacity)
    yield free
    yield capacity


# -- serving --------------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9283` for IPv6; port 0: any free one) -> (host, port)."""
    if not isinstance(listen, str):
        raise MetricsError(f"metrics address: {LISTEN_FORMAT}, got {listen!r}")
    host, sep, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise MetricsError(f"metrics address: {LISTEN_FORMAT}, got {listen!r}")
    return host, int(port_text)


class _Deferred(Collector):
    """What the server exposes: nothing until `MetricsServer.attach` gives it a registry."""

    def __init__(self) -> None:
        self.registry: CollectorRegistry | None = None

    def collect(self) -> Iterable[Metric]:
        """The attached registry's metrics (none before)."""
        registry = self.registry
        return registry.collect() if registry is not None else ()


class MetricsServer:
    """An HTTP endpoint for Prometheus, bound at once (so a taken port fails early)."""

    def __init__(self, listen: str) -> None:
        host, port = parse_listen(listen)
        self.listen = listen
        self._source = _Deferred()
        try:
            server, thread = start_http_server(port, addr=host, registry=self._source)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if isinstance(exc, socket.gaierror):
                why = f"unknown host {host!r}"
            raise MetricsError(f"metrics address {listen}: cannot listen there: {why}") from None
        self._server: WSGIServer | None = server
        self._thread: threading.Thread = thread
        #: The port actually bound (the one asked for, or the one chosen for port 0).
        self.port = int(server.server_address[1])
        #: `HOST:PORT` as bound, for URLs (`[::1]:9283` for IPv6).
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def attach(self, registry: CollectorRegistry) -> None:
        """Serve `registry` (a miner's `metrics.registry`) from now on."""
        self._source.registry = registry

    def close(self) -> None:
        """Stop serving and release the port."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=SCRAPE_TIMEOUT)
