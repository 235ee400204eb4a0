"""The `command` sealer backend: each sealing task runs an operator-configured executable.

Configuration, as `Miner.open(..., sealer="command", sealer_options=...)`::

    {
        "commands": {                      # Lotus short task names; all six are required
            "AP": ["/opt/sealer/run", "addpiece"],
            "PC1": [...], "PC2": [...], "C1": [...], "C2": [...], "FIN": [...],
            "RELEASE_UNSEALED": [...],     # optional: default deletes the unsealed file
            "REMOVE": [...],               # optional: default deletes the sector's files
        },
        "timeout": 3600,                   # seconds of real time per task (default 3600)
        "timeouts": {"PC1": 86400},        # per-task overrides
        "kill_grace": 5,                   # seconds between SIGTERM and SIGKILL
        "env": {"FIL_PROOFS_USE_GPU": "1"},  # added to every command's environment
        "storage": {"local": "storage"},   # path id -> directory (see files.py)
    }

A command may be a list (argv) or a string (split like a shell would, without a shell).
Every command is checked when the backend is built: a missing task, or an executable that
does not exist or is not executable, fails `Miner.open` with the task and path in the error.

The contract (examples/README.md has it with a worked example, examples/command_sealer.py
implements it with the `reference` functions):

* **Arguments:** exactly the configured argv. One process per task, in its own process group.
* **Environment:** the engine's, plus `SECTORFSM_TASK` (AP, PC1, PC2, C1, C2, FIN,
  RELEASE_UNSEALED, REMOVE), `SECTORFSM_MINER` (actor id), `SECTORFSM_SECTOR_ID` (number),
  `SECTORFSM_SECTOR` (`s-t0<miner>-<number>`), `SECTORFSM_SECTOR_SIZE` (bytes),
  `SECTORFSM_UNSEALED`, `SECTORFSM_SEALED`, `SECTORFSM_CACHE` (absolute paths in Lotus's
  layout under the storage path the scheduler chose; the directories above them exist), and
  `SECTORFSM_TICKET` (PC1, C1) and `SECTORFSM_SEED` (C1) as hex.
* **Stdin:** one JSON object. AP: `{"offset", "size", "existing", "piece"}` where `piece` is
  null for a zero filler or `{"piece_cid", "size", "data_path", "deal_id"}`; PC1:
  `{"ticket", "pieces": [{"piece_cid", "size", "deal_id"}]}`; PC2: `{"pc1_out"}`; C1:
  `{"ticket", "seed", "pieces", "sealed", "unsealed"}`; C2: `{"c1_out"}`; FIN:
  `{"keep_unsealed"}`; RELEASE_UNSEALED and REMOVE: `{}`. Bytes are hex strings.
* **Stdout:** one JSON object. AP `{"piece_cid"}`; PC1 `{"pc1_out": hex}`; PC2
  `{"sealed": CommR CID, "unsealed": CommD CID}`; C1 `{"c1_out": hex}`; C2 `{"proof": hex}`;
  FIN, RELEASE_UNSEALED, REMOVE: `{}` (or nothing).
* **Lifetime:** a command dies with the engine (Linux: `PR_SET_PDEATHSIG`, SIGKILL). Each
  job also holds an exclusive `flock` on `<first storage path>/locks/s-t0<miner>-<n>.lock`,
  inherited as file descriptor `SECTORFSM_LOCK_FD`; helper processes it starts keep the lock
  as long as they keep that descriptor open. A restarted engine that finds the lock held by
  a job it did not start (one that outlived a `kill -9`) kills that job's process group
  before it starts a new one, so two jobs never work on one sector's files.
* **Failure:** a non-zero exit fails the task; the tail of stderr is in the error, so it
  lands in the sector's log (the failure event's trace). Output that is not the expected JSON
  fails it too. A task that outlives its timeout, or whose step is cancelled (remove,
  terminate, engine shutdown), gets SIGTERM to its whole process group, then SIGKILL after
  `kill_grace` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...fsm import Clock
from ...sched import FileType, SectorRef, TaskType, WorkerSpec
from .. import commp
from ..info import PendingPiece, Piece
from ..sealer import PreCommit2Out
from .files import (
    SectorPaths,
    Storage,
    check_roots,
    check_storage,
    local_workers,
    remove_files,
    run_in_thread,
    scan_sector_files,
)
from .joblock import LOCKS, JobLockError, die_with, job_lock, record_job, take_over

if TYPE_CHECKING:
    from ...sched import Job

#: Tasks that need a command, by their Lotus short name.
REQUIRED = ("AP", "PC1", "PC2", "C1", "C2", "FIN")
#: Not scheduled tasks (no Lotus short name): deletions, done by the engine when not set.
OPTIONAL = ("RELEASE_UNSEALED", "REMOVE")
DEFAULT_TIMEOUT = 3600.0
DEFAULT_KILL_GRACE = 5.0
#: Stderr bytes kept for the error message; stdout bytes accepted (results are small).
STDERR_TAIL = 2000
STDOUT_LIMIT = 16 << 20
#: Seconds to wait for the pipes to close after the process exits (a background child that
#: inherited them could hold them open forever).
PIPE_GRACE = 5.0
_OPTIONS = {"commands", "timeout", "timeouts", "kill_grace", "env", "storage"}


class CommandConfigError(ValueError):
    """The `command` backend's options are invalid (the message names the task and path)."""


