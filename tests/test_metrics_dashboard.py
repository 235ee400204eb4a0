"""`docs/grafana-dashboard.json`: a model Grafana imports, graphing only what the engine exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sealtools import miner, run

from sectorfsm.sealing.states import FAILED_STATES

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
#: PromQL words that are neither metrics nor functions.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
KEYWORDS |= {"group_left", "group_right"}
GROUPING = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"


def dashboard() -> dict[str, Any]:
    """The dashboard JSON model."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def graphs(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query Prometheus (rows excluded)."""
    return [p for p in model["panels"] if p["type"] != "row"]


def expressions(model: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    exprs = [t["expr"] for p in graphs(model) for t in p["targets"]]
    for var in model["templating"]["list"]:
        query = var["query"]["query"]
        inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert inner is not None, query
        exprs.append(inner.group(1))
    return exprs


def metric_names(expr: str) -> list[str]:
    """The metric names an expression selects (functions, labels and keywords left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(GROUPING, "", e)
    names = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group() in KEYWORDS:
            continue
        names.append(m.group())
    return names


def exported(tmp_path: Path) -> set[str]:
    """Every sample name a running engine's registry exposes (suffixes included)."""

    async def body() -> set[str]:
        async with miner(tmp_path) as m:
            names: set[str] = set()
            for family in m.metrics.registry.collect():
                if family.type == "counter":
                    names.add(family.name + "_total")
                elif family.type == "histogram":
                    names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
                else:
                    names.add(family.name)
            return names

    return run(body)


def test_every_expression_names_only_metrics_the_engine_exports(tmp_path: Path) -> None:
    model = dashboard()
    have = exported(tmp_path)
    used: set[str] = set()
    for expr in expressions(model):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = [n for n in names if n not in have]
        assert not unknown, f"{expr!r} names {unknown}, which the engine does not export"
        used.update(names)
    # The panels the issue asks for are there, by what they graph.
    for family in (
        "sectorfsm_sectors",
        "sectorfsm_sector_transitions_total",
        "sectorfsm_sched_oldest_wait_seconds",
        "sectorfsm_worker_utilization_ratio",
        "sectorfsm_sector_failures_total",
    ):
        assert family in used


def test_the_name_check_catches_a_misspelt_metric() -> None:
    expr = 'sum by (state) (rate(sectorfsm_sector_transition_total{state="Proving"}[5m])) > 0'
    assert metric_names(expr) == ["sectorfsm_sector_transition_total"]
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[1m])))") == ["a_bucket"]
    assert metric_names("a / on (worker) group_left b") == ["a", "b"]


def test_the_dashboard_is_a_valid_importable_model() -> None:
    model = dashboard()
    assert model["title"] and re.fullmatch(r"[\w-]{1,40}", model["uid"])
    assert isinstance(model["schemaVersion"], int) and model["schemaVersion"] >= 36
    assert model["id"] is None  # Grafana assigns it on import
    [ds] = model["__inputs"]
    assert (ds["name"], ds["type"], ds["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    needed = {r["id"] for r in model["__requires"] if r["type"] == "panel"}
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in model["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in graphs(model):
        assert p["type"] in needed, p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert p["title"] and p["description"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"])
    [var] = model["templating"]["list"]
    assert var["name"] == "instance"
    assert all('instance=~"$instance"' in t["expr"] for p in graphs(model) for t in p["targets"])


def test_the_failed_states_panel_lists_exactly_the_failed_states() -> None:
    [panel] = [p for p in graphs(dashboard()) if p["title"] == "Sectors in failed states"]
    found = re.search(r'state=~"([^"]+)"', panel["targets"][0]["expr"])
    assert found is not None
    assert set(found.group(1).split("|")) == {s.value for s in FAILED_STATES}


def test_every_expression_parses_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(expressions(dashboard())):
        # Grafana fills in its variables before Prometheus sees the query.
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        rules += [f"      - record: dashboard:expr{i}", f"        expr: {json.dumps(concrete)}"]
    path = tmp_path / "rules.yml"
    path.write_text("\n".join(rules) + "\n")
    done = subprocess.run([promtool, "check", "rules", path], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
