"""The worker image serves a tiny model on 127.0.0.1 and the official `openai` client gets a completion,
with the image running as the pods run it: non-root, read-only root filesystem, no capabilities."""

import time

import httpx
import openai
import pytest
from image_helpers import docker, is_semver, labels_of, user_of

from infergrid.testbed.procs import free_port

pytestmark = pytest.mark.images

READY_TIMEOUT = 300  # torch import + model load in a container on a loaded 2-core machine


def wait_ready(port: int, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", docker("logs", "--tail", "40", name, check=False).stderr
        time.sleep(1)
    pytest.fail(f"the worker container was not ready in {READY_TIMEOUT}s", pytrace=False)


def test_worker_image_metadata(images):
    labels = labels_of(images.worker)
    assert labels["org.opencontainers.image.version"] == images.version and is_semver(images.version)
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert user_of(images.worker) == "1000:1000"  # the chart's worker.runAsUser default
    entrypoint = docker("image", "inspect", "--format", "{{json .Config.Entrypoint}}", images.worker).stdout
    assert entrypoint.strip() == '["infergrid-worker","serve"]'


def test_worker_image_serves_a_completion_to_the_openai_client(images, tiny_model, containers):
    port = free_port()
    name = containers(
        "--network", "host", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "-v", f"{tiny_model}:/models/model:ro",
        images.worker, "--model", "/models/model", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "256", "--drain-timeout", "5")
    wait_ready(port, name)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 8
    assert isinstance(completion.choices[0].text, str) and completion.choices[0].text
    # SIGTERM drains and exits 0 (what a pod's termination does).
    docker("stop", "--time", "30", name)
    assert docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
