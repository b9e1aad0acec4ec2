"""The Grafana dashboards: committed JSON equals the generator's, Grafana's JSON model is respected,
every query is valid PromQL (promtool), and no panel or alert queries a metric nobody exports."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO / "charts" / "infergrid" / "dashboards"
RULES = REPO / "charts" / "infergrid" / "rules" / "infergrid.rules.yaml"

spec = importlib.util.spec_from_file_location("dashboards_tool", REPO / "tools" / "dashboards.py")
assert spec is not None and spec.loader is not None
dashboards = importlib.util.module_from_spec(spec)
sys.modules.setdefault("dashboards_tool", dashboards)
spec.loader.exec_module(dashboards)

FILES = sorted(DASHBOARDS_DIR.glob("*.json"))
PANEL_TYPES = {"row", "timeseries", "stat", "table"}
UNITS = {"short", "s", "ms", "percentunit", "reqps", "ops", "bytes", "none"}
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")  # any selector with matchers
NAMESPACED = re.compile(r"\b((?:vllm|infergrid):[a-zA-Z0-9_:]+|infergrid_operator_[a-zA-Z0-9_]+)")  # ours, bare too


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def worker_metric_names() -> set[str]:
    """Every sample name a worker's /metrics can carry (its real registry and collector)."""
    from infergrid.worker.engine.stats import EngineStats
    from infergrid.worker.server.metrics import EngineStatsCollector, ServerGauges, ServerMetrics

    stats = EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.5, num_total_blocks=8, num_used_blocks=4,
                        num_preemptions_total=0, prompt_tokens_total=0, generation_tokens_total=0,
                        prefix_cache_queries_total=0, prefix_cache_hits_total=0, spec_decode_num_drafts_total=0,
                        spec_decode_num_draft_tokens_total=0, spec_decode_num_accepted_tokens_total=0,
                        last_step_time=0.0, num_steps_total=0, spec_decode_num_accepted_tokens_per_pos=(0, 0))
    metrics = ServerMetrics("m")
    metrics.registry.register(EngineStatsCollector(lambda: stats, "m", ServerGauges(
        num_in_flight=lambda: 0, rejected=lambda: {"queue_full": 1}, is_ready=lambda: True,
        is_healthy=lambda: True, is_draining=lambda: False,
        cache_config=lambda: {"block_size": "16", "num_gpu_blocks": "8"})))
    return sample_names(generate_latest(metrics.registry).decode())


def operator_metric_names() -> set[str]:
    """Every sample name of the operator's registry, with one service's gauges set."""
    from prometheus_client import REGISTRY

    from infergrid.operator import metrics
    from infergrid.operator.autoscaler.health import HEALTH_REASONS

    metrics.set_service_gauges("ns", "svc", desired=1, ready=1, ttft_slo_seconds=1.0)
    metrics.EVENTS_POSTED.labels("Normal", "Ready")
    metrics.watch_health("ns", "svc", HEALTH_REASONS)  # the autoscaler's and health monitor's families
    metrics.AUTOSCALER_DESIRED.labels("ns", "svc").set(1)
    metrics.AUTOSCALER_DECISIONS.labels("ns", "svc", "hold", "steady").inc()
    try:
        return sample_names(generate_latest(REGISTRY).decode())
    finally:
        metrics.forget_service("ns", "svc")


def router_metric_names() -> set[str]:
    """Every sample name of a router's registry, with one worker admitted and one request counted."""
    from infergrid.router.metrics import RouterMetrics

    metrics = RouterMetrics("prefix-aware")
    metrics.add_worker("10.0.0.1:8000")
    metrics.count_request("10.0.0.1:8000", "ok")
    metrics.upstream_latency.observe(0.01)
    return sample_names(metrics.render().decode())


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return worker_metric_names() | operator_metric_names() | router_metric_names() | {"up"}


