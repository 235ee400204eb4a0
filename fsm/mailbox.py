"""The mailbox: how writes from other processes (clients) reach a running group.

A group that is not started writes events to the store's `mailbox`; the group that runs the
engine moves them into its machines' inboxes within `poll_interval` seconds, in one commit
with their deletion from the mailbox, so none is lost or applied twice. Entries that cannot
be read are moved to `quarantine` with the reason, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .codec import packb, unpackb
from .errors import RecordError, StoreError

if TYPE_CHECKING:
    from .keys import MachineId
    from .machine import Machine
    from .runtime import MachineRuntime

#: `StateGroup.set_aside`: moves unreadable machine records `(id, raw, reason)` to quarantine.
SetAside = Callable[[list[tuple["MachineId", bytes, str]]], None]

log = logging.getLogger("sectorfsm.fsm")


class MailboxReader:
    """Ingests one group's mailbox entries (the group's engine-side half of client writes)."""

    def __init__(self, runtime: MachineRuntime, set_aside: SetAside) -> None:
        self._runtime = runtime
        self._records = records = runtime.records
        self._store = records.store
        self._committer = records.store.committer
        self._name = records.name
        self._set_aside = set_aside
        #: Mailbox keys taken but not yet committed: the next poll must not take them again.
        self.ingesting: set[bytes] = set()

    async def poll(self, interval: float) -> None:
        """Ingest the mailbox every `interval` seconds, for as long as the group runs."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.ingest()
            except StoreError as exc:
                log.error("%s: reading the mailbox failed: %s", self._name, exc)

    def ingest(self) -> None:
        """Move this group's mailbox entries into its machines' inboxes (one commit)."""
        records = self._records
        entries: list[tuple[bytes, bytes]] = []
        with self._store.read() as txn:
            mailbox = self._store.db("mailbox")
            if txn.stat(mailbox)["entries"] == 0:
                return
            for mkey, value in txn.cursor(db=mailbox):
                if mkey not in self.ingesting:
                    entries.append((mkey, value))
        committer = self._committer
        codec = records.codec
        taken: list[bytes] = []
        for mkey, value in entries:
            try:
                group, key, raw = unpackb(value)
            except Exception as exc:
                self.quarantine("mailbox", mkey, value, f"corrupt mailbox entry: {exc}")
                continue
            if group != self._name:
                continue
            try:
                if not isinstance(key, bytes) or not key.startswith(records.prefix):
                    raise RecordError(f"mailbox entry {mkey!r} names a bad machine key")
                mid = records.machine_id(key)[0]
                event = codec.decode_event(raw, records.what(mid, "mailbox event"))
                m = self._load(mid)
                if m is None:
                    raise RecordError(f"{records.what(mid, 'mailbox event')}: no such machine")
            except (RecordError, ValueError) as exc:
                self.quarantine("mailbox", mkey, value, str(exc))
                continue
            committer.delete("mailbox", mkey)
            self._runtime.deliver(m, event, raw)
            taken.append(mkey)
        if taken:
            self.ingesting.update(taken)
            committer.on_commit(lambda err: self.ingesting.difference_update(taken))
            committer.end_unit()

    def _load(self, mid: MachineId) -> Machine | None:
        """The machine for an event (loaded if need be); an unreadable record is set aside."""
        try:
            return self._runtime.machine(mid)
        except RecordError as exc:
            raw = self._records.raw(self._records.key(mid))
            if raw is not None:
                self._set_aside([(mid, raw, str(exc))])
            raise

    def quarantine(self, db: str, key: bytes, raw: bytes, why: str) -> None:
        """Move an unreadable inbox or mailbox record aside, keeping its bytes."""
        log.error("%s: moving unreadable %s record %r to quarantine: %s", self._name, db, key, why)
        committer = self._committer
        committer.put("quarantine", db.encode() + b"/" + key, packb([why, raw]))
        committer.delete(db, key)
        if db == "mailbox":  # the next poll must not see it again before this commits
            self.ingesting.add(key)
            committer.on_commit(lambda err: self.ingesting.discard(key))
        committer.end_unit()
