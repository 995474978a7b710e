"""cluster/grafana/polydistill_dashboard.json against the metrics the actors really export.

The metrics are found by reading the source of the modules that define them (no Ray needed): every
``Counter`` / ``Gauge`` / ``Histogram`` of ``ray.util.metrics`` called with a literal name, or with a
name taken from a literal list the call iterates over (the pool's gauges). Their names on Ray's
Prometheus endpoint (Ray 2.60, OpenTelemetry exporter, checked against a live /metrics page):

    Gauge      NAME       ->  ray_NAME
    Counter    NAME       ->  ray_NAME_total
    Histogram  NAME       ->  ray_NAME_bucket, ray_NAME_sum, ray_NAME_count

and the metrics' ``job`` tag is stored by Prometheus as ``exported_job``: ``job`` is the label a
scrape adds itself (the scrape config's job name), and with ``honor_labels: false`` (Prometheus' default,
and the config ``ray metrics launch-prometheus`` writes) a scraped ``job`` label is renamed.

So a metric renamed in the code without the dashboard (or the reverse) fails here.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "grafana" / "polydistill_dashboard.json"
METRIC_MODULES = [ROOT / "actors" / "shells.py", ROOT / "actors" / "pool.py"]
PREFIX = "ray_"  # what Ray's metrics endpoint puts before every application metric
SUFFIXES = {"Gauge": ("",), "Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count")}
JOB_LABEL = "exported_job"
JOB_FILTER = f'{JOB_LABEL}=~"$job"'
# Labels a query may group by that are not tags of the metric: the histogram's bucket bound.
EXTRA_LABELS = {"le"}
# Any metric name in a query that mentions polydistill (with or without the prefix).
METRIC_REFERENCE = re.compile(r"\b[A-Za-z_:][A-Za-z0-9_:]*polydistill[A-Za-z0-9_:]*")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # Gauge, Counter or Histogram
    tag_keys: tuple[str, ...]
    where: str


def _literal_strings(node: ast.AST) -> tuple[str, ...] | None:
    if isinstance(node, (ast.Tuple, ast.List)) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return tuple(e.value for e in node.elts)
    return None


def _metrics_aliases(tree: ast.Module) -> set[str]:
    """Names under which a module imported ray.util.metrics."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "ray.util":
            aliases |= {a.asname or a.name for a in node.names if a.name == "metrics"}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "ray.util.metrics" and a.asname}
    return aliases


def _names_from_comprehension(call: ast.Call, name: str, parents: dict[ast.AST, ast.AST]) -> list[str]:
    """``NAME`` bound by an enclosing comprehension ``for NAME, ... in [("literal", ...), ...]``."""
    node = call
    while node in parents:
        node = parents[node]
        if not isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        for generator in node.generators:
            target, items = generator.target, generator.iter
            if not isinstance(items, (ast.List, ast.Tuple)):
                continue
            if isinstance(target, ast.Name) and target.id == name:
                values = [_literal_strings(ast.Tuple(elts=[item], ctx=ast.Load())) for item in items.elts]
                return [v[0] for v in values if v]
            if isinstance(target, ast.Tuple):
                positions = [i for i, e in enumerate(target.elts) if isinstance(e, ast.Name) and e.id == name]
                if positions:
                    found = []
                    for item in items.elts:
                        strings = _literal_strings(item)
                        assert strings is not None, f"line {item.lineno}: not a tuple of literals"
                        found.append(strings[positions[0]])
                    return found
    return []


def defined_metrics() -> dict[str, Metric]:
    found: dict[str, Metric] = {}
    for path in METRIC_MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _metrics_aliases(tree)
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr in SUFFIXES and isinstance(call.func.value, ast.Name)
                    and call.func.value.id in aliases):
                continue
            where = f"{path.name}:{call.lineno}"
            keywords = {k.arg: k.value for k in call.keywords}
            first = call.args[0] if call.args else keywords.get("name")
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names = [first.value]
            elif isinstance(first, ast.Name):
                names = _names_from_comprehension(call, first.id, parents)
            else:
                names = []
            assert names, f"{where}: cannot read the name of this {call.func.attr} from the source"
            tag_keys = _literal_strings(keywords["tag_keys"]) if "tag_keys" in keywords else ()
            assert tag_keys is not None, f"{where}: tag_keys is not a literal tuple"
            for name in names:
                assert name not in found, f"{name} defined twice: {found[name].where} and {where}"
                found[name] = Metric(name, call.func.attr, tag_keys, where)
    return found


