"""Real crash tests: engine processes killed with SIGKILL at random moments, then restarted.

The contract under test (see `StateGroup`): `send` returns only once the event is durable; a
planner round deletes the events it consumed and writes the new state in one transaction, so
after a crash no event whose `send` returned is lost and none is applied twice; on restart,
machines are re-planned with their pending events, then `Restart`. One engine per repo
(`StoreLockedError`), while clients (not-started groups, other processes) write to the mailbox.

Each child process writes a uid to its "acked" file (append, flush, fsync) only AFTER the
`send` of that uid returned. The parent kills children at random moments, runs a final clean
engine, then opens the store and checks every acked uid was applied exactly once and no uid
(acked or not) was applied twice. Some `Add` events make the planner run a step that sends an
`Echo` back to the machine; the planner re-issues missing echoes on `Restart` (echoes it issued
before the crash and that reached the inbox are planned before `Restart`), so every echo must
also be applied exactly once. Set CRASH_SEED=<n> to replay the random choices of a failure.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import os
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import Child, Spawner, until

from sectorfsm.fsm import LmdbStore, StoreLockedError
from sectorfsm.fsm.codec import unpackb

CHILD = r'''
"""Child process of tests/test_crash.py (written to the test's tmp dir)."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

from sectorfsm.fsm import Context, LmdbStore, Restart, StateGroup


@dataclass(slots=True)
class Acc:
    uids: list[int] = field(default_factory=list)  # Add uids, in the order applied
    echoes: list[int] = field(default_factory=list)  # Echo uids, in the order applied
    want_echo: list[int] = field(default_factory=list)  # uids whose Echo is not applied yet
    issued: list[int] = field(default_factory=list)  # ... of which a step already sent the Echo
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Add:
    uid: int


@dataclass(frozen=True, slots=True)
class Echo:
    uid: int


def wants_echo(uid: int) -> bool:
    return uid % 3 == 0


def make_step(uids: list[int]) -> Any:
    async def step(ctx: Context, st: Acc) -> None:
        await ctx.clock.sleep(0.002)
        for uid in uids:
            ctx.send(Echo(uid))
        # Linger, so the echoes sit committed in the inbox for a while before they are planned.
        await ctx.clock.sleep(0.005)

    return step


def planner(events: list[Any], st: Acc) -> tuple[Any, int]:
    for i, ev in enumerate(events):
        if isinstance(ev, Add):
            st.uids.append(ev.uid)
            if wants_echo(ev.uid):
                st.want_echo.append(ev.uid)
        elif isinstance(ev, Echo):
            st.echoes.append(ev.uid)
            if ev.uid in st.want_echo:
                st.want_echo.remove(ev.uid)
            if ev.uid in st.issued:
                st.issued.remove(ev.uid)
        elif isinstance(ev, Restart):
            # Like Lotus on SectorRestart: re-run the step at once. The engine plans the events
            # that were in the inbox before Restart, so every echo still wanted here died with
            # the process and must be issued again (issuing one that landed would double it).
            st.restarts += 1
            st.issued = list(st.want_echo)
            if st.issued:
                return make_step(list(st.issued)), i + 1
        else:
            raise ValueError(f"unexpected event {ev!r}")
    todo = [u for u in st.want_echo if u not in st.issued]
    if todo:
        st.issued.extend(todo)
        return make_step(todo), len(events)
    return None, len(events)


def make_group(store: LmdbStore, poll_interval: float = 0.05) -> StateGroup[Acc]:
    return StateGroup(store, "crash", planner, Acc, events=[Add, Echo],
                      poll_interval=poll_interval)


async def send_forever(group: StateGroup[Acc], args: Any, rng: random.Random) -> None:
    uids = iter(range(args.base, args.base + 10**8))
    with open(args.acked, "a") as acked:

        async def sender() -> None:
            while True:
                uid = next(uids)
                await group.send(rng.randrange(args.machines), Add(uid))
                # Only now is the uid acknowledged: make the record of that survive us.
                acked.write(f"{uid}\n")
                acked.flush()
                os.fsync(acked.fileno())

        await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(args.senders))),
                               args.max_seconds)


