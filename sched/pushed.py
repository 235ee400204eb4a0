"""Policies that do not come from a file on this machine: what remote workers push.

A `sectors worker` reads and hot-reloads its own `myscheduler.json` and sends the result
with every heartbeat; `PushedPolicy` holds it for the scheduler behind the same interface
(`PolicySource`) as `PolicyWatcher`, so the rules never know where a policy came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from .policy import MYSCHEDULER_DEFAULTS, PolicyError, WorkerPolicy, parse_policy


class PolicySource(Protocol):
    """Where a worker's policy comes from: a file here (`PolicyWatcher`) or a remote worker."""

    @property
    def path(self) -> Path:
        """The policy file (on the worker's machine for a pushed policy)."""
        ...

    @property
    def policy(self) -> WorkerPolicy:
        """The last good policy."""
        ...

    @property
    def error(self) -> str | None:
        """Why the current content is not in effect, or None if it is."""
        ...

    @property
    def loaded_at(self) -> float | None:
        """When `policy` last changed, or None if never."""
        ...

    def poll(self) -> bool:
        """True if `policy` changed since the last poll."""
        ...


class PushedPolicy:
    """A policy a remote worker read from its own file and pushed with its heartbeats.

    The worker keeps the last good policy on a bad edit and says why in `error`; the engine
    parses the pushed fields again and, if it cannot, keeps its own last good policy too.
    Like `PolicyWatcher`, a file that was never valid disables every stage (fail closed).
    """

    __slots__ = ("_changed", "_error", "_had_good", "_loaded_at", "_policy", "path")

    def __init__(self, source: str) -> None:
        self.path = Path(source)
        self._policy = WorkerPolicy()
        self._error: str | None = None
        self._loaded_at: float | None = None
        self._had_good = False
        self._changed = False

    @property
    def policy(self) -> WorkerPolicy:
        """The last good policy (`WorkerPolicy()` until one was pushed)."""
        return self._policy

    @property
    def error(self) -> str | None:
        """The worker's (or the engine's) reason the file's content is not in effect."""
        return self._error

    @property
    def loaded_at(self) -> float | None:
        """The worker's wall-clock time when the policy in force was loaded."""
        return self._loaded_at

    def poll(self) -> bool:
        """True once after `update` changed the policy."""
        changed, self._changed = self._changed, False
        return changed

    def update(
        self,
        fields: Mapping[str, object] | None,
        error: str | None,
        loaded_at: float | None,
    ) -> bool:
        """Take what the worker pushed; True if the policy in force changed."""
        policy: WorkerPolicy | None = None
        if fields is not None:
            try:
                policy = parse_policy(fields, source=str(self.path))
            except PolicyError as err:
                error = f"{err}; keeping the last good policy"
        if policy is None:
            self._error = error
            if self._had_good or self._policy == MYSCHEDULER_DEFAULTS or error is None:
                return False
            policy = MYSCHEDULER_DEFAULTS  # never valid: fail closed
        else:
            self._error = error
            self._had_good = True
        if policy == self._policy:
            return False
        self._policy = policy
        self._loaded_at = loaded_at
        self._changed = True
        return True
