"""`sectors worker`: a Dask worker on a sealing machine that says who it is and stays up.

```toml
# worker.toml: what a `[[workers]]` entry of sectors.toml holds, plus the worker's own keys
name = "pc1-box"                 # --name overrides
scheduler = "tls://10.0.0.1:8786" # --scheduler overrides
cpus = 64                        # detected when omitted (memory too)
memory = "512GiB"
tasks = ["AP", "PC1"]            # --tasks AP,PC1 overrides
policy = "myscheduler.json"      # read and hot-reloaded here, on the worker machine
resources = { PC1_32G_MAX_CONCURRENT = 4 }
backend = "reference"            # or "command", with `[sealer]` options as in sectors.toml
threads = 64                     # Dask threads: at least the jobs the engine ever places here
state_dir = "jobs"               # job records and results (relative to this file)
[tls]
certs = "certs"                  # from `sectors cluster certs DIR --worker pc1-box`; --certs
[[paths]]                        # --path [ID=]DIR (repeatable) replaces these
id = "nvme"
path = "/mnt/nvme/sectors"
capacity = "8TiB"
```

It runs a bare Dask `Worker` in this process, not a `Nanny`: a Nanny's worker is a child
process whose jobs die with it, and a Nanny also exits when the scheduler goes away. Here the
job table belongs to the process (`jobs.hold_jobs`): when the scheduler is lost, the Worker
closes, the children keep running, and a new Worker (a new address) joins when the
scheduler is back and re-attaches to the same table. Only SIGTERM/SIGINT kill the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field

from ....sched.config import WorkerConfigError, read_workers
from ....sched.policy import PolicyWatcher
from ....sched.workers import detect_resources
from ....validation import TABLE, ConfigError, read_toml, validate
from . import jobs
from .adapter import export_roots
from .certs import CertError
from .identity import (
    IDENTITY_KEY,
    METRICS_KEY,
    HeldFile,
    PolicyReport,
    WorkerHeartbeat,
    WorkerIdentity,
    WorkerPathInfo,
)
from .security import AddressError, check_address

if TYPE_CHECKING:
    from distributed import Security, Worker

log = logging.getLogger("sectorfsm.worker")

#: Dask threads by default: each job holds one while it waits for its child.
THREADS = 64
#: Seconds one attempt to reach the scheduler may take before we back off and log it.
CONNECT_TIMEOUT = 10.0
#: Reconnect backoff: first delay, and the cap it doubles up to.
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
#: Where Dask's HTTP server (which cannot be turned off) listens: loopback, any free port.
HTTP_ADDRESS = "127.0.0.1:0"
#: Keys of worker.toml that are not a `[[workers]]` entry's.
_OWN_KEYS = ("scheduler", "backend", "threads", "host", "state_dir", "tls", "sealer")


class WorkerSetupError(ValueError):
    """A `sectors worker` that cannot start as configured (the message is one line)."""


class _Tls(BaseModel):
    model_config = TABLE
    certs: Annotated[str, Field(min_length=1)] | None = None


class _Own(BaseModel):
    model_config = TABLE
    scheduler: Annotated[str, Field(min_length=1)] | None = None
    backend: Literal["reference", "command"] = "reference"
    threads: Annotated[int, Field(ge=1, le=4096)] = THREADS
    host: Annotated[str, Field(min_length=1)] | None = None
    state_dir: Annotated[str, Field(min_length=1)] | None = None
    tls: _Tls = _Tls()
    sealer: dict[str, Any] = {}


@dataclass(slots=True)
class WorkerConfig:
    """Everything `sectors worker` needs, checked before anything starts."""

    scheduler: str
    identity: WorkerIdentity
    #: Path id -> this machine's directory.
    directories: dict[str, Path]
    policy_file: Path | None = None
    certs: Path | None = None
    threads: int = THREADS
    host: str | None = None
    state_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / jobs.PLUGIN)
    sealer_options: dict[str, Any] = field(default_factory=dict)
    #: The address rule's warning for an allowed plain `tcp://`, to log at start.
    warning: str | None = None

    @property
    def name(self) -> str:
        """The worker's name."""
        return self.identity.name


def load_config(
    path: Path | None,
    *,
    scheduler: str | None = None,
    name: str | None = None,
    tasks: list[str] | None = None,
    paths: list[str] | None = None,
    certs: Path | None = None,
    host: str | None = None,
    insecure: bool = False,
) -> WorkerConfig:
    """The worker's config from `path` (optional) and flags; `WorkerSetupError` if unusable.

    Creates the storage directories and nothing else.
    """
    try:
        return _load(path, scheduler, name, tasks, paths, certs, host, insecure)
    except (ConfigError, CertError, AddressError, OSError) as exc:
        raise WorkerSetupError(str(exc)) from None


