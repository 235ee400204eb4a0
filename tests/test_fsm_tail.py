"""States whose last field only grows (`APPEND_ONLY`): records reuse the entries already stored.

Every record must be exactly the bytes of encoding the state whole, whatever happened since the
previous one: steps that share the state or get their own, a replaced list, a planner that
raised, a restart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import run

from sectorfsm.fsm import Context, LmdbStore, StateGroup
from sectorfsm.fsm.codec import APPEND_ONLY, append_only_tail
from sectorfsm.fsm.machine import Machine
from sectorfsm.fsm.tail import TailEncoder, array_header


@dataclass(slots=True)
class Entry:
    at: int
    text: str


@dataclass(slots=True)
class Logged:
    phase: str = "idle"
    rounds: int = 0
    log: list[Entry] = field(default_factory=list, metadata=APPEND_ONLY)


@dataclass(frozen=True, slots=True)
class Say:
    text: str


@dataclass(frozen=True, slots=True)
class Cut:
    """Replace the log by a new list of its last `keep` entries (as a truncation does)."""

    keep: int


@dataclass(frozen=True, slots=True)
class Boom:
    """The planner appends an entry, then raises: the round is undone."""


@dataclass(frozen=True, slots=True)
class Ask:
    """Run a step that waits, then sends `Say("answer")`."""


def planner(events: list[Any], st: Logged) -> tuple[Any, int]:
    """Log every event; `Ask` starts a step."""
    step = None
    for ev in events:
        st.rounds += 1
        if isinstance(ev, Say):
            st.log.append(Entry(st.rounds, ev.text))
        elif isinstance(ev, Cut):
            st.log = st.log[-ev.keep :] if ev.keep else []
        elif isinstance(ev, Boom):
            st.log.append(Entry(st.rounds, "boom"))
            raise ValueError("boom")
        elif isinstance(ev, Ask):
            st.phase = "asking"
            st.log.append(Entry(st.rounds, "ask"))
            step = answer
    return step, len(events)


async def answer(ctx: Context, st: Logged) -> None:
    await asyncio.sleep(0)
    ctx.send(Say("answer"))


def make(store: LmdbStore, shared: bool) -> StateGroup[Logged]:
    return StateGroup(
        store, "logged", planner, Logged, events=[Say, Cut, Boom, Ask], shared_state=shared
    )


def stored(g: StateGroup[Logged], mid: int) -> tuple[bytes, Logged]:
    """The stored record of `mid`, after checking it is the encoding of its state, whole."""
    raw = g.records.raw(g.records.key(mid))
    assert raw is not None
    st, final, last_error = g.records.decode(raw, mid)
    assert raw == g.records.encode(st, final, last_error)
    return raw, st


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "own-copy"])
def test_records_are_the_whole_encoding_through_appends_cuts_failures_and_restarts(
    tmp_path: Path, shared: bool
) -> None:
    """Byte for byte what encoding the state whole gives, after every kind of round."""
    texts: list[str] = []

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:
            g = make(store, shared)
            await g.start()
            await g.begin(1, Logged(log=[Entry(0, "begun")]))
            texts.append("begun")
            # Past 15 entries the array header grows from one byte to three.
            for i in range(20):
                await g.send(1, Say(f"say {i}" * (i % 3)))
                texts.append(f"say {i}" * (i % 3))
                await g.idle()
                assert [e.text for e in stored(g, 1)[1].log] == texts
            await g.send(1, Ask())
            await g.idle()
            texts.extend(["ask", "answer"])
            assert [e.text for e in stored(g, 1)[1].log] == texts
            await g.send(1, Cut(3))
            await g.idle()
            del texts[:-3]
            await g.send(1, Say("after cut"))
            await g.idle()
            texts.append("after cut")
            assert [e.text for e in stored(g, 1)[1].log] == texts
            await g.send(1, Boom())  # undone: its entry is not kept
            await g.send(1, Say("after boom"))
            await g.idle()
            texts.append("after boom")
            raw, st = stored(g, 1)
            assert [e.text for e in st.log] == texts
            assert g.records.decode(raw, 1)[2] is not None  # (the planner's error is noted)
            await g.stop()
            g = make(store, shared)  # a restart: machines are loaded from their records
            await g.start()
            await g.send(1, Say("after restart"))
            await g.send(1, Cut(0))
            await g.send(1, Say("alone"))
            await g.idle()
            assert [e.text for e in stored(g, 1)[1].log] == ["alone"]
            await g.stop()

    run(main)


def test_entries_already_stored_are_not_encoded_again(tmp_path: Path) -> None:
    """The stored bytes of old entries are reused: an entry changed in place stays as stored.

    (Which is why the field must only ever be appended to; a replaced list is encoded whole.)
    """

    async def main() -> None:
        async with LmdbStore(tmp_path / "repo", "nosync") as store:
            g = make(store, shared=True)
            await g.start()
            await g.begin(1, Logged())
            await g.send(1, Say("first"))
            await g.idle()
            live = g.peek(1)
            assert live is not None
            live.log[0].text = "changed in place"
            await g.send(1, Say("second"))
            await g.idle()
            kept = ["first", "second"]
            raw = g.records.raw(g.records.key(1))
            assert raw is not None
            assert [e.text for e in g.records.decode(raw, 1)[0].log] == kept
            # Across a step that shares the state (the machine keeps only the entries' bytes).
            await g.send(1, Ask())
            await g.idle()
            kept += ["ask", "answer"]
            raw = g.records.raw(g.records.key(1))
            assert raw is not None
            assert [e.text for e in g.records.decode(raw, 1)[0].log] == kept
            live.log = list(live.log)  # a new list: nothing is reused
            await g.send(1, Say("third"))
            await g.idle()
            raw, st = stored(g, 1)
            assert [e.text for e in st.log] == ["changed in place", *kept[1:], "third"]
            await g.stop()

    run(main)


def test_append_only_marks_only_a_last_list_field() -> None:
    """Only a last field marked `APPEND_ONLY` counts, and it must be a list."""

    @dataclass
    class Middle:
        log: list[int] = field(default_factory=list, metadata=APPEND_ONLY)
        after: int = 0

    @dataclass
    class NotAList:
        log: tuple[int, ...] = field(default=(), metadata=APPEND_ONLY)

    assert append_only_tail(Middle) is None
    with pytest.raises(TypeError, match="must be a list"):
        append_only_tail(NotAList)
    found = append_only_tail(Logged)
    assert found is not None and found[0] == "log"


@pytest.mark.parametrize("n", [0, 1, 15, 16, 65535, 65536])
def test_array_header_is_msgpacks(n: int) -> None:
    """The header written before the entries is the one msgpack writes for that many."""
    packed = msgpack.packb([None] * n)
    assert packed == array_header(n) + b"\xc0" * n


@pytest.mark.parametrize("shared", [False, True])
def test_many_entries_appended_in_one_round_are_the_whole_encoding(shared: bool) -> None:
    """New entries packed as one array, less its header, whatever that header's size."""
    found = append_only_tail(Logged)
    assert found is not None
    encoder = TailEncoder(1, found)
    whole = msgpack.Packer(use_bin_type=True)
    st = Logged()
    m = Machine(1, b"k", st, None)
    for added in [0, 1, 2, 14, 20, 0, 65_540]:
        st.log.extend(Entry(i, f"e{i}") for i in range(added))
        st.rounds += 1
        record = encoder.encode(m, st, False, None)
        log = [{"at": e.at, "text": e.text} for e in st.log]
        expected = whole.pack(
            [1, False, None, {"phase": st.phase, "rounds": st.rounds, "log": log}]
        )
        assert record == expected, added
        m.record = record
        if shared:  # (the machine keeps only the entries' bytes, as during a shared step)
            TailEncoder.let_go(m, True)


