"""The README's "Run workers on other machines", run as written on 127.0.0.1 (issue 15, item 7).

Every file and command comes from that README section, so the two cannot drift: each
"machine" is a directory standing in for its filesystem root (the README's `/etc/sectors` of
pc1-box is `pc1-box/etc/sectors` here), 10.0.0.1 and 0.0.0.0 become 127.0.0.1, the fixed
ports become free ones, `scp HOST:DIR` a copy into HOST's directory and the systemd unit's
`ExecStart` a process started in its `WorkingDirectory`. So the certificates come from the
real `sectors cluster certs`, the engine is `sectors run` with `[cluster]` on `tls://`, the
two `sectors worker` processes present their own certificates, and the sector goes to
Proving with its PreCommit1 on pc1-box and its Commit2 on c2-box, as their policy files
force, its finalized files fetched from one worker to the other. Every process is killed by
the `spawn` fixture.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import Child, Spawner
from test_readme import Block, readme_blocks

from sectorfsm.fsm import LmdbStore
from sectorfsm.fsm.codec import unpackb
from sectorfsm.sealing.sealer import FILES_DB

SECTION = "Run workers on other machines"
ENGINE, PC1, C2 = "engine", "pc1-box", "c2-box"
#: The README's addresses, and what stands for them here (ports: chosen when listening).
HOSTS = {"10.0.0.1": "127.0.0.1", "0.0.0.0": "127.0.0.1"}
PORTS = {":8786": ":0", ":9283": ":0"}
SECTOR = "s-t01000-1"


@dataclass(slots=True)
class Section:
    """The section's blocks, each found by what it is (not by its position)."""

    engine_toml: str
    engine_setup: str
    engine_after: str
    worker_tomls: dict[str, str]
    policies: dict[str, str]
    worker_command: str
    unit: configparser.ConfigParser


def _section() -> Section:
    blocks = [b for b in readme_blocks() if b.section == SECTION]
    assert all(b.mark == "not run" and "test_dask_tls_e2e.py" in b.arg for b in blocks), blocks

    def one(lang: str, needle: str) -> Block:
        found = [b for b in blocks if b.lang == lang and needle in b.body]
        assert len(found) == 1, (lang, needle, found)
        return found[0]

    tomls = {m: one("toml", f'name = "{m}"') for m in (PC1, C2)}
    # Each machine's policy file is the json block that follows its worker.toml.
    policies = {}
    for machine, toml in tomls.items():
        after = [b for b in blocks if b.lang == "json" and b.line > toml.line]
        policies[machine] = after[0].body
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    unit.read_string(one("ini", "[Service]").body)
    return Section(
        engine_toml=one("toml", "[miner]").body,
        engine_setup=one("bash", "sectors cluster certs").body,
        engine_after=one("bash", "sectors pledge").body,
        worker_tomls={m: b.body for m, b in tomls.items()},
        policies=policies,
        worker_command=one("bash", "sectors worker --").body,
        unit=unit,
    )


def _commands(script: str) -> list[list[str]]:
    """The commands of a bash block, one per line, comments dropped."""
    commands = (shlex.split(line, comments=True) for line in script.splitlines())
    return [words for words in commands if words]