async def engine(args: Any) -> None:
    rng = random.Random(args.seed)
    store = LmdbStore(args.repo, durability=args.durability)
    group = make_group(store)
    await group.start()
    for mid in range(args.machines):
        if not group.has(mid):
            await group.begin(mid, Acc())
    print("ready", flush=True)
    if args.clean:
        await group.idle()
        await group.stop()
        store.close()
        print("done", flush=True)
        return
    if args.senders:
        await send_forever(group, args, rng)
    else:
        await asyncio.sleep(args.max_seconds)


async def client(args: Any) -> None:
    rng = random.Random(args.seed)
    store = LmdbStore(args.repo, durability=args.durability)
    group = make_group(store)  # never started: sends go through the mailbox
    print("ready", flush=True)
    await send_forever(group, args, rng)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["engine", "client"])
    p.add_argument("--repo", required=True)
    p.add_argument("--durability", default="group")
    p.add_argument("--machines", type=int, default=6)
    p.add_argument("--senders", type=int, default=0)
    p.add_argument("--base", type=int, default=0)
    p.add_argument("--acked", default=os.devnull)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean", action="store_true")
    p.add_argument("--max-seconds", type=float, default=120.0)  # never outlive a lost parent
    args = p.parse_args()
    asyncio.run(engine(args) if args.mode == "engine" else client(args))


if __name__ == "__main__":
    main()
