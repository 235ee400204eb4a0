"""`sectors worker` processes against a real Dask scheduler process, on 127.0.0.1.

The scheduler is a small script (below) with a plugin that prints each worker's identity as
it joins; heartbeat metrics are read from the scheduler through a client. Every wait is on
something observable: a printed line, a value in the scheduler's view of the worker.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import Child, Spawner, child_env, until
from distributed import Client
from typer.testing import CliRunner

from sectorfsm.cli.app import app
from sectorfsm.sched.tasks import TaskType
from sectorfsm.sealing.backends.dask import jobs
from sectorfsm.sealing.backends.dask.identity import (
    IDENTITY_KEY,
    METRICS_KEY,
    WorkerHeartbeat,
    WorkerIdentity,
)
from sectorfsm.sealing.backends.dask.security import engine_security

TESTS = Path(__file__).resolve().parent

SCHEDULER = """
import asyncio, json, sys
from pathlib import Path
import dask.config
from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin
from sectorfsm.sealing.backends.dask.identity import IDENTITY_KEY

class Joins(SchedulerPlugin):
    def add_worker(self, scheduler, worker):
        ws = scheduler.workers[worker]
        print("join", ws.name, worker, json.dumps(ws.extra.get(IDENTITY_KEY)), flush=True)

    def remove_worker(self, scheduler, worker, **kw):
        print("leave", worker, flush=True)

async def main(port, certs):
    security = None
    if certs:
        from sectorfsm.sealing.backends.dask.security import engine_security
        security = engine_security(Path(certs))
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        # Its HTTP server starts even without a dashboard: any free loopback port, not 8787.
        async with Scheduler(host="127.0.0.1", port=port, dashboard=False, security=security,
                             dashboard_address="127.0.0.1:0",
                             protocol="tls" if certs else "tcp") as s:
            s.add_plugin(Joins())
            print("listening", s.address, flush=True)
            await s.finished()

asyncio.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""))
"""

POLICY = {"PreCommit1Max": 2, "AddPieceMax": 1}

WORKER_TOML = """
name = "from-file"
cpus = 3
memory = "6GiB"
tasks = ["AP", "PC1", "PC2"]
policy = "myscheduler.json"
resources = { PC1_2K_MAX_CONCURRENT = 4 }
threads = 8
state_dir = "jobs"

