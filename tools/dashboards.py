"""The Grafana dashboards of charts/infergrid/dashboards/, generated from code.

    python tools/dashboards.py          # (re)write the JSON files
    python tools/dashboards.py --check  # exit 1 when a committed file differs from what this makes

Plain dataclasses rendered to Grafana's dashboard JSON model (schemaVersion 39: Grafana 10 and 11):
every panel is a `timeseries`, `stat` or `table` over the Prometheus datasource chosen by the
`datasource` variable, filtered by the `namespace`, `service` and `pod` variables. Worker series carry
`namespace`, `service` (the InferenceService) and `pod` through the PodMonitor's relabelings; the
operator's per-service series carry `namespace` and `service` themselves (scraped with honor_labels).

e2e/test_observability.py checks every panel of every dashboard against a live Prometheus
(`LIVE_DASHBOARDS`); tests/observability/test_dashboards.py checks that each queried metric is one the
worker's, operator's or router's registry exports.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parents[1] / "charts" / "infergrid" / "dashboards"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

WORKER = 'namespace=~"$namespace", service=~"$service", pod=~"$pod"'
SERVICE = 'namespace=~"$namespace", service=~"$service"'
ROUTER = 'namespace=~"$namespace", service=~"$service", pod=~"$pod"'
OPERATOR = 'job="infergrid-operator"'

GREEN, YELLOW, ORANGE, RED = "green", "yellow", "orange", "red"


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """One panel; `thresholds` are (value, color) steps above a green base."""

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | table
    thresholds: tuple[tuple[float, str], ...] = ()
    min: float | None = None
    max: float | None = None
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Variable:
    """A query variable: label values of `label` on `metric` (narrowed by the variables before it)."""

    name: str
    label: str
    metric: str


@dataclass(frozen=True)
class Dashboard:
    """One dashboard file: rows of panels under a title, with template variables."""

    file: str
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]
    tags: tuple[str, ...] = ("infergrid",)
    links: tuple[str, ...] = field(default=())


def quantiles(metric: str, selector: str, by: str, title: str, description: str, unit: str = "s",
              thresholds: tuple[tuple[float, str], ...] = (), width: int = 8) -> Panel:
    """p50/p95/p99 of a histogram, per `by`."""
    targets = tuple(
        Target(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
               f"p{int(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.95, 0.99))
    return Panel(title, description, targets, unit=unit, thresholds=thresholds, min=0, width=width)


def rate(metric: str, selector: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


# ------------------------------------------------------------------------------------------ overview

OVERVIEW = Dashboard(
    file="overview.json", uid="infergrid-overview", title="infergrid / Overview",
    description="Per InferenceService and worker pod: traffic, latency, tokens, load, KV cache, replicas.",
    variables=(Variable("namespace", "namespace", "vllm:num_requests_running"),
               Variable("service", "service", "vllm:num_requests_running"),
               Variable("pod", "pod", "vllm:num_requests_running")),
    rows=(
        ("Replicas", (
            Panel("Ready workers", "Worker pods of the service that are Ready, as the operator sees them.",
                  (Target(f"sum by (service) (infergrid_operator_service_ready_replicas{{{SERVICE}}})", "{{service}}"),),
                  kind="stat", thresholds=((1, GREEN),), width=6, height=5),
            Panel("Desired workers", "Worker replicas the service should have (spec.replicas or the autoscaler).",
                  (Target(f"sum by (service) (infergrid_operator_service_desired_replicas{{{SERVICE}}})",
                          "{{service}}"),),
                  kind="stat", width=6, height=5),
            Panel("Ready vs desired", "Ready worker pods against the desired count; a gap that lasts means "
                  "workers cannot start or keep failing readiness.",
                  (Target(f"sum by (service) (infergrid_operator_service_ready_replicas{{{SERVICE}}})",
                          "ready {{service}}"),
                   Target(f"sum by (service) (infergrid_operator_service_desired_replicas{{{SERVICE}}})",
                          "desired {{service}}")),
                  min=0, width=12, height=5),
        )),
        ("Traffic", (
            Panel("Requests by outcome", "Finished requests per second by finish reason (stop, length, abort).",
                  (Target(rate("vllm:request_success_total", WORKER, "service, finished_reason"),
                          "{{service}} {{finished_reason}}"),),
                  unit="reqps", min=0, width=8),
            Panel("Tokens per second", "Prompt tokens prefilled (in) and tokens generated (out) per second.",
                  (Target(rate("vllm:prompt_tokens_total", WORKER, "service"), "in {{service}}"),
                   Target(rate("vllm:generation_tokens_total", WORKER, "service"), "out {{service}}")),
                  unit="short", min=0, width=8),
            Panel("Requests in flight", "Requests running in a batch and waiting for one, per pod.",
                  (Target(f"sum by (pod) (vllm:num_requests_running{{{WORKER}}})", "running {{pod}}"),
                   Target(f"sum by (pod) (vllm:num_requests_waiting{{{WORKER}}})", "waiting {{pod}}")),
                  min=0, width=8),
        )),
        ("Latency", (
            quantiles("vllm:time_to_first_token_seconds", WORKER, "service", "Time to first token",
                      "TTFT percentiles; the red line is the default 1 s objective.",
                      thresholds=((1.0, RED),)),
            quantiles("vllm:inter_token_latency_seconds", WORKER, "service", "Inter-token latency",
                      "Time between consecutive output tokens of a request.", thresholds=((0.1, ORANGE),)),
            quantiles("vllm:e2e_request_latency_seconds", WORKER, "service", "End-to-end latency",
                      "Arrival to the last token, per request."),
        )),
        ("KV cache", (
            Panel("KV-cache usage", "Fraction of KV blocks in use per pod; above 0.95 requests start to be "
                  "preempted.",
                  (Target(f"max by (pod) (vllm:kv_cache_usage_perc{{{WORKER}}})", "{{pod}}"),),
                  unit="percentunit", thresholds=((0.85, ORANGE), (0.95, RED)), min=0, max=1, width=12),
            Panel("Worker readiness", "1 when the worker's /ready answers 200 (model loaded and probed).",
                  (Target(f"max by (pod) (infergrid:ready{{{WORKER}}})", "{{pod}}"),),
                  min=0, max=1, width=12),
        )),
    ),
)

# ------------------------------------------------------------------------------------------ engine

ENGINE = Dashboard(
    file="engine.json", uid="infergrid-engine", title="infergrid / Engine",
    description="Inside the engine: prefix cache, preemptions, queueing, batch size, speculative decoding.",
    variables=OVERVIEW.variables,
    rows=(
        ("Scheduling", (
            Panel("Prefix-cache hit rate", "Prompt tokens served from cached KV blocks / prompt tokens looked up.",
                  (Target(f"{rate('vllm:prefix_cache_hits_total', WORKER, 'pod')} / "
                          f"{rate('vllm:prefix_cache_queries_total', WORKER, 'pod')}", "{{pod}}"),),
                  unit="percentunit", min=0, max=1, width=8),
            Panel("Preemptions", "Requests preempted (recomputed later) per second because KV blocks ran out.",
                  (Target(rate("vllm:num_preemptions_total", WORKER, "pod"), "{{pod}}"),),
                  unit="short", thresholds=((1, RED),), min=0, width=8),
            quantiles("vllm:request_queue_time_seconds", WORKER, "service", "Queue time",
                      "Arrival to the first scheduling step.", thresholds=((1.0, ORANGE),)),
            Panel("Batch size", "Requests in the running batch, and tokens (prefill + decode) per engine step.",
                  (Target(f"sum by (pod) (vllm:num_requests_running{{{WORKER}}})", "requests {{pod}}"),
                   Target(f"({rate('vllm:prompt_tokens_total', WORKER, 'pod')} + "
                          f"{rate('vllm:generation_tokens_total', WORKER, 'pod')}) / "
                          f"{rate('infergrid:engine_steps_total', WORKER, 'pod')}", "tokens/step {{pod}}")),
                  min=0, width=8),
            Panel("KV blocks", "KV blocks in use and in the pool; evictions of cached prefix blocks per second.",
                  (Target(f"sum by (pod) (infergrid:kv_cache_used_blocks{{{WORKER}}})", "used {{pod}}"),
                   Target(f"sum by (pod) (infergrid:kv_cache_total_blocks{{{WORKER}}})", "total {{pod}}"),
                   Target(rate("infergrid:prefix_cache_evicted_blocks_total", WORKER, "pod"), "evicted/s {{pod}}")),
                  min=0, width=8),
            Panel("Cache config", "vllm:cache_config_info: block size and number of KV blocks per pod.",
                  (Target(f"max by (pod, block_size, num_gpu_blocks) (vllm:cache_config_info{{{WORKER}}})", ""),),
                  kind="table", width=8),
        )),
        ("Requests", (
            quantiles("vllm:request_prompt_tokens", WORKER, "service", "Prompt length",
                      "Prompt tokens per finished request.", unit="short"),
            quantiles("vllm:request_generation_tokens", WORKER, "service", "Output length",
                      "Generated tokens per finished request.", unit="short"),
            quantiles("vllm:time_per_output_token_seconds", WORKER, "service", "Time per output token",
                      "vLLM's TPOT histogram (the same gaps as inter-token latency).", thresholds=((0.1, ORANGE),)),
        )),
        ("Speculative decoding", (
            Panel("Acceptance rate", "Accepted draft tokens / proposed draft tokens.",
                  (Target(f"{rate('vllm:spec_decode_num_accepted_tokens_total', WORKER, 'pod')} / "
                          f"{rate('vllm:spec_decode_num_draft_tokens_total', WORKER, 'pod')}", "{{pod}}"),),
                  unit="percentunit", thresholds=((0.0, RED), (0.3, ORANGE), (0.6, GREEN)), min=0, max=1, width=8),
            Panel("Mean accepted length", "Tokens a verification step yields per draft: 1 + accepted / drafts.",
                  (Target(f"1 + {rate('vllm:spec_decode_num_accepted_tokens_total', WORKER, 'pod')} / "
                          f"{rate('vllm:spec_decode_num_drafts_total', WORKER, 'pod')}", "{{pod}}"),),
                  min=1, width=8),
            Panel("Acceptance by position", "Share of drafts whose token at each position was accepted.",
                  (Target(f"{rate('vllm:spec_decode_num_accepted_tokens_per_pos_total', WORKER, 'position')} / "
                          f"ignoring (position) group_left "
                          f"sum(rate(vllm:spec_decode_num_drafts_total{{{WORKER}}}[{RATE}]))",
                          "position {{position}}"),),
                  unit="percentunit", min=0, max=1, width=8),
        )),
    ),
)

# ------------------------------------------------------------------------------------------ operator

OPERATOR_DASHBOARD = Dashboard(
    file="operator.json", uid="infergrid-operator", title="infergrid / Operator",
    description="The operator: reconciles, errors, work queues, latency, status writes, Events.",
    variables=(Variable("namespace", "namespace", "infergrid_operator_service_desired_replicas"),
               Variable("service", "service", "infergrid_operator_service_desired_replicas")),
    rows=(
        ("Reconciles", (
            Panel("Reconciles by result", "Reconciles of InferenceServices per second, ok and error.",
                  (Target(rate("infergrid_operator_reconciles_total", OPERATOR, "result"), "{{result}}"),),
                  unit="ops", min=0, width=8),
            Panel("Reconcile errors", "Failed reconciles per second (retried with backoff; Events say why).",
                  (Target(rate("infergrid_operator_reconciles_total", f'{OPERATOR}, result="error"', "job"),
                          "errors"),),
                  unit="ops", thresholds=((0.01, RED),), min=0, width=8),
            quantiles("infergrid_operator_reconcile_duration_seconds", OPERATOR, "job", "Reconcile latency",
                      "Time to apply all children of one InferenceService.", thresholds=((1.0, ORANGE),)),
            Panel("Work-queue depth", "Keys waiting in or being processed by each work queue.",
                  (Target(f"max by (queue) (infergrid_operator_workqueue_depth{{{OPERATOR}}})", "{{queue}}"),),
                  thresholds=((10, ORANGE), (100, RED)), min=0, width=8),
            Panel("Status writes", "Status subresource writes per second by result.",
                  (Target(rate("infergrid_operator_status_writes_total", OPERATOR, "result"), "{{result}}"),),
                  unit="ops", min=0, width=8),
            Panel("Events", "Kubernetes Events the operator posted per second, by type and reason.",
                  (Target(f"sum by (type, reason) (increase(infergrid_operator_events_total{{{OPERATOR}}}[5m]))",
                          "{{type}} {{reason}}"),),
                  min=0, width=8),
        )),
        ("InferenceServices", (
            Panel("InferenceServices", "Seen by the operator, and Ready.",
                  (Target(f"max(infergrid_operator_inferenceservices{{{OPERATOR}}})", "seen"),
                   Target(f"max(infergrid_operator_inferenceservices_ready{{{OPERATOR}}})", "ready")),
                  min=0, width=8),
            Panel("Operator up", "1 while Prometheus scrapes an operator replica.",
                  (Target(f"up{{{OPERATOR}}}", "{{instance}}"),),
                  kind="stat", thresholds=((1, GREEN),), width=4),
            Panel("Ready vs desired per service", "The operator's view of each service's worker pods.",
                  (Target(f"max by (namespace, service) (infergrid_operator_service_ready_replicas{{{SERVICE}}})",
                          "ready {{namespace}}/{{service}}"),
                   Target(f"max by (namespace, service) "
                          f"(infergrid_operator_service_desired_replicas{{{SERVICE}}})",
                          "desired {{namespace}}/{{service}}")),
                  min=0, width=12),
        )),
    ),
)

# ------------------------------------------------------------------------------------------ fleet

FLEET = Dashboard(
    file="fleet.json", uid="infergrid-fleet", title="infergrid / Fleet",
    description="Control plane of each InferenceService: its router (traffic, ejections, held requests) "
                "and the autoscaler's decisions.",
    variables=(Variable("namespace", "namespace", "infergrid:router_ready_workers"),
               Variable("service", "service", "infergrid:router_ready_workers"),
               Variable("pod", "pod", "infergrid:router_ready_workers")),
    rows=(
        ("Router", (
            Panel("Requests per worker", "Requests the router sent to each worker, by outcome.",
                  (Target(rate("infergrid:router_requests_total", ROUTER, "worker, outcome"),
                          "{{worker}} {{outcome}}"),),
                  unit="reqps", min=0, width=12),
            quantiles("infergrid:router_upstream_latency_seconds", ROUTER, "service", "Upstream latency",
                      "Router to worker response headers.", width=12),
            Panel("Ejections", "Workers ejected from routing per second, by worker and reason.",
                  (Target(rate("infergrid:router_ejections_total", ROUTER, "worker, reason"),
                          "{{worker}} {{reason}}"),),
                  unit="short", thresholds=((0.001, ORANGE),), min=0, width=8),
            Panel("Held requests", "Requests the router holds waiting for a ready worker (scale from zero).",
                  (Target(f"sum by (service) (infergrid:router_held_requests{{{ROUTER}}})", "{{service}}"),),
                  thresholds=((1, ORANGE), (50, RED)), min=0, width=8),
            Panel("Router ready workers and retries", "Workers the router can send to; retries per second.",
                  (Target(f"min by (service) (infergrid:router_ready_workers{{{ROUTER}}})", "ready {{service}}"),
                   Target(rate("infergrid:router_retries_total", ROUTER, "service"), "retries/s {{service}}")),
                  min=0, width=8),
        )),
        ("Autoscaler and health", (
            Panel("Desired replicas", "The autoscaler's desired worker count against Ready workers.",
                  (Target(f"max by (service) (infergrid:autoscaler_desired_replicas{{{SERVICE}}})",
                          "desired {{service}}"),
                   Target(f"max by (service) (infergrid_operator_service_ready_replicas{{{SERVICE}}})",
                          "ready {{service}}")),
                  min=0, width=8),
            Panel("Scaling decisions", "Autoscaler decisions per 5 minutes by direction and reason.",
                  (Target(f"sum by (direction, reason) "
                          f"(increase(infergrid:autoscaler_decisions_total{{{SERVICE}}}[5m]))",
                          "{{direction}} {{reason}}"),),
                  min=0, width=8),
            Panel("Worker restarts by health", "Pods the health monitor restarted per 5 minutes, by reason.",
                  (Target(f"sum by (reason) (increase(infergrid:health_pod_restarts_total{{{SERVICE}}}[5m]))",
                          "{{reason}}"),),
                  thresholds=((1, ORANGE),), min=0, width=8),
        )),
    ),
)

DASHBOARDS = (OVERVIEW, ENGINE, OPERATOR_DASHBOARD, FLEET)


# ------------------------------------------------------------------------------------------ rendering

def _variable(var: Variable, before: tuple[Variable, ...]) -> dict[str, Any]:
    narrowing = ", ".join(f'{v.label}=~"${v.name}"' for v in before)
    query = f"label_values({var.metric}{{{narrowing}}}, {var.label})" if narrowing \
        else f"label_values({var.metric}, {var.label})"
    return {
        "name": var.name, "label": var.name.capitalize(), "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{var.name}-values"}, "definition": query,
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": GREEN, "value": None}]
    if panel.thresholds and panel.thresholds[0][1] == GREEN and panel.kind == "stat":
        steps = [{"color": RED, "value": None}]  # a stat that must stay above a floor: red below it
    steps += [{"color": color, "value": value} for value, color in panel.thresholds]
    defaults: dict[str, Any] = {"unit": panel.unit, "thresholds": {"mode": "absolute", "steps": steps},
                                "color": {"mode": "thresholds" if panel.kind == "stat" else "palette-classic"}}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": False,
                              "thresholdsStyle": {"mode": "line" if panel.thresholds else "off"}}
        options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                   "tooltip": {"mode": "multi", "sort": "desc"}}
    elif panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "background", "graphMode": "none", "textMode": "value_and_name",
                   "justifyMode": "auto", "orientation": "auto"}
    else:
        options = {"showHeader": True, "cellHeight": "sm"}
    targets = []
    for i, target in enumerate(panel.targets):
        t: dict[str, Any] = {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": target.expr,
                             "legendFormat": target.legend or "__auto", "range": panel.kind != "table",
                             "instant": panel.kind == "table", "editorMode": "code"}
        if panel.kind == "table":
            t["format"] = "table"
        targets.append(t)
    out: dict[str, Any] = {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options, "targets": targets,
    }
    if panel.kind == "table":
        out["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]
    return out


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (importable as is; `datasource` picks the Prometheus)."""
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row_title, row_panels in dashboard.rows:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel(panel, panel_id, x, y))
            panel_id, x, row_height = panel_id + 1, x + panel.width, max(row_height, panel.height)
        y += row_height
    datasource_var = {"name": "datasource", "label": "Datasource", "type": "datasource", "query": "prometheus",
                      "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
                      "regex": ""}
    variables = [datasource_var] + [_variable(v, dashboard.variables[:i]) for i, v in enumerate(dashboard.variables)]
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
        "tags": list(dashboard.tags), "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "30s", "fiscalYearStartMonth": 0,
        "liveNow": False, "weekStart": "",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "templating": {"list": variables},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "infergrid dashboards", "type": "dashboards", "tags": ["infergrid"],
                   "asDropdown": True, "includeVars": True, "keepTime": True}],
        "panels": panels,
    }


def panel_queries(model: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of a dashboard's JSON model, rows included."""
    found = []
    for panel in model["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["refId"], target["expr"]))
    return found


def fill(expr: str, values: dict[str, str], *, rate_interval: str = "30s", interval: str = "1s") -> str:
    """`expr` with Grafana's variables replaced: `$name`/`${name}` by `values`, `$__rate_interval` and
    `$__interval` by the given durations. A variable left over raises ValueError."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", interval)
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        out = out.replace(f"${{{name}}}", value).replace(f"${name}", value)
    if "$" in out:
        raise ValueError(f"unfilled variable in {out!r}")
    return out


def dump(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a committed file is not what this makes")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for dashboard in DASHBOARDS:
        path = args.out / dashboard.file
        text = dump(dashboard)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python tools/dashboards.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