'''


# -- helpers -------------------------------------------------------------------------------


class Children:
    """Starts the child script through the `spawn` fixture (which kills what is left)."""

    def __init__(self, spawn: Spawner, tmp: Path) -> None:
        self.spawn_child = spawn
        self.tmp = tmp
        self.script = tmp / "crash_child.py"
        self.script.write_text(CHILD)

    def spawn(self, mode: str, repo: Path, *args: str) -> Child:
        return self.spawn_child.python(
            self.script, mode, "--repo", repo, *args, name=mode, cwd=self.tmp, merge_stderr=False
        )

    def wait_ready(self, proc: Child) -> None:
        proc.wait_for_line(r"^ready$")

    def kill(self, proc: Child) -> None:
        """SIGKILL a child that must still be running (it must not have died on its own)."""
        proc.kill()

    def run_clean(self, repo: Path, *args: str) -> None:
        """A final engine that just resumes every machine, waits for idle and stops."""
        proc = self.spawn("engine", repo, "--clean", *args)
        rc = proc.finish()
        assert rc == 0 and proc.output() == "ready\ndone\n", f"clean run failed: {proc.describe()}"


@pytest.fixture
def children(spawn: Spawner, tmp_path: Path) -> Children:
    return Children(spawn, tmp_path)


def load_domain(script: Path) -> ModuleType:
    """Import the child script, to read the store with the very same state/event types."""
    name = f"crash_child_{os.getpid()}_{id(script)}"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass type hints are resolved through sys.modules
    spec.loader.exec_module(module)
    return module


def acked_count(file: Path) -> int:
    """How many uids a child acknowledged in `file` so far."""
    return len(read_acked([file]))


def wait_acked(file: Path, count: int) -> None:
    """Wait until a child acknowledged `count` uids in `file` (its sends are durable)."""
    until(lambda: acked_count(file) >= count, f"{count} acks in {file.name}")


def read_acked(files: list[Path]) -> list[int]:
    """Uids from acked files; a torn last line (killed mid-write) is ignored."""
    uids: list[int] = []
    for f in files:
        if not f.exists():
            continue
        text = f.read_text()
        lines = text.split("\n")
        uids.extend(int(line) for line in lines[:-1])  # lines[-1] is "" or torn
    return uids


def flags(**options: object) -> list[str]:
    """Command-line options of the child script: flags(max_seconds=3) -> --max-seconds 3."""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def new_seed() -> int:
    env = os.environ.get("CRASH_SEED")
    return int(env) if env else random.randrange(2**32)


def check_repo(
    domain: ModuleType, repo: Path, acked: list[int], machines: int, starts: int, note: str
) -> dict[int, Any]:
    """Open the store in this process and check the exactly-once contract."""
    assert len(acked) == len(set(acked)), f"a uid was acked twice (test bug) {note}"
    store = LmdbStore(repo)
    try:
        group = domain.make_group(store)
        states = dict(group.list())
        with store.read() as txn:
            inbox = txn.stat(store.db("inbox"))["entries"]
            mailbox = txn.stat(store.db("mailbox"))["entries"]
            quarantined = [
                unpackb(v)[0]
                for v in txn.cursor(db=store.db("quarantine")).iternext(keys=False, values=True)
            ]
        errors = {mid: info.last_error for mid in states if (info := group.info(mid)).last_error}
    finally:
        store.close()

    assert sorted(states) == list(range(machines)), note
    applied = collections.Counter(u for st in states.values() for u in st.uids)
    twice = sorted(u for u, n in applied.items() if n > 1)
    assert not twice, f"{len(twice)} uids applied more than once, e.g. {twice[:10]} {note}"
    lost = sorted(set(acked) - applied.keys())
    assert not lost, (
        f"{len(lost)} of {len(acked)} acked uids were lost, e.g. {lost[:10]}; "
        f"{len(quarantined)} records in quarantine, e.g. {quarantined[:2]} {note}"
    )
    assert (inbox, mailbox, len(quarantined)) == (0, 0, 0), (
        f"after a clean run: inbox={inbox} mailbox={mailbox} quarantine={quarantined[:3]} {note}"
    )
    assert not errors, f"machines recorded errors: {errors} {note}"
    for mid, st in states.items():
        echoes = collections.Counter(st.echoes)
        twice = sorted(u for u, n in echoes.items() if n > 1)
        assert not twice, f"machine {mid}: echoes applied twice: {twice[:10]} {note}"
        expected = {u for u in st.uids if domain.wants_echo(u)}
        assert set(st.echoes) == expected, (
            f"machine {mid}: missing echoes {sorted(expected - set(st.echoes))[:10]}, "
            f"stray echoes {sorted(set(st.echoes) - expected)[:10]} {note}"
        )
        assert st.want_echo == [] and st.issued == [], f"machine {mid}: {st} {note}"
        # Every start after the first re-planned the machine with Restart; a start killed
        # before its Restart round committed leaves no trace, the final clean one always does.
        assert 1 <= st.restarts <= starts - 1, f"machine {mid}: restarts={st.restarts} {note}"
    return states


def crash_loop(
    children: Children,
    tmp: Path,
    *,
    durability: str,
    kills: int,
    senders: int,
    acks: tuple[int, int],
    client: bool = False,
) -> None:
    """Start, and SIGKILL, `kills` engines in turn, each after a random number of acks.

    Each engine is killed once its senders acknowledged between `acks[0]` and `acks[1]`
    uids (a random count): the kills land at random points of the work whatever the speed
    of the machine, and every run does real work.
    """
    seed = new_seed()
    rng = random.Random(seed)
    repo = tmp / "repo"
    machines = 6
    domain = load_domain(children.script)
    common = flags(durability=durability, machines=machines)
    acked_files: list[Path] = []
    kill_points: list[int] = []
    client_proc: Child | None = None
    client_acked = tmp / "unused"
    client_gens = 0

    def start_client() -> tuple[Child, Path]:
        nonlocal client_gens
        acked = tmp / f"acked-client-{client_gens}.txt"
        acked_files.append(acked)
        base = 10**9 + client_gens * 10**7
        opts = flags(senders=4, acked=acked, base=base, seed=seed + 1000 + client_gens)
        proc = children.spawn("client", repo, *common, *opts)
        client_gens += 1
        children.wait_ready(proc)
        return proc, acked

    for gen in range(kills):
        acked = tmp / f"acked-{gen}.txt"
        acked_files.append(acked)
        opts = flags(senders=senders, acked=acked, base=gen * 10**7, seed=seed + gen)
        proc = children.spawn("engine", repo, *common, *opts)
        children.wait_ready(proc)  # machines exist from here on
        if client and gen in (0, kills // 2):
            if client_proc is not None:
                wait_acked(client_acked, rng.randint(3, 15))
                children.kill(client_proc)  # a client dies mid-write too
            client_proc, client_acked = start_client()
        kill_points.append(rng.randint(*acks))
        wait_acked(acked, kill_points[-1])
        children.kill(proc)
    if client_proc is not None:
        # The mailbox fills while no engine runs.
        wait_acked(client_acked, acked_count(client_acked) + rng.randint(3, 15))
        children.kill(client_proc)

    children.run_clean(repo, *common)
    acked = read_acked(acked_files)
    note = (
        f"[CRASH_SEED={seed} durability={durability} killed after acks={kill_points} "
        f"acked={len(acked)} repo={repo}]"
    )
    states = check_repo(domain, repo, acked, machines, starts=kills + 1, note=note)
    # The test must have done real work, or it proves nothing.
    assert len(acked) >= kills * acks[0], f"too little traffic to mean anything {note}"
    assert any(st.echoes for st in states.values()), f"no step ever ran {note}"
    if client:
        from_client = [u for u in acked if u >= 10**9]
        assert len(from_client) >= 6, f"the client acked only {len(from_client)} sends {note}"
    print(f"crash loop ok: {note}")


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_loses_no_acked_event_and_applies_none_twice(
    children: Children, tmp_path: Path
) -> None:
    """Group-commit durability: 8 random SIGKILLs while 24 coroutines send, then a clean run."""
    crash_loop(children, tmp_path, durability="group", kills=8, senders=24, acks=(10, 60))


@pytest.mark.slow
def test_sigkill_in_sync_durability(children: Children, tmp_path: Path) -> None:
    """Sync durability (one fsynced transaction per logical write): same contract."""
    crash_loop(children, tmp_path, durability="sync", kills=8, senders=16, acks=(4, 25))


@pytest.mark.slow
def test_client_sends_survive_engine_kills(children: Children, tmp_path: Path) -> None:
    """A client process sends through the mailbox while engines are killed and restarted.

    Every event whose client `send` returned must be applied exactly once; the client itself
    is killed twice too, and keeps writing while no engine runs.
    """
    crash_loop(
        children, tmp_path, durability="group", kills=5, senders=4, acks=(6, 30), client=True
    )


def test_second_engine_refused_until_the_first_is_killed(
    children: Children, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    domain = load_domain(children.script)
    proc = children.spawn("engine", repo, *flags(machines=1))
    children.wait_ready(proc)
    store = LmdbStore(repo)
    try:
        group = domain.make_group(store)
        assert store.engine_locked_elsewhere()
        with pytest.raises(StoreLockedError, match=rf"\(pid {proc.pid}\)"):
            asyncio.run(group.start())
        assert not group.started
        assert not store.closed
        with pytest.raises(StoreLockedError, match=rf"\(pid {proc.pid}\)"):
            asyncio.run(group.start())  # still refused: the failed start left nothing behind

        children.kill(proc)  # asserts the refused starts did not disturb the running engine
        # The kernel released the dead engine's flock: this process may run the engine now.
        assert not store.engine_locked_elsewhere()

        async def take_over() -> None:
            await group.start()
            assert group.started
            await group.send(0, domain.Add(8))
            await group.idle()
            await group.stop()

        asyncio.run(take_over())
        st = group.get(0)
        assert st.uids == [8]
        assert st.restarts == 1, "the machine of the killed engine was not re-planned"
        assert (repo / "engine.lock").read_text() == ""
    finally:
        store.close()


def test_running_engine_ingests_client_sends(children: Children, tmp_path: Path) -> None:
    """A not-started group in another process (here: this one) is a client of the engine.

    The engine polls its mailbox every 50 ms; the test waits for each event to be applied
    (how soon depends on the machine's load, so it is not asserted).
    """
    repo = tmp_path / "repo"
    domain = load_domain(children.script)
    proc = children.spawn("engine", repo, *flags(machines=1))  # poll_interval=0.05
    children.wait_ready(proc)
    store = LmdbStore(repo)
    try:
        client = domain.make_group(store)

        def wait_applied(mid: int, uid: int) -> None:
            def quarantined() -> list[Any]:
                with store.read() as txn:
                    return [unpackb(v)[0] for _, v in txn.cursor(db=store.db("quarantine"))]

            until(
                lambda: uid in client.get(mid).uids,
                lambda: (
                    f"client event Add({uid}) applied to machine {mid} "
                    f"(quarantined: {quarantined()[:3]})"
                ),
            )

        asyncio.run(client.send(0, domain.Add(7)))  # returns once durable in the mailbox
        wait_applied(0, 7)
        asyncio.run(client.begin(1, domain.Acc()))  # a client may create machines too
        asyncio.run(client.send(1, domain.Add(9)))
        wait_applied(1, 9)
        assert client.get(0).uids == [7] and client.get(1).uids == [9]
        children.kill(proc)
    finally:
        store.close()