def test_committed_dashboards_are_what_the_generator_makes(tmp_path: Path) -> None:
    assert dashboards.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [p.name for p in FILES]
    for path in FILES:
        assert (tmp_path / path.name).read_text() == path.read_text(), \
            f"{path.name} is stale: run python tools/dashboards.py"
    assert dashboards.main(["--check"]) == 0


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_follows_grafanas_json_model(path: Path) -> None:
    model = load(path)
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list),
                      ("templating", dict), ("time", dict), ("tags", list), ("editable", bool)):
        assert isinstance(model.get(key), kind), f"{path.name}: {key} missing or not a {kind.__name__}"
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", model["uid"]), model["uid"]
    assert model["schemaVersion"] >= 36
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "service"} <= set(variables), f"{path.name}: namespace/service variables missing"
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    boxes: list[tuple[int, int, int, int]] = []
    for panel in model["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["w"] >= 1 and pos["x"] + pos["w"] <= 24 and pos["h"] >= 1, (panel["title"], pos)
        box = (pos["x"], pos["y"], pos["x"] + pos["w"], pos["y"] + pos["h"])
        for other in boxes:
            assert box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1], \
                f"{path.name}: panel {panel['title']!r} overlaps another"
        boxes.append(box)
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["description"], f"{panel['title']} has no description"
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] in UNITS, (panel["title"], defaults["unit"])
        steps = defaults["thresholds"]["steps"]
        assert steps[0]["value"] is None and all(a["value"] < b["value"] for a, b in zip(steps[1:], steps[2:], strict=False)), steps
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]
            for name in re.findall(r"\$\{?(\w+)", target["expr"]):
                assert name in variables or name in BUILTIN_VARIABLES, f"{panel['title']}: unknown ${name}"


def test_each_overview_query_the_issue_asks_for_is_there() -> None:
    exprs = " ".join(e for _, _, e in dashboards.panel_queries(load(DASHBOARDS_DIR / "overview.json")))
    for needed in ("vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                   "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_requests_running",
                   "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "infergrid_operator_service_ready_replicas", "infergrid_operator_service_desired_replicas"):
        assert needed in exprs, needed
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, service) (rate(vllm:time_to_first_token_seconds_bucket" in exprs


def all_queries() -> list[tuple[str, str]]:
    found = []
    for path in FILES:
        for title, ref, expr in dashboards.panel_queries(load(path)):
            found.append((f"{path.name}: {title} [{ref}]", expr))
        for var in load(path)["templating"]["list"]:
            if var["type"] == "query":
                found.append((f"{path.name}: variable {var['name']}", var["definition"]))
    return found


def test_no_panel_variable_or_alert_queries_a_metric_nobody_exports(exported: set[str]) -> None:
    queries = all_queries()
    rules = yaml.safe_load(RULES.read_text())
    queries += [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    unknown = []
    for where, expr in queries:
        names = set(METRIC.findall(expr)) | set(NAMESPACED.findall(expr))
        assert names, f"{where}: no metric found in {expr!r}"
        unknown += [f"{where}: {n}" for n in sorted(names - exported)]
    assert not unknown, "queries of metrics nobody exports:\n" + "\n".join(unknown)


def test_a_query_of_an_unexported_metric_is_caught(exported: set[str]) -> None:
    assert "vllm:num_requests_swapped" not in exported  # vLLM v0's metric: we never export it
    assert set(METRIC.findall('sum(vllm:num_requests_swapped{pod=~"$pod"})')) - exported


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (variables filled) as a recording rule's expression."""
    from infergrid.testbed.prometheus import find_binary

    rules = [{"record": f"check:q{i}", "expr": dashboards.fill(expr, {"namespace": "a", "service": "b", "pod": "c"})}
             for i, (_, expr) in enumerate(all_queries()) if not expr.startswith("label_values(")]
    path = tmp_path / "queries.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    res = subprocess.run([find_binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout


def test_fill_replaces_variables_and_refuses_leftovers() -> None:
    expr = 'rate(x{namespace=~"$namespace", pod=~"${pod}"}[$__rate_interval])'
    assert dashboards.fill(expr, {"namespace": "a", "pod": "p"}) == 'rate(x{namespace=~"a", pod=~"p"}[30s])'
    with pytest.raises(ValueError, match="unfilled"):
        dashboards.fill(expr, {"namespace": "a"})