def _load(
    path: Path | None,
    scheduler: str | None,
    name: str | None,
    tasks: list[str] | None,
    flag_paths: list[str] | None,
    certs: Path | None,
    host: str | None,
    insecure: bool,
) -> WorkerConfig:
    source, base, data = "flags", Path.cwd(), {}
    if path is not None:
        source, base = str(path), path.parent.absolute()
        data = read_toml(path, WorkerSetupError)
    own: _Own = validate(_Own, {k: data.pop(k) for k in _OWN_KEYS if k in data}, source)
    entry: dict[str, Any] = dict(data)
    if name is not None:
        entry["name"] = name
    if "name" not in entry:
        raise WorkerSetupError(f"{source}: no worker name: set `name` or pass --name")
    if tasks is not None:
        entry["tasks"] = tasks
    if flag_paths:
        entry["paths"] = [_flag_path(entry["name"], text) for text in flag_paths]
    detected = detect_resources()
    entry.setdefault("cpus", detected.cpus)
    entry.setdefault("memory", detected.mem_physical)
    entry.setdefault("swap", detected.mem_swap)
    try:
        declared = read_workers({"workers": [entry]}, source, base)
    except WorkerConfigError as exc:
        # The schema speaks of `[[workers]]`; this file has one worker at its top level.
        raise WorkerSetupError(re.sub(r"workers\[0\] (\([^)]*\) )?", "", str(exc))) from None
    spec = declared.workers[0]
    if not spec.paths:
        raise WorkerSetupError(f"{source}: no storage paths: add [[paths]] or pass --path DIR")
    infos = []
    for p in spec.paths:
        directory = declared.directories.get(p.id)
        if directory is None:
            raise WorkerSetupError(f"{source}: [[paths]] {p.id}: needs `path`, its directory")
        directory.mkdir(parents=True, exist_ok=True)
        infos.append(WorkerPathInfo(p.id, str(directory), p.capacity, p.can_seal, p.can_store))
    if own.backend == "command":
        from ..command import CommandConfigError, parse_commands

        try:
            parse_commands(own.sealer)
        except CommandConfigError as exc:
            raise WorkerSetupError(f"{source}: [sealer] {exc}") from None
    address = scheduler or own.scheduler
    if address is None:
        raise WorkerSetupError(f"{source}: no scheduler: set `scheduler` or pass --scheduler")
    if certs is None and own.tls.certs is not None:
        certs = base / Path(own.tls.certs).expanduser()
    warning = check_address(address, insecure=insecure)
    secure = address.lower().startswith(("tls://", "wss://"))
    if secure and certs is None:
        raise WorkerSetupError(f"{address} needs certificates: pass --certs DIR or set [tls] certs")
    if certs is not None:
        if not secure:
            raise WorkerSetupError(f"certificates are given but {address} is not tls://")
        _security(certs, spec.name)  # refuse a wrong directory now, not at each reconnect
    identity = WorkerIdentity(
        name=spec.name,
        resources=spec.resources,
        tasks=spec.task_types,
        backend=own.backend,
        overrides=dict(entry.get("resources", {})),
        paths=tuple(infos),
    )
    state_dir = Path(tempfile.gettempdir()) / jobs.PLUGIN
    if own.state_dir is not None:
        state_dir = base / Path(own.state_dir).expanduser()
    return WorkerConfig(
        scheduler=address,
        identity=identity,
        directories={p.id: Path(p.path) for p in infos},
        policy_file=spec.policy_file,
        certs=certs,
        threads=own.threads,
        host=host or own.host,
        state_dir=state_dir,
        sealer_options=dict(own.sealer),
        warning=warning,
    )


def _flag_path(worker: str, text: str) -> dict[str, Any]:
    """A `[[paths]]` table from `--path [ID=]DIR`: a sealing path the size of its disk."""
    path_id, sep, directory = text.partition("=")
    if not sep:
        directory = text
        path_id = f"{worker}-{Path(text).name or 'root'}"
    if not path_id or not directory:
        raise WorkerSetupError(f"--path {text!r}: give DIR or ID=DIR")
    where = Path(directory).expanduser().absolute()
    where.mkdir(parents=True, exist_ok=True)
    return {"id": path_id, "path": str(where), "capacity": shutil.disk_usage(where).total}


def _security(certs: Path, name: str) -> Security:
    from .security import worker_security

    return worker_security(certs, name)


# ---------------------------------------------------------------------- running