class CommandError(RuntimeError):
    """A sealing command failed, timed out, or printed something other than its result."""


@dataclass(frozen=True, slots=True)
class Command:
    """One task's executable and its timeout (seconds of real time)."""

    argv: tuple[str, ...]
    timeout: float


def _task_key(key: object) -> str:
    if not isinstance(key, str):
        raise CommandConfigError(f"commands: task names are strings, got {key!r}")
    if key.upper() in OPTIONAL:
        return key.upper()
    try:
        short = TaskType.parse(key).short
    except ValueError:
        short = ""
    if short not in REQUIRED:
        known = ", ".join(REQUIRED + OPTIONAL)
        raise CommandConfigError(f"commands: unknown task {key!r} (tasks: {known})")
    return short


def _argv(task: str, value: object) -> tuple[str, ...]:
    try:
        argv = shlex.split(value) if isinstance(value, str) else value
    except ValueError as exc:  # unbalanced quotes
        raise CommandConfigError(f"command for {task}: {exc}: {value!r}") from None
    if not isinstance(argv, list | tuple) or not argv or not all(isinstance(a, str) for a in argv):
        raise CommandConfigError(
            f"command for {task} must be a non-empty list of strings or a string: {value!r}"
        )
    exe = argv[0]
    if os.sep in exe or (os.altsep and os.altsep in exe):
        path = Path(exe)
        if not path.exists():
            raise CommandConfigError(f"command for {task}: {exe} does not exist")
        if not path.is_file():
            raise CommandConfigError(f"command for {task}: {exe} is not a file")
        if not os.access(path, os.X_OK):
            raise CommandConfigError(f"command for {task}: {exe} is not executable")
    elif shutil.which(exe) is None:
        raise CommandConfigError(f"command for {task}: {exe!r} is not found on PATH")
    return tuple(argv)