METRICS = defined_metrics()
EXPORTED = {PREFIX + m.name + suffix: m for m in METRICS.values() for suffix in SUFFIXES[m.kind]}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, panels' and template variables'."""
    found = [(p["title"], t["expr"]) for p in query_panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return found


def test_the_source_scan_finds_every_kind_and_the_pools_gauges():
    kinds = {m.kind for m in METRICS.values()}
    assert kinds == {"Gauge", "Counter", "Histogram"}, METRICS
    # The pool's four gauges are named in a list the constructor iterates over, not in the call.
    assert {"polydistill_teacher_replicas_wanted", "polydistill_teacher_replicas_running",
            "polydistill_work_backlog", "polydistill_knowledge_backlog"} <= set(METRICS)
    assert METRICS["polydistill_teacher_samples"].tag_keys == ("job", "replica")
    assert all("job" in m.tag_keys for m in METRICS.values()), "every metric carries the job tag"


def test_dashboard_is_a_grafana_dashboard_model():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"] and len(dashboard["uid"]) <= 40
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    job = variables["job"]
    assert job["type"] == "query" and job["datasource"]["uid"] == "${datasource}"
    assert re.fullmatch(rf"label_values\(ray_polydistill_\w+, {JOB_LABEL}\)", job["query"]["query"]), job["query"]
    assert job["definition"] == job["query"]["query"]

    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((panel["title"], grid))
    for i, (title, a) in enumerate(boxes):  # no two panels share a cell of the grid
        for other, b in boxes[i + 1:]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                     or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
            assert apart, f"{title!r} overlaps {other!r}"
    for panel in query_panels(dashboard):
        assert panel["title"] and panel["type"] in {"timeseries", "bargauge", "stat", "gauge", "table"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert targets, f"{panel['title']!r} has no queries"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_query_uses_only_metrics_the_code_exports():
    dashboard = load_dashboard()
    for title, expr in expressions(dashboard):
        references = METRIC_REFERENCE.findall(expr)
        assert references, f"{title}: {expr} uses no polydistill metric"
        for name in references:
            assert name in EXPORTED, (
                f"{title}: {name} is not on Ray's metrics endpoint; the code exports "
                f"{sorted(EXPORTED)} (Ray adds the {PREFIX} prefix, _total to counters and "
                "_bucket/_sum/_count to histograms)")
        if title.startswith("$"):
            continue
        # Every selector is restricted to the chosen jobs; every label grouped by is a tag of each metric.
        for match in re.finditer(METRIC_REFERENCE, expr):
            assert expr[match.end():].startswith("{") and JOB_FILTER in expr[match.end():].split("}", 1)[0], (
                f"{title}: {match.group()} is not filtered by {JOB_FILTER}: {expr}")
        metrics = [EXPORTED[name] for name in references]
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (part.strip() for part in group.split(",")):
                if label == JOB_LABEL or label in EXTRA_LABELS:
                    continue
                assert all(label in m.tag_keys for m in metrics), f"{title}: no {label!r} tag on {metrics}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"\bby \([^)]*\ble\b", expr), f"{title}: {expr}"
        for name in references:
            kind = EXPORTED[name].kind
            if kind == "Counter" or name.endswith(("_bucket", "_sum", "_count")):
                assert re.search(rf"\b(rate|increase|irate)\({name}\{{", expr), (
                    f"{title}: {name} is cumulative; query its rate: {expr}")


def test_every_exported_metric_has_a_panel():
    in_panels = {name for panel in query_panels(load_dashboard()) for target in panel["targets"]
                 for name in METRIC_REFERENCE.findall(target["expr"])}
    missing = sorted(m.name for m in METRICS.values()
                     if not any(PREFIX + m.name + suffix in in_panels for suffix in SUFFIXES[m.kind]))
    assert not missing, f"metrics the code exports but no panel shows: {missing}"


@pytest.mark.parametrize("wanted", [
    "teacher samples/s per replica", "teacher batch latency", "wanted vs running", "stream backlog",
    "bytes on the wire", "student loss", "loss per term", "student samples/s", "samples distilled",
    "samples per language",
])
def test_the_issue_asks_for_these_panels(wanted):
    titles = [p["title"].lower() for p in query_panels(load_dashboard())]
    assert any(wanted in title for title in titles), titles
