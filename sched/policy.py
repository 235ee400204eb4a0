"""Per-worker operator policy (myScheduler's `myscheduler.json`): parsing and hot reload.

An operator caps each stage per worker, binds stages to the worker that holds the sector's
files, limits the disk a worker may fill and drains a worker before maintenance. The knobs and
the rules are myScheduler's (`canHandleRequestMine`, in its Lotus ~v1.10 fork); this
package only decides, it never counts: `rules.py` applies a policy to the counts the scheduler
supplies through `rules.WorkerView`.

Two sets of defaults, on purpose:

- `WorkerPolicy()` is "no policy file": no caps, no bindings, no disk limits.
- A file is read the way myScheduler reads it: every field the file leaves out takes
  myScheduler's default (`MYSCHEDULER_DEFAULTS`), so an omitted `PreCommit1Max` is 0 and PC1 is
  *disabled*, and ForceP1FromLocalAP / ForceP2FromLocalP1 are on. `null` for a stage cap means
  "no cap" (myScheduler has no way to say that).

`AllowDelay` (seconds; myScheduler's default 3, 0 = off) is defined here because myScheduler's
manual only says it "delays the first round of assignment": the delay starts when a task the
worker held is released (finished, failed or cancelled), and until `allow_delay` seconds of the
scheduler's clock have passed the worker takes no new AP/PC1/PC2/C1/C2. So the scheduling round
that the release itself triggers never refills the worker: the finished sector's next task and
the other workers' releases reach the queue first, and the freed slot goes to the most urgent
of them rather than to whichever task was queued when the slot opened (`rules.delay_refusal`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "MINER_POLICY_FILE",
    "MYSCHEDULER_DEFAULTS",
    "PolicyError",
    "PolicyWatcher",
    "WorkerPolicy",
    "load_policy",
    "parse_policy",
    "write_default",
]


class PolicyError(ValueError):
    """A policy file or mapping is malformed; says where (source, line, column) and which key."""

    def __init__(
        self,
        source: str,
        detail: str,
        *,
        key: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.source = source
        self.detail = detail
        self.key = key
        self.line = line
        self.column = column
        where = source
        if line is not None:
            where += f":{line}" + (f":{column}" if column is not None else "")
        super().__init__(f"{where}: {detail}")


_Kind = Literal["str", "cap", "units", "bool", "seconds", "count"]


@dataclass(frozen=True, slots=True)
class _Field:
    camel: str
    snake: str
    kind: _Kind


_FIELDS = (
    _Field("WorkerName", "worker_name", "str"),
    _Field("AddPieceMax", "add_piece_max", "cap"),
    _Field("PreCommit1Max", "pre_commit1_max", "cap"),
    _Field("PreCommit2Max", "pre_commit2_max", "cap"),
    _Field("Commit2Max", "commit2_max", "cap"),
    _Field("DiskHoldMax", "disk_hold_max", "units"),
    _Field("APDiskHoldMax", "ap_disk_hold_max", "units"),
    _Field("ForceP1FromLocalAP", "force_p1_from_local_ap", "bool"),
    _Field("ForceP2FromLocalP1", "force_p2_from_local_p1", "bool"),
    _Field("ForceC2FromLocalP2", "force_c2_from_local_p2", "bool"),
    _Field("IsPlanOffline", "is_plan_offline", "bool"),
    _Field("AllowP2C2Parallel", "allow_p2c2_parallel", "bool"),
    _Field("IgnoreOutOfSpace", "ignore_out_of_space", "bool"),
    _Field("AutoPledgeDiff", "auto_pledge_diff", "count"),
    _Field("AllowDelay", "allow_delay", "seconds"),
)
_BY_KEY = {k: f for f in _FIELDS for k in (f.camel, f.snake)}
# Not a placement rule: `sealing/autopledge.py` reads it (the rules never do).
_IGNORED: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class WorkerPolicy:
    """One worker's operator policy; the defaults mean "no policy file: no restrictions".

    Stage caps: None = no cap, 0 = stage disabled on this worker. Disk holds are in
    myScheduler's units (`disk_units`); 0 = unlimited. `allow_delay`: seconds a worker
    takes no new work after one of its tasks is released (see the module docstring); 0 = off.
    """

    worker_name: str = ""
    add_piece_max: int | None = None
    pre_commit1_max: int | None = None
    pre_commit2_max: int | None = None
    commit2_max: int | None = None
    disk_hold_max: int = 0
    ap_disk_hold_max: int = 0
    force_p1_from_local_ap: bool = False
    force_p2_from_local_p1: bool = False
    force_c2_from_local_p2: bool = False
    is_plan_offline: bool = False
    allow_p2c2_parallel: bool = True
    ignore_out_of_space: bool = False
    allow_delay: float = 0.0
    #: Auto-pledge for this worker when its AP + PC1 in flight falls more than this below
    #: PreCommit1Max (0 = off; the rule is `sealing/autopledge.py`'s).
    auto_pledge_diff: int = 0

    def __post_init__(self) -> None:
        for f in _FIELDS:
            value = getattr(self, f.snake)
            if f.kind != "bool" and isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"{f.snake} must be >= 0, not {value}")

    def as_myscheduler(self) -> dict[str, object]:
        """This policy under myScheduler's key names, in its file's order (None caps as null)."""
        return {f.camel: getattr(self, f.snake) for f in _FIELDS}


#: The miner-side policy file, in the repo directory: myScheduler's policy for "external"
#: workers (any build it can schedule), applied to every worker without a policy file of its own.
MINER_POLICY_FILE = "testOpenSource.json"


#: What myScheduler assumes for a key its file leaves out (and writes on first start).
MYSCHEDULER_DEFAULTS = WorkerPolicy(
    worker_name="",
    add_piece_max=0,
    pre_commit1_max=0,
    pre_commit2_max=0,
    commit2_max=0,
    disk_hold_max=0,
    ap_disk_hold_max=0,
    force_p1_from_local_ap=True,
    force_p2_from_local_p1=True,
    force_c2_from_local_p2=False,
    is_plan_offline=False,
    allow_p2c2_parallel=False,
    ignore_out_of_space=False,
    allow_delay=3.0,
)


# --- parsing ---------------------------------------------------------------------------------

_EXPECTED: dict[_Kind, str] = {
    "str": "expected a string",
    "cap": "expected a whole number >= 0 (0 disables the stage) or null (no cap)",
    "units": "expected a whole number of disk units >= 0 (0 = unlimited)",
    "bool": "expected true or false",
    "seconds": "expected a number of seconds >= 0 (0 = no delay)",
    "count": "expected a whole number >= 0 (0 = off)",
}


def _show(value: object) -> str:
    # JSON spelling, because that is what the operator typed (`"4"`, `true`, `null`).
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _valid(kind: _Kind, value: object) -> bool:
    # bool is an int subclass: `1` must not pass for true, nor `true` for 1.
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "cap" and value is None:
        return True
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        # NaN and infinity are not a delay anyone means (TOML can spell both).
        return math.isfinite(value) and value >= 0
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_policy(data: Mapping[str, object], *, source: str = "<policy>") -> WorkerPolicy:
    """A policy from myScheduler or snake_case keys; omitted keys take `MYSCHEDULER_DEFAULTS`."""
    values: dict[str, object] = {}
    given: dict[str, str] = {}
    for key, value in data.items():
        if key in _IGNORED:
            continue
        field = _BY_KEY.get(key)
        if field is None:
            known = [*_BY_KEY, *_IGNORED]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PolicyError(source, f"unknown key {key} = {_show(value)}{hint}", key=key)
        if field.snake in given:
            raise PolicyError(
                source,
                f"{key} = {_show(value)}: {given[field.snake]} is already given; use one",
                key=key,
            )
        if not _valid(field.kind, value):
            raise PolicyError(source, f"{key} = {_show(value)}: {_EXPECTED[field.kind]}", key=key)
        given[field.snake] = key
        values[field.snake] = float(value) if field.kind == "seconds" else value  # type: ignore[arg-type]
    return dataclasses.replace(MYSCHEDULER_DEFAULTS, **values)  # type: ignore[arg-type]


_TOML_POS = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)
_TOML_END = " (at end of document)"


def _toml_error(path: str, text: str, err: tomllib.TOMLDecodeError) -> PolicyError:
    # Python 3.11's TOMLDecodeError carries the position only inside its message.
    message = str(err)
    m = _TOML_POS.match(message)
    if m:
        line, col = int(m["line"]), int(m["col"])
        return PolicyError(path, f"invalid TOML: {m['msg']}", line=line, column=col)
    if message.endswith(_TOML_END):
        lines = text.split("\n")
        detail = f"invalid TOML: {message.removesuffix(_TOML_END)} (at end of file)"
        return PolicyError(path, detail, line=len(lines), column=len(lines[-1]) + 1)
    return PolicyError(path, f"invalid TOML: {message}")


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads silently keeps the last of two equal keys; an operator editing by hand
    # would then see one of their two values ignored with no hint why.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key}")
        out[key] = value
    return out


def _key_line(text: str, key: str, *, toml: bool) -> int | None:
    # Where the offending key is, so the error points at the line to fix.
    k = re.escape(key)
    pattern = re.compile(rf'^\s*(?:{k}|"{k}")\s*=' if toml else rf'"{k}"\s*:')
    for number, line in enumerate(text.split("\n"), start=1):
        if pattern.search(line):
            return number
    return None


def _parse_text(path: str, text: str, *, toml: bool) -> WorkerPolicy:
    data: object
    kind = "TOML" if toml else "JSON"
    if not toml and not text.strip():
        raise PolicyError(path, "invalid JSON: the file is empty (`{}` is the default policy)")
    try:
        if toml:
            data = tomllib.loads(text)
        else:
            data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except tomllib.TOMLDecodeError as err:
        raise _toml_error(path, text, err) from None
    except json.JSONDecodeError as err:
        raise PolicyError(
            path, f"invalid JSON: {err.msg}", line=err.lineno, column=err.colno
        ) from None
    except ValueError as err:
        raise PolicyError(path, f"invalid JSON: {err}") from None
    except RecursionError:
        # A policy is one flat table; only a broken or hostile file nests this deep.
        raise PolicyError(path, f"invalid {kind}: nested too deeply") from None
    if not isinstance(data, dict):
        raise PolicyError(path, f"expected a JSON object {{...}} at the top, not {_show(data)}")
    try:
        return parse_policy(data, source=path)
    except PolicyError as err:
        if err.key is None:
            raise
        line = _key_line(text, err.key, toml=toml)
        raise PolicyError(path, err.detail, key=err.key, line=line) from None


def _is_toml(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise PolicyError(
            str(path), f"unsupported policy file type {suffix!r} (use .json or .toml)"
        )
    return suffix == ".toml"


def _decode(path: str, raw: bytes) -> str:
    # utf-8-sig: editors on Windows like to prepend a BOM, which json.loads rejects.
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PolicyError(path, f"not UTF-8 text (byte {err.start})") from None


def load_policy(path: str | os.PathLike[str]) -> WorkerPolicy:
    """The policy in a `.json` or `.toml` file; PolicyError if malformed, OSError if unreadable."""
    p = Path(path)
    toml = _is_toml(p)
    return _parse_text(str(p), _decode(str(p), p.read_bytes()), toml=toml)


def _whole(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _render_defaults(*, toml: bool) -> str:
    # AutoPledgeDiff is ignored here but written, so the file is the one myScheduler writes.
    # AllowDelay goes last, where the manual's table lists it.
    fields = MYSCHEDULER_DEFAULTS.as_myscheduler()
    delay = fields.pop("AllowDelay")
    fields = {**fields, "AutoPledgeDiff": 0, "AllowDelay": delay}
    # Whole seconds as myScheduler writes them (`3`, not `3.0`).
    fields = {k: _whole(v) for k, v in fields.items()}
    if not toml:
        return json.dumps(fields, indent=2) + "\n"
    # JSON's spellings of these strings, numbers and booleans are also valid TOML.
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in fields.items())


def write_default(path: str | os.PathLike[str], *, overwrite: bool = False) -> bool:
    """Write myScheduler's default policy file; False (untouched) if it exists and not overwrite."""
    p = Path(path)
    text = _render_defaults(toml=_is_toml(p))
    # Write a temporary file and link/rename it into place, so a watcher polling meanwhile
    # never reads a half-written file.
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes it 0600; an operator's config file is normally readable by others.
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, p)
            return True
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        except OSError:
            # A file system without hard links: fall back to an exclusive create.
            try:
                with open(p, "x", encoding="utf-8") as f:
                    f.write(text)
            except FileExistsError:
                return False
        return True
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