def _seconds(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise CommandConfigError(f"{what} must be a positive number of seconds: {value!r}")
    return float(value)


def parse_commands(options: Mapping[str, Any]) -> dict[str, Command]:
    """The commands of `options`, checked: every task present, every executable runnable."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise CommandConfigError(
            f"unknown option(s) for the command sealer: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_OPTIONS))})"
        )
    given = options.get("commands")
    if not isinstance(given, Mapping):
        raise CommandConfigError(
            "the command sealer needs sealer_options['commands']: a command per task "
            f"({', '.join(REQUIRED)})"
        )
    default = _seconds("timeout", options.get("timeout", DEFAULT_TIMEOUT))
    timeouts: dict[str, float] = {}
    per_task = options.get("timeouts") or {}
    if not isinstance(per_task, Mapping):
        raise CommandConfigError(f"timeouts must map task names to seconds: {per_task!r}")
    for key, value in per_task.items():
        task = _task_key(key)
        timeouts[task] = _seconds(f"timeouts[{key!r}]", value)
    commands: dict[str, Command] = {}
    for key, value in given.items():
        task = _task_key(key)
        if task in commands:
            raise CommandConfigError(f"commands: {task} is given twice")
        commands[task] = Command(_argv(task, value), timeouts.get(task, default))
    for task in REQUIRED:
        if task not in commands:
            name = TaskType.parse(task).name
            raise CommandConfigError(
                f"no command for task {task} ({name}): set sealer_options['commands']['{task}']"
            )
    return commands


@dataclass(frozen=True, slots=True)
class CommandOptions:
    """`sealer_options` of the command backend, checked (storage aside)."""

    commands: dict[str, Command]
    kill_grace: float
    env: dict[str, str]


def parse_options(options: Mapping[str, Any]) -> CommandOptions:
    """The commands, kill grace and environment of `options`; raises CommandConfigError."""
    commands = parse_commands(options)
    grace = _seconds("kill_grace", options.get("kill_grace", DEFAULT_KILL_GRACE))
    env = options.get("env") or {}
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise CommandConfigError(f"env must map names to strings: {env!r}")
    return CommandOptions(commands, grace, dict(env))


class CommandBackend:
    """Runs each task's configured executable; files live under the storage `roots`."""

    name = "command"

    def __init__(
        self,
        clock: Clock,
        miner: int,
        roots: Mapping[str, Path],
        commands: Mapping[str, Command],
        *,
        kill_grace: float = DEFAULT_KILL_GRACE,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.clock = clock
        self.miner = miner
        self.storage = Storage(roots)
        self.commands = dict(commands)
        self.kill_grace = kill_grace
        self.env = dict(env or {})
        #: Pids of the commands running now (for tests and diagnostics).
        self.running: dict[int, str] = {}
        #: One job per sector at a time in this engine (the lock file covers other engines).
        self._sector_locks: dict[int, asyncio.Lock] = {}

    @property
    def path_ids(self) -> tuple[str, ...]:
        """The storage path ids this backend has directories for."""
        return tuple(self.storage.roots)

    def scan_files(self) -> dict[tuple[str, int, FileType], int]:
        """This miner's sector files on disk (see `files.scan_sector_files`)."""
        return scan_sector_files(self.storage.roots, self.miner)

    @classmethod
    def from_options(
        cls, clock: Clock, miner: int, roots: Mapping[str, Path], options: Mapping[str, Any]
    ) -> CommandBackend:
        """Build from `sealer_options` (see the module docstring); raises CommandConfigError."""
        parsed = parse_options(options)
        return cls(
            clock, miner, roots, parsed.commands, kill_grace=parsed.kill_grace, env=parsed.env
        )

    # -- running a command ---------------------------------------------------------------

    async def _call(
        self,
        task: str,
        sector: SectorRef,
        paths: SectorPaths,
        request: dict[str, Any],
        **env: str,
    ) -> dict[str, Any]:
        cmd = self.commands[task]
        full = {
            **os.environ,
            **self.env,
            "SECTORFSM_TASK": task,
            "SECTORFSM_MINER": str(self.miner),
            "SECTORFSM_SECTOR_ID": str(sector.number),
            "SECTORFSM_SECTOR": str(sector),
            "SECTORFSM_SECTOR_SIZE": str(sector.size),
            "SECTORFSM_UNSEALED": str(paths.unsealed.absolute()),
            "SECTORFSM_SEALED": str(paths.sealed.absolute()),
            "SECTORFSM_CACHE": str(paths.cache.absolute()),
            **{f"SECTORFSM_{k.upper()}": v for k, v in env.items()},
        }
        label = f"{task} command for sector {sector} ({shlex.join(cmd.argv)})"
        mine = self._sector_locks.setdefault(sector.number, asyncio.Lock())
        self.clock.hold()  # real work: simulated time must not jump meanwhile
        try:
            async with mine:
                with job_lock(self.lock_path(sector)) as fd:
                    try:
                        await take_over(fd, self.lock_path(sector), self.kill_grace)
                    except JobLockError as exc:
                        raise CommandError(f"{label}: {exc}") from None
                    full["SECTORFSM_LOCK_FD"] = str(fd)
                    out = await self._spawn(cmd, full, json.dumps(request).encode(), label, fd)
        finally:
            self.clock.release()
        if not out.strip():
            return {}
        try:
            result = json.loads(out)
        except ValueError as exc:
            raise CommandError(
                f"{label} printed invalid JSON on stdout ({exc}): {_excerpt(out)}"
            ) from None
        if not isinstance(result, dict):
            raise CommandError(f"{label} printed JSON that is not an object: {_excerpt(out)}")
        return result

    def lock_path(self, sector: SectorRef) -> Path:
        """The job lock file of `sector` (one per sector, whichever path holds its files)."""
        return next(iter(self.storage.roots.values())) / LOCKS / f"{sector}.lock"

    async def _spawn(
        self, cmd: Command, env: dict[str, str], stdin: bytes, label: str, lock_fd: int
    ) -> bytes:
        starting = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *cmd.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group: killpg reaches its children
                pass_fds=(lock_fd,),  # the job holds the lock for as long as it lives
                preexec_fn=die_with(os.getpid()),
            )
        )
        try:
            proc = await asyncio.shield(starting)
        except OSError as exc:
            raise CommandError(f"{label}: cannot start: {exc}") from None
        except BaseException:
            # Cancelled while the command starts (remove, terminate, shutdown). Cancelling
            # the start itself would kill only the leader and then wait for every pipe to
            # close, which its children hold open: let it start, then end the whole group.
            with contextlib.suppress(OSError):
                await asyncio.shield(self._kill(await asyncio.shield(starting)))
            raise
        record_job(lock_fd, proc.pid)  # for an engine that finds the lock held after a crash
        self.running[proc.pid] = label
        out, err = bytearray(), bytearray()
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        io = [
            asyncio.ensure_future(_feed(proc.stdin, stdin)),
            asyncio.ensure_future(_read(proc.stdout, out, STDOUT_LIMIT, keep_tail=False)),
            asyncio.ensure_future(_read(proc.stderr, err, STDERR_TAIL, keep_tail=True)),
        ]
        try:
            try:
                await asyncio.wait_for(proc.wait(), cmd.timeout)
            except TimeoutError:
                await self._kill(proc)
                await _drain(io)
                raise CommandError(
                    f"{label} timed out after {cmd.timeout:g} s and was killed{_tail(err)}"
                ) from None
            except BaseException:
                # Cancelled (remove, terminate, shutdown): the whole group goes, and the
                # step ends only once it is gone.
                await asyncio.shield(self._kill(proc))
                raise
            await _drain(io)
        finally:
            self.running.pop(proc.pid, None)
            for t in io:
                t.cancel()
        if proc.returncode != 0:
            code = proc.returncode or 0
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise CommandError(f"{label} {how}{_tail(err)}")
        if len(out) > STDOUT_LIMIT:
            raise CommandError(f"{label} printed more than {STDOUT_LIMIT} bytes on stdout")
        return bytes(out)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; reap the leader."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), self.kill_grace)
        # Members that outlived the leader (or ignored SIGTERM) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    # -- the tasks -------------------------------------------------------------------------

    async def add_piece(
        self, job: Job, existing: list[int], size: int, piece: PendingPiece | None
    ) -> Piece:
        """AP: the command writes the piece and prints its CommP."""
        paths = self.storage.locate(job.sector, job.placement)
        request = {
            "offset": sum(existing),
            "size": size,
            "existing": existing,
            "piece": None if piece is None else _pending(piece),
        }
        result = await self._call("AP", job.sector, paths, request)
        cid = _field(result, "piece_cid", str, "AP")
        return Piece(cid, size, piece.deal if piece is not None else None)

    async def pre_commit1(self, job: Job, ticket: bytes, pieces: list[Piece]) -> bytes:
        """PC1: prints its opaque output as hex."""
        paths = self.storage.locate(job.sector, job.placement, fetch=("unsealed",))
        paths.cache.mkdir(parents=True, exist_ok=True)
        request = {"ticket": ticket.hex(), "pieces": [_piece(p) for p in pieces]}
        result = await self._call("PC1", job.sector, paths, request, ticket=ticket.hex())
        return _hex(result, "pc1_out", "PC1")

    async def pre_commit2(self, job: Job, pc1out: bytes) -> PreCommit2Out:
        """PC2: prints CommR and CommD."""
        paths = self.storage.locate(job.sector, job.placement, fetch=("cache", "sealed"))
        paths.cache.mkdir(parents=True, exist_ok=True)
        result = await self._call("PC2", job.sector, paths, {"pc1_out": pc1out.hex()})
        sealed = _field(result, "sealed", str, "PC2")
        unsealed = _field(result, "unsealed", str, "PC2")
        try:
            commp.parse_sealed_cid(sealed)
            commp.parse_piece_cid(unsealed)
        except (TypeError, ValueError) as exc:
            raise CommandError(f"PC2 command for sector {job.sector}: {exc}") from None
        return PreCommit2Out(sealed, unsealed)

    async def commit1(
        self, job: Job, ticket: bytes, seed: bytes, pieces: list[Piece], cids: PreCommit2Out
    ) -> bytes:
        """C1: prints its opaque output as hex."""
        paths = self.storage.locate(job.sector, job.placement)
        request = {
            "ticket": ticket.hex(),
            "seed": seed.hex(),
            "pieces": [_piece(p) for p in pieces],
            "sealed": cids.sealed,
            "unsealed": cids.unsealed,
        }
        env = {"ticket": ticket.hex(), "seed": seed.hex()}
        result = await self._call("C1", job.sector, paths, request, **env)
        return _hex(result, "c1_out", "C1")

    async def commit2(self, job: Job, c1out: bytes) -> bytes:
        """C2: prints the proof as hex."""
        paths = self.storage.locate(job.sector, job.placement)
        result = await self._call("C2", job.sector, paths, {"c1_out": c1out.hex()})
        return _hex(result, "proof", "C2")

    async def finalize(self, job: Job, keep_unsealed: bool) -> None:
        """FIN: the command drops the scratch files (and the unsealed one unless kept)."""
        paths = self.storage.locate(job.sector, job.placement)
        await self._call("FIN", job.sector, paths, {"keep_unsealed": keep_unsealed})

    async def release_unsealed(self, sector: SectorRef) -> None:
        """RELEASE_UNSEALED if configured, else delete the unsealed file wherever it is."""
        if "RELEASE_UNSEALED" in self.commands:
            paths = self.storage.locate(sector, None)
            await self._call("RELEASE_UNSEALED", sector, paths, {})
            return
        await run_in_thread(self.clock, remove_files, self.storage.everywhere(sector, "unsealed"))

    async def remove(self, sector: SectorRef) -> None:
        """REMOVE if configured, else delete the sector's files on every path."""
        if "REMOVE" in self.commands:
            await self._call("REMOVE", sector, self.storage.locate(sector, None), {})
            self._forget(sector)
            return
        kinds = ("unsealed", "sealed", "cache")
        files = [p for kind in kinds for p in self.storage.everywhere(sector, kind)]
        await run_in_thread(self.clock, remove_files, files)
        self._forget(sector)

    def _forget(self, sector: SectorRef) -> None:
        self.storage.forget(sector)  # its owner markers (after the files)
        # No job runs on a removed sector's files any more: its lock file can go.
        self.lock_path(sector).unlink(missing_ok=True)
        self._sector_locks.pop(sector.number, None)