class WorkerRuntime:
    """What the running worker reports: its identity once, its heartbeat every beat."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.watcher: PolicyWatcher | None = None
        self._said: str | None = None
        if config.policy_file is not None:
            # Wall-clock times: the engine shows when a policy was loaded.
            self.watcher = PolicyWatcher(config.policy_file, clock=time.time)
            self._log_policy(changed=self.watcher.loaded_at is not None)

    def policy(self) -> PolicyReport:
        """The policy file as last read (polled by every heartbeat)."""
        w = self.watcher
        if w is None:
            return PolicyReport()
        fields = w.policy.as_myscheduler() if w.loaded_at is not None else None
        return PolicyReport(str(w.path), fields, w.error, w.loaded_at)

    def _log_policy(self, *, changed: bool) -> None:
        assert self.watcher is not None
        error = self.watcher.error
        if error is not None and error != self._said:
            log.warning("policy: %s", error)
        elif error is None and (changed or self._said is not None):
            log.info("policy: loaded %s", self.watcher.path)
        self._said = error

    def identity(self, worker: Worker) -> dict[str, Any]:
        """For `startup_information`: the identity, with the policy and the files as now."""
        self.config.identity.policy = self.policy()
        # Each (re)join reports what is on disk now: files may have gone while it was away.
        self.config.identity.files = held_files(self.config.directories)
        return self.config.identity.to_wire()

    def heartbeat(self, worker: Worker) -> dict[str, Any]:
        """For heartbeat `metrics`: free space per path, the policy, the job states."""
        if self.watcher is not None:
            self._log_policy(changed=self.watcher.poll())
        free = {}
        for path_id, directory in self.config.directories.items():
            try:
                free[path_id] = shutil.disk_usage(directory).free
            except OSError:
                free[path_id] = 0  # gone or unmounted: nothing can be written there
        try:
            states = {r.job_id: str(r.state) for r in jobs.table_of(worker).records()}
        except RuntimeError:
            states = {}
        return WorkerHeartbeat(free, self.policy(), states).to_wire()


#: A sector file's name as the dask sealer writes it: `s-t0{miner}-{number}`.
_SECTOR_NAME = re.compile(r"s-t0\d+-\d+")


def held_files(directories: dict[str, Path]) -> tuple[HeldFile, ...]:
    """The sector files under each path's `unsealed`, `sealed` and `cache` directories.

    Names and apparent sizes only (a cache directory sums its files): cheap enough for every
    join. Partial copies (`.part`) and other names are not sector files and are skipped.
    """
    found: list[HeldFile] = []
    for path_id, root in sorted(directories.items()):
        for kind in ("unsealed", "sealed", "cache"):
            try:
                entries = sorted(os.scandir(root / kind), key=lambda e: e.name)
            except OSError:
                continue  # not created yet (nothing written there), or unreadable
            for entry in entries:
                if _SECTOR_NAME.fullmatch(entry.name):
                    found.append(HeldFile(path_id, kind, entry.name, _size(Path(entry.path))))
    return tuple(found)


def _size(path: Path) -> int:
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    except OSError:
        return 0  # deleted while we looked


async def serve(config: WorkerConfig, stop: asyncio.Event) -> None:
    """Run Dask Workers for `config` until `stop` is set, reconnecting when the scheduler goes."""
    import dask.config
    from distributed import Worker

    from .transfer import FileServer

    runtime = WorkerRuntime(config)
    security = _security(config.certs, config.name) if config.certs is not None else None
    if config.warning:
        log.warning("warning: %s", config.warning)
    delay = BACKOFF_MIN
    roots = list(config.directories.values())
    config.state_dir.mkdir(parents=True, exist_ok=True)
    export_roots(config.directories)  # the job children translate path ids with these
    # An engine that registers the job plugin again must find the same records. The HTTP
    # server every Dask Worker starts (no TLS, no login) gets no routes, on loopback only.
    # Dask's sampling profiler is off: every 10 ms it walks the stacks of the task threads,
    # which here only wait for their job's child (0.8 ms of CPU per trivial job, and all
    # day long during a PC1).
    settings = {
        jobs.STATE_DIR_KEY: str(config.state_dir),
        "distributed.worker.http.routes": [],
        "distributed.worker.profile.enabled": False,
    }
    with dask.config.set(settings), jobs.hold_jobs():
        jobs.open_table(config.state_dir, config.name)  # its spawner warms up while we connect
        while not stop.is_set():
            worker = Worker(
                config.scheduler,
                name=config.name,
                nthreads=config.threads,
                memory_limit=0,
                dashboard=False,
                dashboard_address=HTTP_ADDRESS,
                host=config.host,
                security=security,
                death_timeout=CONNECT_TIMEOUT,
                local_directory=str(config.state_dir / "dask"),
                startup_information={IDENTITY_KEY: runtime.identity},
                metrics={METRICS_KEY: runtime.heartbeat},
                plugins=(jobs.JobRegistry(str(config.state_dir)), FileServer(roots)),
            )
            try:
                await worker
            except (OSError, TimeoutError, RuntimeError) as exc:
                reason = exc.__cause__ or exc
                log.warning(
                    "cannot join the scheduler at %s (%s); retrying in %gs",
                    config.scheduler,
                    str(reason) or type(reason).__name__,
                    delay,
                )
                await _pause(stop, delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            log.info(
                "joined the scheduler at %s as %s (%s)",
                config.scheduler,
                worker.address,
                config.name,
            )
            delay = BACKOFF_MIN
            finished = asyncio.ensure_future(worker.finished())  # type: ignore[no-untyped-call]
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                log.info("stopping: running jobs are killed")
                await worker.close(reason="sectors-worker-stopped")
                finished.cancel()
                break
            log.warning("scheduler lost; reconnecting in %gs (running jobs keep running)", delay)
            await _pause(stop, delay)
            delay = min(delay * 2, BACKOFF_MAX)
    log.info("stopped")


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def run_worker(config: WorkerConfig) -> None:
    """Serve until SIGTERM or SIGINT (then kill the running jobs and return)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(main())
