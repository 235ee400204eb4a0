"""Soak: days of fast devnet time on the real `sectors run` daemon, under kill -9 and chaos.

    python bench/soak.py --quick --seed 1      # about 90 s: sim and reference sealers
    python bench/soak.py --minutes 8 --seed 7  # sim, reference and command sealers

For each sealer it runs the engine (`sectors run --config soak.toml`, in a child Python that
installs two hooks first, see `engine_main`) on a fresh repo, and meanwhile:

* SIGKILLs the engine's process group at random moments (and, with the `command` sealer, the
  sealer children, which live in their own sessions), then starts it again;
* sends stray and duplicate commands as real CLI subprocesses: `pledge`, `add-piece` (new and
  repeated files), `retry`, `update-state --really-do-it`, `remove --really-do-it`, some of
  them while no engine runs;
* injects chain faults through DevnetChain's knobs (API errors, send errors, failing message
  exit codes, rejected proofs, reorgs): the engine's hook applies each fault file it finds in
  the control directory and renames it `.applied`, so only faults that reached a chain count;
* once, copies the repo while the engine is down, corrupts one sector record in the copy and
  checks that an engine on the copy sets that sector aside and runs the others.

Invariants, checked after every kill and at the end (after a last run without faults has
settled and stopped cleanly): every pledge the CLI confirmed exists once and no number was
confirmed twice; no acknowledged piece is lost, applied twice, or routed into a CC sector; no
compute job ran twice for one attempt (the engine's hook logs one line per execution, with
the number of events the sector had applied when it started: within one engine lifetime two
runs of a task on the same count are doubled work); no `command` child outlives a killed
engine; the persisted storage index counts the bytes on disk; every sector is Proving,
Removed, or in a state whose last error says why. Exit status 1 if any invariant failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soak_checks import (
    DONE,
    Ledger,
    chain_epochs,
    exec_violations,
    read_sectors,
    storage_counted,
    storage_on_disk,
    storage_violations,
    store_violations,
)

#: Seconds per devnet epoch: 2,880 epochs (a mainnet day of 30 s epochs) take under a minute.
BLOCK_TIME = 0.02
MAINNET_EPOCH = 30.0
MINER = 1000
#: The daemon's first line once its engine runs (at a line start: tracebacks quote it too).
BANNER = re.compile(r"^sectorfsm engine on ", re.MULTILINE)
SETTLED = DONE | {"FailedUnrecoverable"}
HOOKS = Path(__file__).resolve().parent / "soak_hooks.py"
COMMAND_SEALER = Path(__file__).resolve().parent.parent / "examples" / "command_sealer.py"
FAULTS = ("api_errors", "send_errors", "message_exit", "reject_proofs", "reorg")
METHODS = ("PreCommitSector", "PreCommitSectorBatch", "ProveCommitSector", "ProveCommitAggregate")


# ------------------------------------------------------------------------------- the soak


@dataclass(slots=True)
class Report:
    """What a soak run did and found."""

    seed: int
    sealers: list[str]
    sectors: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    child_kills: int = 0
    starts: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    commands: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    executions: int = 0
    corrupt_checks: int = 0
    epochs: int = 0
    violations: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def text(self) -> str:
        """The human-readable report."""
        days = self.epochs * MAINNET_EPOCH / 86400
        lines = [
            f"soak seed {self.seed}, sealers {', '.join(self.sealers)}, wall {self.wall_s:.0f} s",
            f"sectors: {sum(self.sectors.values())} ({_counts(self.sectors)})",
            f"chain: {self.epochs} devnet epochs (= {days:.1f} days of 30 s epochs)",
            f"engine starts {self.starts}, kill -9 {self.kills}, sealer children killed "
            f"{self.child_kills}, compute executions {self.executions}",
            f"corrupt-record copies checked: {self.corrupt_checks}",
            f"faults injected: {sum(self.faults.values())} ({_counts(self.faults)})",
            f"commands sent: {sum(self.commands.values())} ({_counts(self.commands)}); "
            f"refused as bad input: {sum(self.refused.values())}",
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  VIOLATION {v}" for v in self.violations]
        return "\n".join(lines)


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def config_text(sealer: str) -> str:
    """The soak's `sectors run` config for `sealer`."""
    text = f"""[miner]
sector_size = "2KiB"
sealer = "{sealer}"
block_time = {BLOCK_TIME}

[sealing]
wait_deals_delay = 1.0
[sealing.retry]
base = 0.3
factor = 2.0
cap = 3.0
budget = 12
"""
    if sealer == "command":
        argv = json.dumps([sys.executable, str(COMMAND_SEALER)])
        text += "\n[sealer]\ntimeout = 120\nkill_grace = 1\n[sealer.commands]\n"
        text += "".join(f"{t} = {argv}\n" for t in ("AP", "PC1", "PC2", "C1", "C2", "FIN"))
    return text


