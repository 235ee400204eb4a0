"""Scheduler views: `sectors workers`, `jobs` and `sched-diag`, from the engine's snapshot.

`sectors run` publishes a snapshot into the store every second; these commands read the
latest one from another process and say how old it is (a stale one means no engine runs).
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from .common import DEFAULT_REPO, JsonOption, RepoOption, fail, open_repo, out_console

#: Older than this, the snapshot is flagged: the engine that wrote it is probably gone.
STALE_AFTER = 5.0


def _snapshot(repo: Any) -> tuple[dict[str, Any], float]:
    from ..sched.views import load_snapshot

    with open_repo(repo) as store:
        snap = load_snapshot(store)
    if snap is None:
        fail("no scheduler snapshot in this repo yet: start the engine with `sectors run`")
    return snap, max(0.0, time.time() - float(snap.get("at", 0.0)))


def _age_line(age: float) -> str:
    note = " (stale: is `sectors run` running?)" if age > STALE_AFTER else ""
    return f"snapshot taken {age:.1f}s ago{note}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}EiB"


def _with_auto_pledge(repo: Any, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each worker with the engine's auto-pledge state for it (None: AutoPledgeDiff unset)."""
    from ..sealing.autopledge import load_state

    with open_repo(repo) as store:
        state = load_state(store)
    return [{**w, "auto_pledge": state.get(w["name"])} for w in workers]


def _caps(caps: dict[str, int | None]) -> str:
    """`AP:2 PC1:4 PC2:- C2:1` (- = no cap); `-` without a policy."""
    return " ".join(f"{k}:{'-' if v is None else v}" for k, v in caps.items()) or "-"


def _auto(state: dict[str, Any] | None) -> str:
    if state is None:
        return "-"
    head = f"diff {state['diff']}, {state['in_flight']}/{state['pc1_max']} in flight"
    return head + (f" ({state['note']})" if state.get("note") else " (active)")


def workers(as_json: JsonOption = False, repo: RepoOption = DEFAULT_REPO) -> None:
    """Workers with their caps, tasks in flight, resources in use, auto-pledge and state."""
    snap, age = _snapshot(repo)
    rows = _with_auto_pledge(repo, snap["workers"])
    refused = snap.get("cluster", {}).get("refused", {})
    if as_json:
        shown = {"age_s": round(age, 3), "workers": rows, "refused": refused}
        typer.echo(json.dumps(shown, indent=2))
        return
    from rich.table import Table

    table = Table(
        "Worker",
        "State",
        "Caps",
        "Tasks",
        "CPU",
        "Memory",
        "GPU",
        "Free",
        "Util",
        "Auto-pledge",
        box=None,
    )
    for w in rows:
        state = "[green]enabled[/]" if w["enabled"] else f"[red]disabled[/] {w['disabled_reason']}"
        if w.get("policy_error"):
            state += f" [yellow](policy: {w['policy_error']})[/]"
        tasks = " ".join(f"{k}:{v}" for k, v in w["tasks"].items()) or "-"
        table.add_row(
            w["name"],
            state,
            _caps(w.get("caps", {})),
            tasks,
            f"{w['cpus_used']}/{w['cpus']}",
            f"{_size(w['mem_used'])}/{_size(w['mem_physical'])}",
            f"{w['gpus_used']:g}/{w['gpus']}",
            _size(w["free_space"]),
            f"{100 * w['utilization']:.0f}%",
            _auto(w["auto_pledge"]),
        )
    console = out_console()
    console.print(table)
    remote = _remote_table([w for w in rows if w.get("remote")])
    if remote is not None:
        console.print(remote)
    for address, why in sorted(refused.items()):
        console.print(f"worker at {address} {why}", style="red", markup=False, highlight=False)
    console.print(_age_line(age), style="dim")


def _remote_table(rows: list[dict[str, Any]]) -> Any:
    """Host, address, heartbeat, free space and policy of each remote worker (None: none)."""
    if not rows:
        return None
    from rich.table import Table
    from rich.text import Text

    table = Table("Remote worker", "Host", "Address", "Heartbeat", "Free", "Policy", box=None)
    for w in rows:
        r = w["remote"]
        beat = r.get("heartbeat_age_s")
        free = " ".join(f"{k}:{_size(v)}" for k, v in sorted(r.get("free", {}).items())) or "-"
        policy = r.get("policy") or {}
        text = policy.get("file") or "none"
        if policy.get("error"):
            text += f" (error: {policy['error']})"
        table.add_row(
            Text(w["name"]),
            Text(r.get("host") or "-"),
            Text(r.get("address") or "-"),
            "-" if beat is None else f"{beat:.1f}s ago",
            Text(free),
            Text(text),
        )
    return table


def _elapsed(seconds: float) -> str:
    """`12.3s`, `4m05s`, `2h03m`: how long a job has been in its state."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _progress(transfer: dict[str, Any] | None) -> str:
    """` 3.0MiB/8.0MiB 37% 1.2MiB/s` for a job waiting on a file transfer, else ``."""
    if not transfer:
        return ""
    done, total, rate = transfer["done"], transfer["total"], transfer.get("rate", 0)
    pct = f" {100 * done // total}%" if total else ""
    return f" {_size(done)}/{_size(total)}{pct} {_size(rate)}/s"


def jobs(as_json: JsonOption = False, repo: RepoOption = DEFAULT_REPO) -> None:
    """Tasks on workers (worker, host, phase, transfer progress, time) and queued tasks."""
    snap, age = _snapshot(repo)
    if as_json:
        typer.echo(json.dumps({"age_s": round(age, 3), "jobs": snap["jobs"]}, indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table("ID", "Sector", "Task", "Worker", "Host", "State", "Time", box=None)
    for j in snap["jobs"]:
        # A remote host is what the worker reported about itself: shown as text, never markup.
        host = j.get("host") or ("local" if j["worker"] else "-")
        table.add_row(
            str(j["sched_id"]),
            j["sector"],
            j["task"],
            Text(j["worker"] or "-"),
            Text(host),
            j["phase"] + _progress(j.get("transfer")),
            _elapsed(j["age_s"]),
        )
    console = out_console()
    console.print(table)
    console.print(_age_line(age), style="dim")


def sched_diag(as_json: JsonOption = False, repo: RepoOption = DEFAULT_REPO) -> None:
    """Why each queued task is not placed, worker by worker."""
    snap, age = _snapshot(repo)
    if as_json:
        typer.echo(json.dumps({"age_s": round(age, 3), "diag": snap["diag"]}, indent=2))
        return
    console = out_console()
    if not snap["diag"]:
        console.print("no task is waiting for a worker")
    for d in snap["diag"]:
        console.print(
            f"[bold]{d['task']}[/] {d['sector']} (id {d['sched_id']}, prio {d['priority']})"
        )
        for worker, why in sorted(d["reasons"].items()):
            # Reasons quote policy files and worker names: text, not rich markup.
            console.print(f"  {worker}: {why}", markup=False, highlight=False)
    console.print(_age_line(age), style="dim")


def register(app: typer.Typer) -> None:
    """Add the scheduler views to `app`."""
    app.command("workers")(workers)
    app.command("jobs")(jobs)
    app.command("sched-diag")(sched_diag)
