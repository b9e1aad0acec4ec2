"""The autoscaler and health monitor on the real control plane, with real worker processes.

One autoscaled service (tiny model, `maxNumSeqs: 1` so a queue forms at once, tight windows) goes through
its whole life in one test, each phase asserted on what a user sees (spec/status, `kubectl get`
columns, conditions, Events, the operator's metrics):
  1 -> 3 under a bounded load of 6 concurrent requests (in flight 6 / (1 running + 1 waiting) = 3;
     maxReplicas is 4, so a decision taken twice would show), with the operator SIGKILLed right after
     its first scale write and restarted;
  a SIGSTOPped worker under load is found unresponsive and replaced, with its Event, while the
  others keep serving;
  back to minReplicas 1 after the load stops, to 0 once minReplicas is 0, and back to 1 on a wake
  annotation, after which a completion succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from operator_cluster import apply_isvc, condition, events_for, get_isvc, wait_for, worker_pods

from infergrid.operator.autoscaler.health import UNRESPONSIVE_SECONDS
from infergrid.testbed.load import LoadGenerator, ready_pod_ips

NAME = "auto"
# scaleDownDelaySeconds: longer than the health monitor takes to call a stopped worker unresponsive
# (UNRESPONSIVE_SECONDS + a scrape) and than the load's requests stuck on it take to time out (10 s):
# while they are stuck the load looks low, and a low-load scale-down would delete the stopped worker
# before the health monitor's verdict (the ReplicaSet removes a not-ready pod before ready ones)
DELAY = int(UNRESPONSIVE_SECONDS) + 5


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    subprocess.run([str(Path(sys.executable).parent / "infergrid-worker"), "make-tiny-model", str(out),
                    "--arch", "llama"], check=True, capture_output=True, timeout=300)
    return out


def scale_events(cp, ns: str) -> list[tuple[str, str]]:
    return [(e["reason"], e["message"]) for e in sorted(events_for(cp, ns, NAME), key=lambda e: e["metadata"]
                                                        ["creationTimestamp"])]


def spec_replicas(cp, ns: str) -> int:
    return (get_isvc(cp, ns, NAME) or {})["spec"].get("replicas", -1)


def kubectl_row(cp, ns: str) -> list[str]:
    out = cp.kubectl("get", "inferenceservices", NAME, "-n", ns, "-o", "wide").stdout.splitlines()
    header, row = out[0].split(), out[1].split()
    assert header[:4] == ["NAME", "MODEL", "REPLICAS", "READY"] and "SCALING" in header, header
    return [row[header.index(col)] for col in ("REPLICAS", "READY", "SCALING")]


def test_autoscaled_service_scales_up_survives_an_operator_kill_replaces_a_stalled_worker_and_scales_to_zero(
        control_plane, k8s_namespace, make_operator, make_pod_runner, tiny_model):
    cp, ns = control_plane, k8s_namespace
    runner = make_pod_runner(namespace=ns, max_grace=8.0, env={**os.environ, "OMP_NUM_THREADS": "1"})
    operator = make_operator("autoscaler-0")
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    apply_isvc(cp, ns, NAME, {
        "model": {"source": f"file://{tiny_model}"},
        "engine": {"maxNumSeqs": 1, "maxModelLen": 256},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 1, "scaleDownDelaySeconds": DELAY},
        "timeouts": {"startupSeconds": 120, "drainSeconds": 2},
    })
    wait_for(lambda: (i := get_isvc(cp, ns, NAME)) and condition(i, "Ready").get("status") == "True", 120,
             "one ready worker")
    marks["ready"] = time.monotonic() - t0
    selector = f"infergrid.dev/inferenceservice={NAME},app.kubernetes.io/component=worker"
    # Pods the load leaves alone once stopped, as the router would after ejecting them within ~1 s
    # (otherwise every client thread piles onto the stopped pod, the others see no load, and a
    # low-load scale-down removes the victim before the health monitor's verdict).
    stopped_ips: set[str] = set()
    load = LoadGenerator(lambda: [ip for ip in ready_pod_ips(cp.client, ns, selector) if ip not in stopped_ips],
                         NAME, max_concurrency=6, max_tokens=48, timeout=10.0)
    try:
        # ---- 1 -> 3 under load; SIGKILL the operator right after its first scale write
        load.start(6)
        wait_for(lambda: spec_replicas(cp, ns) >= 2, 60, "the first scale-up")
        operator.kill()
        marks["first scale-up (operator killed)"] = time.monotonic() - t0
        operator.start()
        seen = set()

        def three_ready():
            seen.add(spec_replicas(cp, ns))
            isvc = get_isvc(cp, ns, NAME)
            return isvc["status"].get("readyReplicas") == 3 and isvc["spec"]["replicas"] == 3 and isvc
        isvc = wait_for(three_ready, 150, "3 ready workers under load")
        marks["3 ready"] = time.monotonic() - t0
        assert max(seen) == 3, seen  # never a doubled decision (maxReplicas is 4)
        ups = wait_for(lambda: [m for r, m in scale_events(cp, ns) if r == "ScaledUp" and "-> 3 (" in m]
                       and [m for r, m in scale_events(cp, ns) if r == "ScaledUp"], 10, "ScaledUp Events")
        assert all("(queue)" in m for m in ups), ups
        steps = [m.split(" (")[0] for m in ups]
        assert len(steps) == len(set(steps)) and steps[-1].endswith("-> 3"), steps  # each change once
        assert isvc["status"]["lastScaleReason"] == "queue" and isvc["status"]["lastScaleTime"]
        assert condition(isvc, "Scaling")["reason"] in ("ScaledUp", "Steady", "Stabilizing")
        assert kubectl_row(cp, ns)[:2] == ["3", "3"]

        # ---- SIGSTOP one worker under load: found unresponsive, replaced, the others keep serving
        victim = sorted(worker_pods(cp, ns, NAME), key=lambda p: p["metadata"]["name"])[0]
        victim_name, victim_ip = victim["metadata"]["name"], victim["status"]["podIP"]
        process = runner.find(ns, victim_name)
        assert process is not None and process.pid is not None
        stopped_at = time.monotonic()
        stopped_ips.add(victim_ip)
        load.refresh_targets()  # no request sent from now on goes to the victim
        os.killpg(process.pid, signal.SIGSTOP)
        event = wait_for(lambda: next((e for e in events_for(cp, ns, NAME) if e["reason"] == "WorkerUnresponsive"),
                                      None), 60, "a WorkerUnresponsive Event")
        marks["stalled worker detected"] = time.monotonic() - t0
        assert victim_name in event["message"] and event["type"] == "Warning", event
        detected = time.monotonic()
        assert detected - stopped_at >= 14  # UNRESPONSIVE_SECONDS of timeouts, not one slow scrape
        degraded = wait_for(lambda: (d := condition(get_isvc(cp, ns, NAME), "Degraded")).get("reason")
                            == "WorkerReplaced" and d, 10, "Degraded=WorkerReplaced")
        assert degraded["status"] == "True" and victim_name in degraded["message"]
        served = [r for r in load.since(stopped_at) if r.end <= detected and r.ip != victim_ip]
        assert len([r for r in served if r.ok]) >= 5 and all(r.ok for r in served), served[-5:]
        wait_for(lambda: len([p for p in worker_pods(cp, ns, NAME) if p["metadata"]["name"] != victim_name
                              and condition(p, "Ready").get("status") == "True"]) == 3, 120, "a ready replacement")
        marks["replacement ready"] = time.monotonic() - t0
        assert operator.metrics()[
            f'infergrid:health_pod_restarts_total{{namespace="{ns}",reason="Unresponsive",service="{NAME}"}}'] == 1

        # ---- load stops: back to minReplicas after the delay
        load.stop()
        wait_for(lambda: spec_replicas(cp, ns) == 1, 60, "scale-down to minReplicas")
        marks["back to 1"] = time.monotonic() - t0
        downs = wait_for(lambda: [m for r, m in scale_events(cp, ns) if r == "ScaledDown"], 10, "a ScaledDown Event")
        assert downs[-1].startswith("scaled down 3 -> 1 (low-load)"), downs
        wait_for(lambda: len(worker_pods(cp, ns, NAME)) == 1 and condition(get_isvc(cp, ns, NAME), "Degraded")
                 .get("status") == "False", 60, "one worker left, no longer degraded")

        # ---- minReplicas 0: to zero after the delay, visible in kubectl get and the Ready condition
        cp.kubectl("patch", "inferenceservice", NAME, "-n", ns, "--type=merge",
                   "-p", json.dumps({"spec": {"autoscaling": {"minReplicas": 0}}}))
        wait_for(lambda: (i := get_isvc(cp, ns, NAME)) and i["spec"]["replicas"] == 0
                 and condition(i, "Ready").get("reason") == "ScaledToZero", 60, "scaled to zero")
        marks["zero"] = time.monotonic() - t0
        zeros = wait_for(lambda: [m for r, m in scale_events(cp, ns) if r == "ScaledToZero"], 10, "a ScaledToZero Event")
        assert zeros[-1].startswith("scaled down 1 -> 0 (idle)"), zeros
        isvc = get_isvc(cp, ns, NAME)
        assert isvc["status"]["lastScaleReason"] == "idle" and condition(isvc, "Scaling")["reason"] == "ScaledToZero"
        wait_for(lambda: kubectl_row(cp, ns) == ["0", "0", "ScaledToZero"], 30, "kubectl get at zero")
        wait_for(lambda: not worker_pods(cp, ns, NAME), 60, "no worker pods")
        time.sleep(DELAY / 2)
        assert spec_replicas(cp, ns) == 0  # nothing wakes it by itself

        # ---- wake: the annotation brings one worker back, and a request succeeds
        cp.kubectl("annotate", "inferenceservice", NAME, "-n", ns, "infergrid.dev/wake=first", "--overwrite")
        woke = time.monotonic()
        wait_for(lambda: spec_replicas(cp, ns) == 1, 15, "woken up")
        isvc = wait_for(lambda: (i := get_isvc(cp, ns, NAME)) and i["status"].get("readyReplicas") == 1 and i,
                        120, "a ready worker after the wake")
        marks["woken and ready"] = time.monotonic() - t0
        assert isvc["status"]["lastWake"] == "first"
        wait_for(lambda: any(r == "WokenUp" for r, _ in scale_events(cp, ns)), 10, "a WokenUp Event")
        (ip,) = ready_pod_ips(cp.client, ns, selector)
        client = openai.OpenAI(base_url=f"http://{ip}:8000/v1", api_key="unused", max_retries=0, timeout=60,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        completion = client.completions.create(model=NAME, prompt="Hello", max_tokens=4)
        assert completion.choices[0].text and time.monotonic() - woke < 150
    finally:
        load.stop()
        print("phase timings (s since apply):", json.dumps({k: round(v, 1) for k, v in marks.items()}))
        print(cp.kubectl("get", "inferenceservices", "-n", ns, "-o", "wide", check=False).stdout)
        for reason, message in scale_events(cp, ns):
            print(f"event {reason}: {message}")
    status = get_isvc(cp, ns, NAME)["status"]
    decisions = {k: v for k, v in operator.metrics().items()  # every outcome's series exists, at 0 until it happens
                 if k.startswith("infergrid:autoscaler_decisions_total") and v > 0}
    assert any('direction="up"' in k for k in decisions) and any('direction="down"' in k for k in decisions)
    assert status["replicas"] == 1
