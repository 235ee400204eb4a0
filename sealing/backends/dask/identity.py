"""What a `sectors worker` tells the engine: its identity at join, its state on each heartbeat.

The wire is plain dicts (Dask msgpacks them), under one key in the worker's
`startup_information` (read once, as `WorkerState.extra[IDENTITY_KEY]`) and one key in its
heartbeat `metrics` (`WorkerState.metrics[METRICS_KEY]`, refreshed on every heartbeat):

```python
extra["sectorfsm"] = {
    "version": 1, "name": "pc1-box", "backend": "reference",
    "resources": {"cpus": 64, "memory": 549755813888, "swap": 0, "gpus": ["RTX 3090"]},
    "tasks": ["seal/v0/addpiece", "seal/v0/precommit/1"],
    "overrides": {"PC1_32G_MAX_CONCURRENT": 4},      # as `[[workers]] resources` in sectors.toml
    "paths": [{"id": "nvme", "path": "/mnt/nvme", "capacity": 8796093022208,
               "seal": True, "store": False}],
    "policy": POLICY,
    # The sector files under its paths when it started (named as the dask sealer writes
    # them: `{path}/{kind}/s-t0{miner}-{number}`), so the engine can reconcile its index.
    "files": [{"path": "nvme", "kind": "sealed", "name": "s-t01000-7", "size": 2048}],
}
metrics["sectorfsm"] = {"free": {"nvme": 123}, "policy": POLICY, "jobs": {"PC1-s1-a1": "running"}}
POLICY = {"file": "/etc/sectors/myscheduler.json" | None,
          "fields": {"PreCommit1Max": 2, ...} | None,   # myScheduler's keys; None: no file
          "error": "why the file's content is not in effect" | None,
          "loaded_at": 1767225600.0 | None}              # wall-clock seconds
```

The worker reads its policy file itself (so edits on the worker machine take effect), and a
bad edit keeps the last good `fields` with `error` set. `from_wire` validates: a malformed
message is a one-line `ValueError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from ....sched.ledger import WorkerResources
from ....sched.policy import PolicyError, WorkerPolicy, parse_policy
from ....sched.resources import ResourceConfigError, parse_overrides
from ....sched.storage import StoragePath
from ....sched.tasks import TaskType
from ....sched.workers import WorkerSpec
from ....validation import MAX_INT, ConfigError, validate

#: The `startup_information` key of a worker's identity.
IDENTITY_KEY = "sectorfsm"
#: The heartbeat `metrics` key of a worker's state.
METRICS_KEY = "sectorfsm"
#: The wire format's version; a worker that sends another is refused.
VERSION = 1

Backend = Literal["reference", "command"]

_WIRE = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
_Int = Annotated[int, Strict(), Field(ge=0, le=MAX_INT)]
_Name = Annotated[str, Field(min_length=1)]


class _Resources(BaseModel):
    model_config = _WIRE
    cpus: Annotated[int, Strict(), Field(ge=1, le=1 << 20)]
    memory: _Int
    swap: _Int = 0
    gpus: list[str] = []


class _Path(BaseModel):
    model_config = _WIRE
    id: _Name
    path: _Name
    capacity: _Int
    seal: bool = True
    store: bool = False


class _Policy(BaseModel):
    model_config = _WIRE
    file: str | None = None
    fields: dict[str, Any] | None = None
    error: str | None = None
    loaded_at: Annotated[float, Field(allow_inf_nan=False)] | None = None


class _Held(BaseModel):
    model_config = _WIRE
    path: _Name
    kind: Literal["unsealed", "sealed", "cache"]
    name: _Name
    size: _Int


class _Identity(BaseModel):
    model_config = _WIRE
    version: Literal[1]
    name: _Name
    backend: Backend = "reference"
    resources: _Resources
    tasks: list[str]
    overrides: dict[str, Any] = {}
    paths: list[_Path] = []
    policy: _Policy = _Policy()
    files: list[_Held] = []


class _Heartbeat(BaseModel):
    model_config = _WIRE
    free: dict[str, _Int] = {}
    policy: _Policy = _Policy()
    jobs: dict[str, str] = {}


@dataclass(slots=True)
class PolicyReport:
    """The worker's policy file as the worker last read it."""

    #: The file the worker watches; None when it has none (no restrictions).
    file: str | None = None
    #: The policy in force, under myScheduler's keys; None while no file was ever read.
    fields: dict[str, Any] | None = None
    #: Why the file's current content is not in effect (a bad edit), else None.
    error: str | None = None
    #: Wall-clock time the policy in force was loaded, or None.
    loaded_at: float | None = None

    def to_wire(self) -> dict[str, Any]:
        """The report as the contract's POLICY dict."""
        fields = None if self.fields is None else dict(self.fields)
        return {
            "file": self.file,
            "fields": fields,
            "error": self.error,
            "loaded_at": self.loaded_at,
        }

    @classmethod
    def from_wire(cls, data: object) -> PolicyReport:
        """A report from a POLICY dict; one-line `ValueError` if malformed."""
        return _policy(_check(_Policy, data, "worker policy"))

    def policy(self) -> WorkerPolicy | None:
        """The policy in force as a `WorkerPolicy`, or None if the worker has no policy file."""
        if self.fields is None:
            return None
        try:
            return parse_policy(self.fields, source=f"policy of {self.file or 'worker'}")
        except PolicyError as exc:
            raise ValueError(str(exc)) from None


