"""One-off (not CI): PNG screenshots of Prometheus' own graph page for the Overview dashboard's main
queries, under load, on the test bed. Needs Debian's `prometheus` and `chromium` and the test-bed
binaries; run inside the pod network namespace:

    .venv/bin/python -m infergrid.testbed.cli exec -- .venv/bin/python tools/screenshots.py docs/screenshots

It starts its own control plane, operator (with /metrics), pod runner, Prometheus (the e2e
observability test's scrape config and the chart's rules) and the tiny InferenceService, sends a
bounded load through the official openai client, and saves one PNG per query.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "e2e"), str(REPO / "tools")]

import dashboards  # noqa: E402
import test_observability as live  # noqa: E402
from isvc_support import OperatorProcess, condition, get_isvc, install_crds, ready_pods, wait_for  # noqa: E402

from infergrid.testbed.controlplane import ControlPlane  # noqa: E402
from infergrid.testbed.demo import manifest  # noqa: E402
from infergrid.testbed.podrunner import Backoff, PodRunner  # noqa: E402
from infergrid.testbed.procs import free_port  # noqa: E402

SHOTS = (  # file, overview panel title, target index
    ("requests-by-outcome.png", "Requests by outcome", 0),
    ("ttft-p95.png", "Time to first token", 1),
    ("inter-token-latency-p95.png", "Inter-token latency", 1),
    ("tokens-per-second.png", "Tokens per second", None),
    ("requests-in-flight.png", "Requests in flight", None),
    ("kv-cache-usage.png", "KV-cache usage", 0),
)


def graph_url(prom_url: str, exprs: list[str], range_input: str) -> str:
    params = {}
    for i, expr in enumerate(exprs):
        params.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": range_input,
                       f"g{i}.stacked": "0"})
    return f"{prom_url}/classic/graph?{urllib.parse.urlencode(params)}"


def screenshot(url: str, out: Path, height: int) -> None:
    subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1280,{height}", "--virtual-time-budget=8000", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the load runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="infergrid-shots-"))
    cp = ControlPlane().start()
    runner = operator = prom = discovery = None
    try:
        install_crds(cp)
        ns = "demo"
        cp.client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        wait_for(lambda: cp.client.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default", ok_missing=True), 30,
                 "default ServiceAccount")
        model = work / "tiny-llama"
        subprocess.run([str(Path(sys.executable).parent / "infergrid-worker"), "make-tiny-model", str(model),
                        "--arch", "llama"], check=True, capture_output=True)
        runner = PodRunner(cp.kubeconfig, workdir=work / "pods", namespace=ns, backoff=Backoff(first=0.5, cap=5.0),
                           probe_period_cap=1.0).start()
        operator = OperatorProcess(cp, work / "operator.log", [ns], metrics_port=free_port()).start()
        prom, discovery = live.start_prometheus(cp, ns, operator.metrics_port, work)
        doc = manifest(model)
        doc["metadata"]["namespace"] = ns
        doc["spec"]["engine"]["speculative"] = {"method": "ngram", "numTokens": 3}
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        name = doc["metadata"]["name"]
        isvc = wait_for(lambda: (o := get_isvc(cp, ns, name)) and condition(o, "Ready").get("status") == "True"
                        and o, 300, "Ready", interval=0.5)
        (pod,) = ready_pods(cp, ns, isvc["status"]["selector"])
        base = f"http://{pod['status']['podIP']}:8000/v1"
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:  # bursts of varying size, so the graphs move
            burst = 8 + int(time.monotonic() - started) % 4 * 8
            live.run_load(base, doc["spec"]["model"]["servedName"], burst)
            time.sleep(1.0)
        time.sleep(3)
        minutes = max(2, int((time.monotonic() - started) / 60) + 1)
        model_json = dashboards.render(dashboards.OVERVIEW)
        panels = {p["title"]: p for p in model_json["panels"] if p["type"] != "row"}
        values = {"namespace": ns, "service": name, "pod": ".*"}
        for file, title, index in SHOTS:
            targets = panels[title]["targets"]
            chosen = targets if index is None else [targets[index]]
            exprs = [dashboards.fill(t["expr"], values) for t in chosen]
            screenshot(graph_url(prom.url, exprs, f"{minutes}m"), args.out / file, 160 + 700 * len(exprs))
            print(f"wrote {args.out / file}: {title}")
    finally:
        for thing in (prom, discovery, operator, runner):
            if thing is not None:
                thing.stop()
        cp.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