class CommandFactory:
    """The registry's `command`: operator executables per task, files under the storage paths."""

    name = "command"
    keeps_files = True

    def check(
        self, repo: Path, options: Mapping[str, Any], workers: Sequence[WorkerSpec] | None
    ) -> None:
        """The storage directories are given well; every task has a runnable command."""
        check_storage(repo, options, workers)
        parse_options(options)

    def create(
        self,
        *,
        clock: Clock,
        miner: int,
        repo: Path,
        options: Mapping[str, Any],
        time_scale: float,
    ) -> CommandBackend:
        """A `CommandBackend`, its storage directories created."""
        roots = check_storage(repo, options, None)
        backend = CommandBackend.from_options(clock, miner, roots, options)
        check_roots(roots)
        return backend

    def default_workers(self, repo: Path) -> list[WorkerSpec]:
        """One local worker whose one path is `<repo>/storage` (`files.local_workers`)."""
        return local_workers(repo)


async def _feed(stream: asyncio.StreamWriter, data: bytes) -> None:
    # A command that does not read its input, or exits early, is not an error in itself.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stream.write(data)
        await stream.drain()
        stream.close()


async def _read(stream: asyncio.StreamReader, buf: bytearray, limit: int, keep_tail: bool) -> None:
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        buf += chunk
        if len(buf) > limit:
            # Keep reading (a blocked writer would never exit); keep the tail of stderr, and
            # one byte past the limit of stdout so that the caller can tell it overflowed.
            if keep_tail:
                del buf[:-limit]
            else:
                del buf[limit + 1 :]