class Phase:
    """One sealer's soak: its repo, engine processes, ledger and checks."""

    def __init__(self, sealer: str, root: Path, rng: random.Random, report: Report) -> None:
        self.sealer, self.rng, self.report = sealer, rng, report
        self.root = root / sealer
        self.repo, self.ctl = self.root / "repo", self.root / "ctl"
        self.pieces = self.root / "pieces"
        for d in (self.ctl / "faults", self.pieces):
            d.mkdir(parents=True)
        self.config = self.root / "soak.toml"
        self.config.write_text(config_text(sealer))
        self.ledger = Ledger()
        self.inc = 0
        self.engine: subprocess.Popen[bytes] | None = None
        self.err = self.ctl / "engine-0.err"  # the running engine's stderr
        self.states: dict[int, str] = {}
        self.reported: set[str] = set()
        self.removes = 0
        self.fault_seq = 0
        self.corrupt_checked = False
        self.execs = 0

    def violation(self, text: str) -> None:
        """Record a broken invariant (once: the checks run again after every kill)."""
        if text in self.reported:
            return
        self.reported.add(text)
        self.report.violations.append(f"[{self.sealer}] {text}")
        print(f"  VIOLATION [{self.sealer}] {text}", file=sys.stderr, flush=True)

    # -- processes -------------------------------------------------------------------------

    def cli(self, *args: str, repo: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a `sectors` command as a subprocess (its process group killed on timeout)."""
        cmd = [sys.executable, "-m", "sectorfsm", *args, "--repo", str(repo or self.repo)]
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        ) as proc:
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                self.violation(f"`sectors {' '.join(args)}` hung for 60 s")
            if "Traceback" in err:
                self.violation(f"`sectors {' '.join(args)}` crashed: {_tail(err)}")
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def start(self, repo: Path | None = None, ctl: Path | None = None) -> bool:
        """Start the engine (hooks installed) and wait for its banner; False if it exited."""
        repo, ctl = repo or self.repo, ctl or self.ctl
        for attempt in range(3):
            self.inc += 1
            self.report.starts += 1
            err = self.err = ctl / f"engine-{self.inc}.err"
            cmd = [sys.executable, str(HOOKS), str(ctl)]
            cmd += [str(self.inc), "run", "--config", str(self.config), "--repo", str(repo)]
            with open(ctl / f"engine-{self.inc}.out", "wb") as out, open(err, "wb") as errf:
                self.engine = subprocess.Popen(cmd, stdout=out, stderr=errf, start_new_session=True)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                if BANNER.search(err.read_text(errors="replace")):
                    return True
                if self.engine.poll() is not None:
                    break
                time.sleep(0.05)
            else:
                self.violation(f"engine {self.inc} printed no banner in 90 s")
            self.kill()
            why = _tail(err.read_text(errors="replace"))
            self.violation(f"engine start {attempt + 1} on {repo.name} failed: {why}")
        return False

    def kill(self) -> None:
        """SIGKILL the engine's process group and reap it."""
        if self.engine is not None and self.engine.poll() is None:
            _killpg(self.engine.pid, signal.SIGKILL)
        if self.engine is not None:
            self.engine.wait()
            self.crashed()
        self.engine = None

    def alive(self) -> bool:
        """True while the engine runs."""
        return self.engine is not None and self.engine.poll() is None

    def crashed(self) -> None:
        """A traceback in the engine's output is a crash, whatever happened next."""
        text = self.err.read_text(errors="replace") if self.err.exists() else ""
        if "Traceback" in text:
            self.violation(f"{self.err.stem} crashed: {_tail(text)}")

    def stop(self) -> None:
        """Stop the engine cleanly (SIGTERM), as an operator's Ctrl-C would."""
        if self.engine is None:
            return
        _killpg(self.engine.pid, signal.SIGTERM)
        try:
            code = self.engine.wait(timeout=60)
            if code != 0:
                self.violation(f"engine {self.inc} exited {code} on SIGTERM")
        except subprocess.TimeoutExpired:
            self.violation(f"engine {self.inc} did not stop within 60 s of SIGTERM")
        self.kill()

    def children(self) -> list[tuple[int, str]]:
        """Live `command` sealer children working on this phase's files: (pid, task)."""
        out = []
        mark = str(self.root).encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            vars_ = dict(e.split(b"=", 1) for e in env if b"=" in e)
            if b"SECTORFSM_TASK" in vars_ and mark in vars_.get(b"SECTORFSM_SEALED", b""):
                out.append((int(pid), vars_[b"SECTORFSM_TASK"].decode()))
        return out

    # -- chaos -----------------------------------------------------------------------------

    def act(self) -> None:
        """One random command, fault or child kill."""
        choices = ["pledge", "add-piece", "retry", "update-state", "remove", "fault"]
        weights = [5, 5, 2, 2, 1, 4]
        if self.sealer == "command":
            choices.append("kill-child")
            weights.append(1)
        what = self.rng.choices(choices, weights)[0]
        if what == "fault":
            self.fault()
        elif what == "kill-child":
            live = self.children()
            if live:
                pid, _ = self.rng.choice(live)
                _killpg(pid, signal.SIGKILL)
                self.report.child_kills += 1
        else:
            self.command(what)

    def command(self, what: str) -> None:
        """Send one CLI command and note what it acknowledged."""
        self.report.commands[what] += 1
        if what == "pledge":
            res = self.cli("pledge", "--count", str(self.rng.randint(1, 2)))
            if res.returncode != 0:
                self.ledger.unsure_pledges += 2
            for n in re.findall(r"Created CC sector: (\d+)", res.stdout):
                self.ledger.confirmed[int(n)] += 1
            queued = re.search(r"queued a pledge of (\d+)", res.stdout)
            self.ledger.queued_pledges += int(queued.group(1)) if queued else 0
            return
        if what == "add-piece":
            old = sorted(self.pieces.iterdir())
            if old and self.rng.random() < 0.3:
                path = self.rng.choice(old)  # the same deal data sent again
            else:
                path = self.pieces / f"p-{len(old):04d}.bin"
                path.write_bytes(self.rng.randbytes(self.rng.randint(40, 1000)))
            res = self.cli("add-piece", str(path))
            cid = re.search(r"piece (\S+) \(", res.stdout)
            if cid and res.returncode == 0:
                self.ledger.piece_acks[cid.group(1)] += 1
            elif cid:
                self.ledger.piece_unsure[cid.group(1)] += 1
            return
        known = sorted(self.states) or [1]
        n = self.rng.choice(known) if self.rng.random() < 0.9 else max(known) + 50
        if what == "retry":
            res = self.cli("retry", str(n))
        elif what == "update-state":
            state = self.states.get(n, "Packing")  # forced where it already is: a duplicate
            res = self.cli("update-state", str(n), state, "--really-do-it")
        else:
            if self.removes * 8 > len(known):
                return
            self.removes += 1
            res = self.cli("remove", str(n), "--really-do-it")
        if res.returncode != 0:
            self.report.refused[what] += 1

    def fault(self) -> None:
        """Drop a fault file for the engine's chain."""
        kind = self.rng.choice(FAULTS)
        spec: dict[str, Any] = {"kind": kind}
        if kind in ("api_errors", "send_errors"):
            spec["n"] = self.rng.randint(1, 3)
        elif kind == "message_exit":
            spec.update(method=self.rng.choice(METHODS), codes=[self.rng.choice((6, 7, 16))])
        elif kind == "reject_proofs":
            spec.update(sector=self.rng.choice(sorted(self.states) or [1]), seconds=2.0)
        else:
            spec["back"] = self.rng.randint(1, 20)
        self.drop_fault(spec)

    def drop_fault(self, spec: dict[str, Any]) -> None:
        """Write a fault file atomically (the engine picks up only `*.json`)."""
        self.fault_seq += 1
        tmp = self.ctl / "faults" / f"{self.fault_seq:05d}.tmp"
        tmp.write_text(json.dumps(spec))
        tmp.rename(tmp.with_suffix(".json"))

    def refresh(self) -> list[dict[str, Any]] | None:
        """Sector states through `sectors list --json --show-removed`."""
        res = self.cli("list", "--json", "--show-removed")
        if res.returncode != 0:
            self.violation(f"`sectors list --json` failed: {_tail(res.stderr)}")
            return None
        rows: list[dict[str, Any]] = json.loads(res.stdout)
        self.states = {r["number"]: r["state"] for r in rows}
        return rows

    # -- the run ---------------------------------------------------------------------------

    def run(self, budget: float, quick: bool) -> None:
        """Chaos for `budget` seconds, then settle without faults and check everything."""
        end = time.monotonic() + budget
        lifetime = (1.0, 5.0) if quick else (2.0, 12.0)
        while time.monotonic() < end:
            if not self.start():
                return
            if self.rng.random() < 0.6:
                self.refresh()
            until = time.monotonic() + self.rng.uniform(*lifetime)
            while time.monotonic() < until and self.alive():
                self.act()
                time.sleep(self.rng.uniform(0.05, 0.6))
            if self.engine is not None and self.engine.poll() is not None:
                self.violation(f"engine {self.inc} exited by itself ({self.engine.returncode})")
            self.kill()
            self.report.kills += 1
            self.check_children()
            self.check_store(final=False)
            self.check_execs()
            halfway = time.monotonic() > end - budget / 2
            if self.sealer == "reference" and not self.corrupt_checked and halfway:
                self.corrupt_check()
            while self.rng.random() < 0.4:  # commands that wait for the next engine
                self.command(self.rng.choice(["pledge", "add-piece", "retry"]))
        self.settle(40.0 if quick else 120.0)

    def settle(self, limit: float) -> None:
        """A last run without faults until nothing moves, then a clean stop and the checks."""
        self.drop_fault({"kind": "clear"})
        if not self.start():
            return
        deadline, last, same = time.monotonic() + limit, None, 0
        while time.monotonic() < deadline:
            rows = self.refresh()
            if rows is not None:
                shot = [(r["number"], r["state"], r["retries"]) for r in rows]
                same = same + 1 if shot == last else 0
                last = shot
                if (rows and all(r["state"] in SETTLED for r in rows)) or same >= 5:
                    break
            time.sleep(1.0)
        self.stop()
        self.report.epochs += chain_epochs(self.repo, BLOCK_TIME)
        self.check_store(final=True)
        self.check_execs()
        if self.sealer != "sim":
            self.check_storage()
        for state in self.states.values():
            self.report.sectors[state] += 1
        self.report.faults.update(
            json.loads(p.read_text())["kind"] for p in (self.ctl / "faults").glob("*.applied")
        )
        self.report.faults["clear"] -= 1
        self.report.faults += Counter()  # drops the zero count

    # -- checks ----------------------------------------------------------------------------

    def check_store(self, final: bool) -> None:
        """The acknowledged commands against the store (the CLI's own reader)."""
        try:
            infos = read_sectors(self.repo)
        except Exception as exc:
            self.violation(f"the store cannot be read: {type(exc).__name__}: {exc}")
            return
        for text in store_violations(infos, self.ledger, final):
            self.violation(text)

    def check_execs(self) -> None:
        """No task ran twice in one engine lifetime for the same attempt."""
        self.execs, found = exec_violations(self.ctl / "execs.log")
        for text in found:
            self.violation(text)

    def check_children(self) -> None:
        """Every `command` child dies with the engine (they are killed if not)."""
        deadline = time.monotonic() + 3.0
        live = self.children()
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            live = self.children()
        for pid, task in live:
            self.violation(f"{task} child pid {pid} outlived the killed engine by 3 s")
            _killpg(pid, signal.SIGKILL)

    def check_storage(self) -> None:
        """The persisted storage index counts what the storage directories hold."""
        counted = storage_counted(self.repo)
        disk = storage_on_disk(self.repo / "storage", MINER)
        for text in storage_violations(counted, disk, read_sectors(self.repo)):
            self.violation(text)

    def corrupt_check(self) -> None:
        """A copy with one corrupt sector record: that sector is set aside, the rest run."""
        from sectorfsm.fsm import LmdbStore
        from sectorfsm.sealing.store_view import sector_records, store_path

        try:
            numbers = sorted(read_sectors(self.repo))
        except Exception:
            return  # check_store reported it
        if not numbers:
            return
        self.corrupt_checked = True
        copy = self.root / "copy"
        shutil.copytree(self.repo, copy / "repo", symlinks=True)
        (copy / "ctl" / "faults").mkdir(parents=True)
        bad = self.rng.choice(numbers)
        with LmdbStore(store_path(copy / "repo")) as store:
            key = sector_records(store, events=False).key(bad)
            states = store.db("states")
            store.write(lambda txn: txn.put(key, b"\xc1\xc1 soak: not msgpack", db=states))
        what = f"a copy of the store with sector {bad}'s record corrupted"
        if not self.start(copy / "repo", copy / "ctl"):
            self.violation(f"no engine runs on {what}")
            return
        try:
            self.check_copy(copy / "repo", bad, what)
        finally:
            self.kill()
        shutil.rmtree(copy, ignore_errors=True)

    def check_copy(self, repo: Path, bad: int, what: str) -> None:
        """`list` and `status` name the bad sector; the others settle within 30 s."""
        res = self.cli("status", str(bad), repo=repo)
        said = (res.stdout + res.stderr).lower()
        if "quarantin" not in said and "corrupt" not in said:
            self.violation(f"`sectors status {bad}` on {what} does not say it is corrupt")
        deadline, rows = time.monotonic() + 30, []
        while time.monotonic() < deadline and self.alive():
            res = self.cli("list", "--json", "--show-removed", repo=repo)
            if res.returncode != 0:
                self.violation(f"`sectors list` on {what} failed: {_tail(res.stderr)}")
                return
            rows = json.loads(res.stdout)
            others = [r for r in rows if r["number"] != bad]
            if all(r["state"] in SETTLED or r["last_error"] for r in others):
                break
            time.sleep(0.5)
        else:
            why = "its engine exited" if not self.alive() else "they did not settle in 30 s"
            self.violation(f"the other sectors of {what} did not run: {why}")
        shown = [r for r in rows if r["number"] == bad]
        if not shown or not re.search("corrupt|quarantin", json.dumps(shown[0]), re.I):
            self.violation(f"`sectors list` on {what} does not show it as corrupt: {shown}")
        print(f"soak: corrupt-record copy checked (sector {bad})", file=sys.stderr, flush=True)
        self.report.corrupt_checks += 1

    def close(self) -> None:
        """Kill whatever this phase started that still runs."""
        self.kill()
        for pid, _ in self.children():
            _killpg(pid, signal.SIGKILL)


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def soak(seed: int, minutes: float, quick: bool, sealers: list[str], keep: bool) -> Report:
    """Run every sealer's phase; returns the report."""
    report = Report(seed, sealers)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="sectorfsm-soak-"))
    t0 = time.monotonic()
    budget = (45.0 if quick else minutes * 60) / len(sealers)
    try:
        for sealer in sealers:
            phase = Phase(sealer, root, random.Random(rng.random()), report)
            print(f"soak: {sealer} sealer for {budget:.0f} s", file=sys.stderr, flush=True)
            try:
                phase.run(budget, quick)
            finally:
                phase.close()
                report.executions += phase.execs
    finally:
        report.wall_s = time.monotonic() - t0
        if keep:
            print(f"soak: files kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 90 s: sim and reference")
    ap.add_argument("--minutes", type=float, default=8.0, help="chaos time of a full run")
    ap.add_argument("--seed", type=int, default=1, help="makes the run's choices reproducible")
    ap.add_argument("--sealers", help="comma-separated (default: sim,reference[,command])")
    ap.add_argument("--json", dest="json_out", type=Path, help="also write the report as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    opts = ap.parse_args(args)
    sealers = opts.sealers or ("sim,reference" if opts.quick else "sim,reference,command")
    report = soak(opts.seed, opts.minutes, opts.quick, sealers.split(","), opts.keep)
    print(report.text(), flush=True)
    if opts.json_out:
        data = {k: getattr(report, k) for k in Report.__dataclass_fields__}
        opts.json_out.write_text(json.dumps(data, indent=2))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