def _here(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def _sectors(words: list[str]) -> list[str]:
    """A `sectors ...` command (the console script by any path) as this interpreter's."""
    assert Path(words[0]).name == "sectors", words
    return [sys.executable, "-m", "sectorfsm", *words[1:]]


def test_the_readme_cluster_seals_across_two_tls_workers(spawn: Spawner, tmp_path: Path) -> None:
    readme = _section()
    roots = {m: tmp_path / m for m in (ENGINE, PC1, C2)}

    def on(machine: str, path: str) -> Path:
        """A machine's absolute path, in that machine's directory."""
        assert path.startswith("/"), path
        return roots[machine] / path.lstrip("/")

    engine = roots[ENGINE]
    engine.mkdir()
    repo = engine / "repo"
    env = {**os.environ, "SECTORFSM_REPO": str(repo), "COLUMNS": "200"}
    (engine / "sectors.toml").write_text(_here(readme.engine_toml, HOSTS | PORTS))
    assert "[tls]" in readme.worker_tomls[PC1] and "[tls]" in readme.worker_tomls[C2]

    # The engine machine: certificates, copies to each worker machine, the engine itself.
    daemon: Child | None = None
    for words in _commands(readme.engine_setup):
        if words[0] == "scp":
            *sources, target = words[1:]
            host, _, directory = target.partition(":")
            dest = on(host, directory)
            dest.mkdir(parents=True, exist_ok=True)
            for source in sources:
                shutil.copy2(engine / source, dest)
        elif words[:2] == ["sectors", "run"]:
            daemon = spawn(_sectors(words), env=env, cwd=engine, name=ENGINE)
        else:
            done = spawn.run(_sectors(words), env=env, cwd=engine)
            assert done.returncode == 0, done.stdout + done.stderr
    assert daemon is not None
    assert not (on(PC1, "/etc/sectors/certs") / "ca.key").exists()  # only what each needs
    scheduler = daemon.wait_for_line(r"cluster: Dask scheduler running (tls://127\.0\.0\.1:\d+)")
    metrics = daemon.wait_for_line(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", anywhere=True)
    address = {"tls://10.0.0.1:8786": scheduler[1]}

    # Each worker machine: its worker.toml and policy where the systemd unit runs it.
    workdir = readme.unit["Service"]["WorkingDirectory"]
    for machine in (PC1, C2):
        text = _here(readme.worker_tomls[machine], address)
        # The file's absolute paths are that machine's.
        text = re.sub(r'"(/[^"]*)"', lambda m, h=machine: json.dumps(str(on(h, m[1]))), text)
        home = on(machine, workdir)
        (home / "worker.toml").write_text(text)
        (home / "myscheduler.json").write_text(readme.policies[machine])
    # pc1-box starts it by hand (in /etc/sectors, as the README says), c2-box with the unit.
    [by_hand] = _commands(readme.worker_command)
    spawn(_sectors([_here(w, address) for w in by_hand]), cwd=on(PC1, workdir), name=PC1)
    exec_start = shlex.split(readme.unit["Service"]["ExecStart"])
    spawn(_sectors(exec_start), cwd=on(C2, workdir), name=C2)
    for machine in (PC1, C2):
        daemon.wait_for_line(
            rf"cluster: worker {machine} joined from tls://127\.0\.0\.1:", anywhere=True
        )

    # Back on the engine machine: the views, the pledge.
    shown = ""
    for words in _commands(readme.engine_after):
        done = spawn.run(_sectors(words), env=env, cwd=engine)
        assert done.returncode == 0, done.stdout + done.stderr
        shown += done.stdout
    assert "Created CC sector: 1" in shown
    daemon.wait_for_line(r"sector 1: \S+ -> Proving$", anywhere=True)

    snap = json.loads(spawn.run(_sectors(["sectors", "workers", "--json"]), env=env).stdout)
    remote = {w["name"]: w["remote"] for w in snap["workers"] if w.get("remote")}
    assert set(remote) == {PC1, C2}
    for r in remote.values():
        assert r["address"].startswith("tls://127.0.0.1:"), r  # worker to worker: TLS too
        assert r["policy"]["file"].endswith("myscheduler.json") and not r["policy"]["error"], r

    # Where each task ran, by worker: the policy files decided it.
    with urllib.request.urlopen(metrics[1], timeout=30) as page:
        text = page.read().decode()
    ran = _counts(text, "sectorfsm_sched_job_duration_seconds_count")
    # Each task once: PC1 where the policy allows it, C2 on the other machine, C1 and
    # Finalize where the files are (c2-box has no sealing path), then GET: the finalized
    # files fetched to c2-box's store path.
    sealing = {(task, PC1): 1.0 for task in ("AP", "PC1", "PC2", "C1", "FIN")}
    assert ran == {**sealing, ("C2", C2): 1.0, ("GET", C2): 1.0}, ran
    fetched = _counts(text, "sectorfsm_fetch_bytes_total")
    assert fetched.get(("GET", C2), 0) > 0, fetched
    status = spawn.run(_sectors(["sectors", "status", "1"]), env=env).stdout
    assert re.search(r"Status:\s+Proving", status), status

    daemon.interrupt()
    assert daemon.finish() == 0, daemon.describe()
    # The storage index: the sealed sector and its cache are on c2-box's store path alone.
    with LmdbStore(repo / "store") as store:
        files = store.db(FILES_DB)
        with store.read() as txn:
            record: dict[str, Any] = unpackb(txn.get(b"1", db=files))
    assert list(record) == ["c2-box-store"], record
    store_dir = on(C2, "/var/lib/sectors/store")
    assert (store_dir / "sealed" / SECTOR).is_file()
    assert (store_dir / "cache" / SECTOR / "p_aux").is_file()
    assert not (on(PC1, "/var/lib/sectors/seal") / "sealed" / SECTOR).exists()


def _counts(text: str, metric: str) -> dict[tuple[str, str], float]:
    """`metric{task=..,worker=..} N` samples of a Prometheus page, by (task, worker)."""
    out = {}
    pattern = rf'^{metric}\{{task="([^"]+)",worker="([^"]+)"\}} (\S+)$'
    for m in re.finditer(pattern, text, re.M):
        out[(m[1], m[2])] = float(m[3])
    return out