# --- hot reload ------------------------------------------------------------------------------

# Within this much of a file's mtime, a second same-size write may keep the mtime (coarse
# timestamps: 2 s on FAT, 1 s on ext3/HFS+, a jiffy on ext4), so the signature cannot be
# trusted and the content is compared instead.
_RACY_NS = 2_000_000_000

_Signature = tuple[int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyWatcher:
    """A worker's policy file, re-read when it changes; bad edits keep the last good policy.

    A missing file means `WorkerPolicy()` (no restrictions). A file that is invalid from the
    start gives `MYSCHEDULER_DEFAULTS` (every stage disabled) until fixed: the file shows the
    operator meant to restrict this worker, so failing open could overfill it.
    """

    __slots__ = (
        "_checked_at",
        "_clock",
        "_error",
        "_had_good",
        "_loaded_at",
        "_min_interval",
        "_policy",
        "_present",
        "_racy",
        "_raw",
        "_sig",
        "_toml",
        "path",
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = 0.0,
    ) -> None:
        self.path = Path(path)
        self._toml = _is_toml(self.path)
        self._clock = clock
        self._min_interval = min_interval
        self._policy = WorkerPolicy()
        self._error: str | None = None
        self._loaded_at: float | None = None
        self._checked_at: float | None = None
        self._sig: _Signature | None = None
        self._raw: bytes | None = None
        self._racy = False
        self._present = False
        self._had_good = False
        self.poll()

    @property
    def policy(self) -> WorkerPolicy:
        """The last good policy (`WorkerPolicy()` while no file has existed)."""
        return self._policy

    @property
    def error(self) -> str | None:
        """Why the file's current content is not in effect, or None if it is."""
        return self._error

    @property
    def loaded_at(self) -> float | None:
        """`clock()` when `policy` last changed from a file, or None if never."""
        return self._loaded_at

    def poll(self) -> bool:
        """Re-read the file if its (mtime, size, inode) changed; True if `policy` changed."""
        now = self._clock()
        if (
            self._min_interval > 0
            and self._checked_at is not None
            and now - self._checked_at < self._min_interval
        ):
            return False
        self._checked_at = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._present:
                self._error = f"{self.path}: file was deleted; keeping the last good policy"
            self._present = False
            self._sig = None
            self._raw = None
            return False
        except OSError as err:
            self._error = f"{self.path}: cannot read: {err.strerror or err}"
            return False
        if _signature(st) == self._sig and not self._racy:
            return False
        return self._read(now)

    def _read(self, now: float) -> bool:
        path = str(self.path)
        try:
            with open(self.path, "rb") as f:
                before = os.fstat(f.fileno())
                raw = f.read()
                after = os.fstat(f.fileno())
        except OSError as err:
            self._error = f"{path}: cannot read: {err.strerror or err}"
            return False
        self._present = True
        sig = _signature(after)
        # A write in progress: leave the signature unrecorded so the next poll reads again.
        self._sig = sig if _signature(before) == sig else None
        age_ns = time.time_ns() - after.st_mtime_ns
        self._racy = age_ns <= _RACY_NS
        if self._had_good and self._racy and age_ns > -_RACY_NS and not raw.strip():
            # Emptied a moment ago: an editor that truncates before it writes is mid-save.
            # Keep the last good policy without an error and read again on the next poll;
            # a file left empty is reported once its mtime is old enough to trust.
            self._sig = None
            return False
        if raw == self._raw:
            return False
        self._raw = raw
        try:
            policy = _parse_text(path, _decode(path, raw), toml=self._toml)
        except PolicyError as err:
            if self._had_good:
                self._error = f"{err}; keeping the last good policy"
                return False
            # Never valid: fail closed rather than run unrestricted (see the class docstring).
            self._error = f"{err}; every stage is disabled until the file is fixed"
            if self._policy == MYSCHEDULER_DEFAULTS:
                return False
            self._policy = MYSCHEDULER_DEFAULTS
            self._loaded_at = now
            return True
        self._error = None
        self._had_good = True
        if policy == self._policy:
            return False
        self._policy = policy
        self._loaded_at = now
        return True