@dataclass(slots=True)
class WorkerPathInfo:
    """One storage path on the worker machine (`path` is the worker's own directory)."""

    id: str
    path: str
    capacity: int
    seal: bool = True
    store: bool = False


@dataclass(frozen=True, slots=True)
class HeldFile:
    """A sector file the worker found under one of its paths (named, sized, not hashed)."""

    path_id: str
    #: "unsealed", "sealed" or "cache" (the directory it is in).
    kind: str
    #: The sector's name, `s-t0{miner}-{number}`.
    name: str
    size: int


@dataclass(slots=True)
class WorkerIdentity:
    """What a `sectors worker` declares once, when it joins the cluster."""

    name: str
    resources: WorkerResources
    tasks: frozenset[TaskType]
    backend: Backend = "reference"
    #: `[[workers]] resources` overrides as written in the config (Lotus env-style names).
    overrides: dict[str, Any] = field(default_factory=dict)
    paths: tuple[WorkerPathInfo, ...] = ()
    policy: PolicyReport = field(default_factory=PolicyReport)
    #: The sector files under its paths when it joined.
    files: tuple[HeldFile, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The identity as the `startup_information` dict (`files` only when it holds some)."""
        r = self.resources
        wire: dict[str, Any] = {
            "version": VERSION,
            "name": self.name,
            "backend": self.backend,
            "resources": {
                "cpus": r.cpus,
                "memory": r.mem_physical,
                "swap": r.mem_swap,
                "gpus": list(r.gpus),
            },
            "tasks": sorted(t.value for t in self.tasks),
            "overrides": dict(self.overrides),
            "paths": [
                {
                    "id": p.id,
                    "path": p.path,
                    "capacity": p.capacity,
                    "seal": p.seal,
                    "store": p.store,
                }
                for p in self.paths
            ],
            "policy": self.policy.to_wire(),
        }
        if self.files:
            wire["files"] = [
                {"path": f.path_id, "kind": f.kind, "name": f.name, "size": f.size}
                for f in self.files
            ]
        return wire

    @classmethod
    def from_wire(cls, data: object) -> WorkerIdentity:
        """An identity from its dict; a one-line `ValueError` naming the bad field."""
        m: _Identity = _check(_Identity, data, "worker identity")
        where = f"worker identity {m.name!r}"
        tasks: set[TaskType] = set()
        for text in m.tasks:
            try:
                tasks.add(TaskType.parse(text))
            except ValueError as exc:
                raise ValueError(f"{where}: tasks: {exc}") from None
        if not tasks:
            raise ValueError(f"{where}: tasks: a worker must run at least one task")
        try:
            parse_overrides(m.overrides)
        except ResourceConfigError as exc:
            raise ValueError(f"{where}: overrides: {exc}") from None
        ids = [p.id for p in m.paths]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"{where}: paths: duplicate path id(s) {dupes}")
        strays = sorted({f.path for f in m.files} - set(ids))
        if strays:
            raise ValueError(f"{where}: files: on undeclared path id(s) {strays}")
        r = m.resources
        return cls(
            name=m.name,
            resources=WorkerResources(
                cpus=r.cpus, mem_physical=r.memory, mem_swap=r.swap, gpus=tuple(r.gpus)
            ),
            tasks=frozenset(tasks),
            backend=m.backend,
            overrides=dict(m.overrides),
            paths=tuple(WorkerPathInfo(p.id, p.path, p.capacity, p.seal, p.store) for p in m.paths),
            policy=_policy(m.policy),
            files=tuple(HeldFile(f.path, f.kind, f.name, f.size) for f in m.files),
        )

    def to_spec(self) -> WorkerSpec:
        """The scheduler's `WorkerSpec` (no policy file: the policy comes from the worker)."""
        paths = tuple(
            StoragePath(p.id, self.name, p.capacity, can_seal=p.seal, can_store=p.store)
            for p in self.paths
        )
        return WorkerSpec(
            name=self.name,
            resources=self.resources,
            task_types=self.tasks,
            paths=paths,
            overrides=parse_overrides(self.overrides) if self.overrides else None,
            policy_file=None,
            remote=True,
        )


@dataclass(slots=True)
class WorkerHeartbeat:
    """What a `sectors worker` reports on every heartbeat."""

    #: Free bytes per storage path id.
    free: dict[str, int] = field(default_factory=dict)
    policy: PolicyReport = field(default_factory=PolicyReport)
    #: Job id -> state (`jobs.JobState` values) of the jobs the worker has records of.
    jobs: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The heartbeat as the `metrics` dict."""
        return {"free": dict(self.free), "policy": self.policy.to_wire(), "jobs": dict(self.jobs)}

    @classmethod
    def from_wire(cls, data: object) -> WorkerHeartbeat:
        """A heartbeat from its dict; a one-line `ValueError` naming the bad field."""
        m: _Heartbeat = _check(_Heartbeat, data, "worker heartbeat")
        return cls(dict(m.free), _policy(m.policy), dict(m.jobs))


def _policy(m: _Policy) -> PolicyReport:
    return PolicyReport(m.file, None if m.fields is None else dict(m.fields), m.error, m.loaded_at)


def _check(model: type[BaseModel], data: object, what: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a dict, got {type(data).__name__}")
    try:
        return validate(model, data, what)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
