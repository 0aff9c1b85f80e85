"""The Grafana dashboard and the Prometheus alert rules in deploy/monitoring read what the service exports.

Every query is parsed as PromQL (promql-parser: Prometheus's grammar and function list), and every
metric and label it names is checked against the /metrics of a real stack (API, worker, Redis)
after a realtime call and a bulk job, so a renamed metric or label fails here, not on a blank panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "monitoring" / "prometheus-rules.yaml"
#: Labels Prometheus itself puts on every scraped series (the target's), not the service.
TARGET_LABELS = {"job", "instance", "pod", "namespace", "service", "container", "endpoint"}
#: Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h", "$model": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana's variables substituted."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {expr}"
            out.append((panel["title"], expr))
    return out


def all_queries() -> list[tuple[str, str]]:
    return dashboard_queries() + [(rule["alert"], rule["expr"]) for rule in rules()]


class Names:
    """Metric names, label matchers and grouping labels a query uses (walked from its AST)."""

    def __init__(self, expr: str) -> None:
        self.metrics: set[str] = set()
        self.matchers: set[str] = set()
        self.grouping: set[str] = set()
        promql_parser.walk(promql_parser.parse(expr), self._visit)

    def _visit(self, node) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            assert node.name, f"a selector without a metric name: {node}"
            self.metrics.add(node.name)
            self.matchers |= {m.name for m in node.matchers.matchers}
        elif kind == "AggregateExpr" and node.modifier is not None:
            self.grouping |= set(node.modifier.labels)
        elif kind == "BinaryExpr" and node.modifier is not None and node.modifier.matching is not None:
            self.grouping |= set(node.modifier.matching.labels)


def output_labels(node) -> set[str] | None:
    """Labels an alert's result series carry (None: whatever its selector's series carry)."""
    kind = type(node).__name__
    if kind == "AggregateExpr":
        by = node.modifier is not None and node.modifier.type == promql_parser.AggModifierType.By
        return set(node.modifier.labels) if by else (set() if node.modifier is None else None)
    if kind == "BinaryExpr":
        return output_labels(node.lhs)
    if kind == "ParenExpr":
        return output_labels(node.expr)
    if kind == "Call" and node.func.name == "absent":
        return set()
    return None


# --- the files themselves (no stack) ------------------------------------------------------------


def test_the_walk_finds_every_metric_and_label_a_query_names():
    names = Names('sum by (a) (rate(x_total{b="1"}[5m])) / on (c) group_left max without (d) (y) > 0 '
                  'and absent(z{e=~"."})')
    assert names.metrics == {"x_total", "y", "z"}
    assert names.matchers == {"b", "e"} and names.grouping == {"a", "c", "d"}
    assert output_labels(promql_parser.parse("max by (model) (x) == 0")) == {"model"}
    with pytest.raises(Exception):
        promql_parser.parse("rate(x[5m]")  # a syntax error is refused
    with pytest.raises(Exception):
        promql_parser.parse("no_such_function(x)")



def test_dashboard_loads_and_every_query_parses():
    d = dashboard()
    assert d["uid"] and d["title"] and d["panels"]
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "model"}
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        promql_parser.parse(expr)  # raises on a syntax error or an unknown function
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert {t["refId"] for t in panel["targets"]} == {chr(65 + i) for i in range(len(panel["targets"]))}


def test_alert_rules_load_and_parse():
    found = rules()
    assert {r["alert"] for r in found} >= {"RerankNoLiveWorker", "RerankQueueGrowing", "RerankHigh5xxRate",
                                           "RerankRedisRefusingWrites"}
    for rule in found:
        tree = promql_parser.parse(rule["expr"])
        promql_parser.parse_duration(rule["for"])
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        used = set(re.findall(r"\$labels\.(\w+)", rule["annotations"]["summary"] + rule["annotations"]["description"]))
        carried = output_labels(tree)
        assert carried is None or used <= carried, f"{rule['alert']}: annotations name {used - carried}, not kept"
    growing = next(r for r in found if r["alert"] == "RerankQueueGrowing")
    assert promql_parser.parse_duration(growing["for"]).total_seconds() == 300  # growing for 5 minutes


# --- against what a real stack exports ----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(api) -> dict[str, set[str]]:
    """Sample name -> its label names, from the stack's /metrics after a call and a finished job."""
    assert api.post("/v1/rerank", {"query": "q", "documents": ["a", "b"]}).status_code == 200
    r = api.post("/v1/rerank/jobs", {"items": [{"id": "m", "query": "q", "documents": ["a", "b", "c"]}]})
    assert r.status_code == 202, r.text
    status_url = api.url + f"/v1/rerank/jobs/{r.json()['id']}"
    headers = {"Authorization": f"Bearer {api.env['ACCESS_TOKEN'].split(',')[0]}"}
    wait_for(lambda: requests.get(status_url, headers=headers, timeout=5).json()["status"] == "succeeded", 60, "the job")

    def scrape():
        text = requests.get(api.url + "/metrics", timeout=5).text
        return text if "rerank_job_items_scored_total{" in text else None  # with the next heartbeat

    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(wait_for(scrape, 15, "worker metrics of the job")):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.mark.stack
def test_every_query_names_exported_metrics_and_labels(exported):
    for where, expr in all_queries():
        names = Names(expr)
        missing = names.metrics - set(exported)
        assert not missing, f"{where}: {missing} not exported (exported: {sorted(exported)})"
        labels = set().union(*(exported[m] for m in names.metrics)) | TARGET_LABELS
        assert names.matchers <= labels, f"{where}: label(s) {names.matchers - labels} on none of {names.metrics}"
        assert names.grouping <= labels, f"{where}: grouping by {names.grouping - labels}, not a label of {names.metrics}"


@pytest.mark.stack
def test_dashboard_shows_every_exported_metric(exported):
    families = {re.sub(r"_(total|created|bucket|sum|count)$", "", n) for n in exported if n.startswith("rerank_")}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", m) for _, e in dashboard_queries() for m in Names(e).metrics}
    assert families <= shown, f"exported but on no panel (add one to {DASHBOARD.name}): {sorted(families - shown)}"