[[paths]]
id = "seal1"
path = "seal1"
capacity = "1GiB"
"""


def free_port() -> int:
    """A port nothing listens on now (the scheduler binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scheduler(spawn: Spawner, port: int = 0, certs: Path | None = None) -> tuple[Child, str]:
    """A scheduler process on `port` (0: one the kernel picks), and its address once it listens.

    A port picked before the child binds it could be taken meanwhile (by any connection's
    local end: they come from the same range), so a first start lets the scheduler pick.
    """
    args = ["-c", SCHEDULER, str(port), *([str(certs)] if certs else [])]
    child = spawn.python(*args, name="scheduler", env=child_env())
    return child, child.wait_for_line(r"^listening (\S+)").group(1)


def worker(spawn: Spawner, *args: str | Path, cwd: Path) -> Child:
    """`sectors worker ARGS` as a process."""
    return spawn.python("-m", "sectorfsm", "worker", *args, name="worker", env=child_env(), cwd=cwd)


def joined(sched: Child, name: str) -> tuple[str, dict[str, Any]]:
    """Wait for the scheduler to print that `name` joined: its address and identity."""
    m = sched.wait_for_line(rf"^join {name} (\S+) (.*)$")
    return m.group(1), json.loads(m.group(2))


def beats(client: Client) -> dict[str, Any]:
    """Worker name -> its latest `sectorfsm` heartbeat metrics, from the scheduler."""

    def snapshot(dask_scheduler: Any) -> dict[str, Any]:
        return {ws.name: ws.metrics.get("sectorfsm") for ws in dask_scheduler.workers.values()}

    result: dict[str, Any] = client.run_on_scheduler(snapshot)
    return result


def heartbeat(client: Client, name: str) -> WorkerHeartbeat | None:
    """The worker's heartbeat as the engine would decode it (None before the first one)."""
    raw = beats(client).get(name)
    return None if raw is None else WorkerHeartbeat.from_wire(raw)


@contextlib.contextmanager
def connect(address: str, certs: Path | None = None) -> Iterator[Client]:
    """A client to `address` (the engine's certificate when `certs` is given)."""
    security = engine_security(certs) if certs else None
    client = Client(address, security=security, timeout=60)
    try:
        yield client
    finally:
        client.close()


def make_certs(directory: Path, *names: str) -> Path:
    """`sectors cluster certs DIRECTORY --worker NAME...` through the CLI."""
    args = [a for n in names for a in ("--worker", n)]
    result = CliRunner().invoke(app, ["cluster", "certs", str(directory), *args])
    assert result.exit_code == 0, result.output
    return directory


def setup_files(tmp_path: Path) -> Path:
    """worker.toml and its policy file in `tmp_path/box`."""
    box = tmp_path / "box"
    box.mkdir()
    (box / "worker.toml").write_text(WORKER_TOML)
    (box / "myscheduler.json").write_text(json.dumps(POLICY))
    return box


def test_worker_joins_over_tls_declares_itself_and_reloads_its_policy(
    spawn: Spawner, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs", "pc1-box")
    box = setup_files(tmp_path)
    sched, address = scheduler(spawn, certs=certs)
    assert address.startswith("tls://")
    args = ["--scheduler", address, "--name", "pc1-box", "--config", "worker.toml"]
    proc = worker(spawn, *args, "--tasks", "AP,PC1", "--certs", certs, cwd=box)

    _, wire = joined(sched, "pc1-box")
    ident = WorkerIdentity.from_wire(wire)
    assert ident.name == "pc1-box"  # the flag beats the file
    assert ident.tasks == {TaskType.ADD_PIECE, TaskType.PRE_COMMIT1}  # --tasks beats the file
    assert (ident.resources.cpus, ident.resources.mem_physical) == (3, 6 << 30)
    assert ident.backend == "reference"
    assert ident.overrides == {"PC1_2K_MAX_CONCURRENT": 4}
    (path,) = ident.paths
    assert (path.id, path.path, path.capacity) == ("seal1", str(box / "seal1"), 1 << 30)
    assert (box / "seal1").is_dir()
    assert ident.policy.file == str(box / "myscheduler.json")
    assert ident.policy.fields is not None and ident.policy.fields["PreCommit1Max"] == 2
    spec = ident.to_spec()
    assert spec.policy_file is None and spec.overrides is not None

    with connect(address, certs) as client:
        beat = until(lambda: heartbeat(client, "pc1-box"), "a heartbeat with our metrics")
        assert beat.free["seal1"] > 0
        assert beat.policy.error is None

        # An edit on the worker machine reaches the scheduler with the next heartbeats.
        (box / "myscheduler.json").write_text(json.dumps({**POLICY, "PreCommit1Max": 5}))

        def edited() -> WorkerHeartbeat | None:
            b = heartbeat(client, "pc1-box")
            fields = b.policy.fields if b else None
            return b if fields and fields["PreCommit1Max"] == 5 else None

        assert until(edited, "the edited policy in the metrics").policy.error is None

        # A bad edit keeps the last good policy; the error goes out and into the worker's log.
        (box / "myscheduler.json").write_text('{"PreCommit1Max": "many"}')

        # The write is not atomic: a poll between its truncate and its bytes may report the
        # empty file's error first, so wait for the error of what was written.
        def refused() -> WorkerHeartbeat | None:
            b = heartbeat(client, "pc1-box")
            return b if b and b.policy.error and "PreCommit1Max" in b.policy.error else None

        bad = until(refused, "the policy error in the metrics")
        assert bad.policy.fields is not None and bad.policy.fields["PreCommit1Max"] == 5
        proc.wait_for_line(r"policy: .*PreCommit1Max.*keeping the last good policy")

    proc.popen.send_signal(signal.SIGTERM)
    assert proc.finish() == 0
    sched.wait_for_line(r"^leave ")


def test_scheduler_lost_the_worker_rejoins_and_its_job_runs_exactly_once(
    spawn: Spawner, tmp_path: Path
) -> None:
    box = setup_files(tmp_path)
    count, release = tmp_path / "count", tmp_path / "release"
    sched, address = scheduler(spawn)
    port = int(address.rsplit(":", 1)[1])
    proc = worker(spawn, "--scheduler", address, "--config", "worker.toml", cwd=box)
    first, _ = joined(sched, "from-file")
    args = [str(count), str(release), 42]

    with connect(address) as client:
        fut = jobs.submit(client, first, "PC1-s1-a1", "jobfuncs:gate", args)
        until(
            lambda: (count.exists() and count.read_text().split()) or None,
            "the job's child starting",
        )
        (child_pid,) = (int(p) for p in count.read_text().split())
        until(
            lambda: (b := heartbeat(client, "from-file")) and b.jobs.get("PC1-s1-a1") == "running",
            "the running job in the heartbeat",
        )
        del fut

    sched.kill()  # kill -9 of the scheduler while the job runs
    proc.wait_for_line(r"scheduler lost; reconnecting in \d+s")
    assert Path(f"/proc/{child_pid}").exists()  # the job keeps running meanwhile

    sched, again = scheduler(spawn, port)  # back on the same port
    assert again == address
    second, _ = joined(sched, "from-file")
    proc.wait_for_line(r"joined the scheduler")
    with connect(address) as client:
        # The engine resubmits the attempt to the worker's new address: it attaches.
        fut = jobs.submit(client, second, "PC1-s1-a1", "jobfuncs:gate", args)
        release.touch()
        assert fut.result(timeout=120) == 42
        assert count.read_text().split() == [str(child_pid)]  # one child, ever
        until(
            lambda: (b := heartbeat(client, "from-file")) and b.jobs.get("PC1-s1-a1") == "done",
            "the finished job in the heartbeat",
        )

        # A job still running when `sectors worker` stops dies with it.
        gated = jobs.submit(
            client, second, "PC1-s2-a1", "jobfuncs:gate", [str(count), str(tmp_path / "no"), 0]
        )
        until(lambda: len(count.read_text().split()) == 2, "the second job's child starting")
        pid = int(count.read_text().split()[1])
        del gated
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.finish() == 0
    until(lambda: not _alive(pid), "the job's child killed with the worker")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_bad_config_is_one_line_exit_2_and_starts_nothing(tmp_path: Path) -> None:
    box = setup_files(tmp_path)
    runner = CliRunner()
    cases = {
        "cpus = 0": ("cpus = 3", "cpus = 0"),
        "unknown task type": ('tasks = ["AP", "PC1", "PC2"]', 'tasks = ["AP", "XX"]'),
        "threads": ("threads = 8", "threads = 0"),
        "no storage paths": ('id = "seal1"\npath = "seal1"\ncapacity = "1GiB"', ""),
    }
    for expected, (old, new) in cases.items():
        text = WORKER_TOML.replace("[[paths]]", "[[paths]]" if new else "").replace(old, new)
        (box / "bad.toml").write_text(text)
        args = ["worker", "--scheduler", "tcp://127.0.0.1:1", "--config", str(box / "bad.toml")]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (expected, result.output)
        assert expected.split(" = ")[0] in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    base = ["worker", "--config", str(box / "worker.toml")]
    for args, expected in [
        (["--scheduler", "tcp://10.9.9.9:8786"], "unencrypted"),
        (["--scheduler", "tls://10.9.9.9:8786"], "needs certificates"),
        (["--scheduler", "tls://127.0.0.1:1", "--certs", str(tmp_path / "none")], "no certificate"),
        ([], "no scheduler"),
    ]:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and len(result.output.strip().splitlines()) == 1
    assert not (box / "jobs").exists()  # nothing started


def test_insecure_plain_tcp_off_loopback_is_allowed_with_a_warning(tmp_path: Path) -> None:
    from sectorfsm.sealing.backends.dask.worker import load_config

    box = setup_files(tmp_path)
    cfg = load_config(box / "worker.toml", scheduler="tcp://10.9.9.9:8786", insecure=True)
    assert cfg.warning is not None and "unencrypted" in cfg.warning
    assert cfg.identity.name == "from-file"


def test_identity_from_wire_names_the_bad_field() -> None:
    good = {
        "version": 1,
        "name": "w",
        "backend": "reference",
        "resources": {"cpus": 2, "memory": 1 << 30, "swap": 0, "gpus": []},
        "tasks": [TaskType.PRE_COMMIT1.value],
        "overrides": {},
        "paths": [{"id": "p", "path": "/x", "capacity": 10, "seal": True, "store": False}],
        "policy": {"file": None, "fields": None, "error": None, "loaded_at": None},
    }
    ident = WorkerIdentity.from_wire(good)
    assert ident.to_wire() == good
    for bad, field in [
        ({**good, "version": 2}, "version"),
        ({**good, "tasks": ["XX"]}, "tasks"),
        ({**good, "resources": {"cpus": 0, "memory": 1}}, "cpus"),
        ({**good, "backend": "sim"}, "backend"),
        ({**good, "overrides": {"NOPE": 1}}, "overrides"),
        ({**good, "paths": [good["paths"][0], good["paths"][0]]}, "paths"),  # type: ignore[index]
    ]:
        try:
            WorkerIdentity.from_wire(bad)
        except ValueError as exc:
            assert field in str(exc) and "\n" not in str(exc), str(exc)
        else:
            raise AssertionError(f"accepted a bad {field}")
    assert WorkerHeartbeat.from_wire({"free": {"p": 1}}).free == {"p": 1}
    assert IDENTITY_KEY == METRICS_KEY == "sectorfsm"
    assert sys.version_info >= (3, 11)