@dataclass(slots=True)
class Wide:
    """Enough fields for a 16-bit map header and pairs array, some of them converted."""

    a0: int = 0
    a1: str = "x"
    a2: bytes = b"\x00\x01"
    a3: float = 0.5
    a4: bool = False
    a5: str | None = None
    a6: Entry | None = None
    a7: list[Entry] = field(default_factory=list)
    a8: set[int] = field(default_factory=set)
    a9: int = -1
    b0: int = 2**40
    b1: str = "y" * 40
    b2: int = 0
    b3: int = 0
    b4: int = 0
    b5: int = 0
    b6: int = 0
    log: list[Entry] = field(default_factory=list, metadata=APPEND_ONLY)


def _whole(schema: int, final: Any, error: str | None, payload: dict[str, Any]) -> bytes:
    return bytes(
        msgpack.Packer(use_bin_type=True, default=list).pack([schema, final, error, payload])
    )


@pytest.mark.parametrize("plain", [True, False])
def test_the_fields_before_the_log_are_packed_as_the_whole_map_would_be(
    plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through any finality and error, narrow and wide states, the prefixes kept or not."""
    if not plain:  # (the fallback for field names that cannot be written in generated source)
        monkeypatch.setattr("sectorfsm.fsm.codec.plain_name", lambda name: False)
    cases: list[tuple[Any, Any]] = []
    for cls in (Logged, Wide):
        found = append_only_tail(cls)
        assert found is not None
        encoder = TailEncoder(7, found)
        st: Any = cls()
        m = Machine(1, b"k", st, None)
        for final, error in [
            (False, None), (True, None), (False, "boom"), (1, None), (0, None), (True, "x" * 40),
            (False, None), (True, None),
        ]:  # fmt: skip
            st.log.append(Entry(len(st.log), "e"))
            if cls is Wide:
                st.a0 += 1
                st.a6 = Entry(st.a0, "six")
                st.a7.append(Entry(st.a0, "seven"))
                st.a8.add(st.a0)
            record = encoder.encode(m, st, final, error)
            assert record == _whole(7, final, error, _plain(st)), (cls, final, error)
            m.record = record
            cases.append((final, error))
    assert len(cases) == 16


def test_the_head_is_the_maps_items_as_one_flat_tuple() -> None:
    """Names and values in field order, ending with the append-only field's name alone."""
    found = append_only_tail(Logged)
    assert found is not None
    st = Logged("busy", 3, [Entry(1, "a")])
    assert found[2](st) == ("phase", "busy", "rounds", 3, "log")


def _plain(st: Any) -> dict[str, Any]:
    """The state as the codec's whole encoding sees it (dataclasses as maps, sets as arrays)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Entry):
            return {"at": v.at, "text": v.text}
        if isinstance(v, (list, set)):
            return [conv(x) for x in v]
        return v

    return {name: conv(getattr(st, name)) for name in st.__dataclass_fields__}


@dataclass(slots=True)
class Counted:
    rounds: int = 0
    log: list[Any] = field(default_factory=list, metadata=APPEND_ONLY)


@pytest.mark.parametrize("cls", [Logged, Counted])
def test_one_entry_appended_per_round_is_packed_alone(cls: type) -> None:
    """An entry packed alone is its bytes in the array, converted or packed as it is."""
    found = append_only_tail(cls)
    assert found is not None
    assert (found[1] is None) is (cls is Counted)
    encoder = TailEncoder(1, found)
    st: Any = cls()
    m = Machine(1, b"k", st, None)
    for i in range(40):  # (past 15 entries: the array's header grows to 3 bytes)
        st.log.append(Entry(i, "e") if cls is Logged else [i, {i}, "x" * i])
        record = encoder.encode(m, st, False, None)
        assert record == _whole(1, False, None, _plain(st)), i
        m.record = record