async def _drain(io: Sequence[asyncio.Future[None]]) -> None:
    """Let the pipe readers finish, for a little while at most."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*io, return_exceptions=True), PIPE_GRACE)


def _tail(err: bytearray) -> str:
    text = err.decode("utf-8", "replace").strip()
    return f"; stderr (last {STDERR_TAIL} bytes):\n{text}" if text else " (no stderr output)"


def _excerpt(out: bytes) -> str:
    text = out.decode("utf-8", "replace").strip()
    return text if len(text) <= 200 else text[:200] + "..."


def _field(result: dict[str, Any], key: str, kind: type, task: str) -> Any:
    value = result.get(key)
    if not isinstance(value, kind):
        raise CommandError(
            f"{task} command printed {json.dumps(result)[:200]}: expected {key!r} ({kind.__name__})"
        )
    return value


def _hex(result: dict[str, Any], key: str, task: str) -> bytes:
    value = _field(result, key, str, task)
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CommandError(
            f"{task} command printed {key!r} that is not hex: {value[:80]!r}"
        ) from None


def _piece(p: Piece) -> dict[str, Any]:
    return {
        "piece_cid": p.piece_cid,
        "size": p.size,
        "deal_id": p.deal.deal_id if p.deal is not None else None,
    }


def _pending(p: PendingPiece) -> dict[str, Any]:
    return {
        "piece_cid": p.piece_cid,
        "size": p.size,
        "data_path": p.data_path,
        "deal_id": p.deal.deal_id,
    }
