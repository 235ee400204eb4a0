"""The mailbox: how writes from other processes (clients) reach a running group.

A group that is not started writes events to the store's `mailbox`; the group that runs the
engine moves them into its machines' inboxes within `poll_interval` seconds, in one commit
with their deletion from the mailbox, so none is lost or applied twice. Entries that cannot
be read are moved to `quarantine` with the reason, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .codec import packb, unpackb
from .errors import RecordError, StoreError

if TYPE_CHECKING:
    from .group import StateGroup
    from .keys import MachineId
    from .machine import Machine

log = logging.getLogger("sectorfsm.fsm")


class MailboxReader:
    """Ingests one group's mailbox entries (the group's engine-side half of client writes)."""

    def __init__(self, group: StateGroup[Any]) -> None:
        self.group = group
        #: Mailbox keys taken but not yet committed: the next poll must not take them again.
        self.ingesting: set[bytes] = set()

    async def poll(self) -> None:
        """Ingest the mailbox every `poll_interval` seconds, for as long as the group runs."""
        g = self.group
        while True:
            await asyncio.sleep(g.poll_interval)
            try:
                self.ingest()
            except StoreError as exc:
                log.error("%s: reading the mailbox failed: %s", g.name, exc)

    def ingest(self) -> None:
        """Move this group's mailbox entries into its machines' inboxes (one commit)."""
        g = self.group
        entries: list[tuple[bytes, bytes]] = []
        with g.store.read() as txn:
            mailbox = g.store.db("mailbox")
            if txn.stat(mailbox)["entries"] == 0:
                return
            for mkey, value in txn.cursor(db=mailbox):
                if mkey not in self.ingesting:
                    entries.append((mkey, value))
        committer = g._committer
        taken: list[bytes] = []
        for mkey, value in entries:
            try:
                group, key, raw = unpackb(value)
            except Exception as exc:
                self.quarantine("mailbox", mkey, value, f"corrupt mailbox entry: {exc}")
                continue
            if group != g.name:
                continue
            try:
                if not isinstance(key, bytes) or not key.startswith(g._prefix):
                    raise RecordError(f"mailbox entry {mkey!r} names a bad machine key")
                mid = g.records.machine_id(key)[0]
                event = g._codec.decode_event(raw, g.records.what(mid, "mailbox event"))
                m = g._machines.get(mid) or self._load(mid)
                if m is None:
                    raise RecordError(f"{g.records.what(mid, 'mailbox event')}: no such machine")
            except (RecordError, ValueError) as exc:
                self.quarantine("mailbox", mkey, value, str(exc))
                continue
            committer.delete("mailbox", mkey)
            g._enqueue(m, event, raw)
            taken.append(mkey)
        if taken:
            self.ingesting.update(taken)
            committer.on_commit(lambda err: self.ingesting.difference_update(taken))
            committer.end_unit()

    def _load(self, mid: MachineId) -> Machine | None:
        """Load a machine for an event; an unreadable record is set aside, then re-raised."""
        g = self.group
        try:
            return g._load(mid)
        except RecordError as exc:
            raw = g.records.raw(g.records.key(mid))
            if raw is not None:
                g.set_aside([(mid, raw, str(exc))])
            raise

    def quarantine(self, db: str, key: bytes, raw: bytes, why: str) -> None:
        """Move an unreadable inbox or mailbox record aside, keeping its bytes."""
        g = self.group
        log.error("%s: moving unreadable %s record %r to quarantine: %s", g.name, db, key, why)
        committer = g._committer
        committer.put("quarantine", db.encode() + b"/" + key, packb([why, raw]))
        committer.delete(db, key)
        if db == "mailbox":  # the next poll must not see it again before this commits
            self.ingesting.add(key)
            committer.on_commit(lambda err: self.ingesting.discard(key))
        committer.end_unit()
