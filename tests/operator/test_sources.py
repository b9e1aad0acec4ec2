"""Model source parsing and how each scheme reaches the worker's filesystem."""

import pytest

from infergrid.operator.sources import ModelSource, plan_model_mount

SECURITY = {"runAsNonRoot": True}


@pytest.mark.parametrize(("source", "scheme", "path", "claim"), [
    ("hf://meta-llama/Llama-3.2-1B", "hf", "meta-llama/Llama-3.2-1B", None),
    ("hf://gpt2", "hf", "gpt2", None),
    ("pvc://models/llama/3b", "pvc", "llama/3b", "models"),
    ("pvc://models", "pvc", "", "models"),
    ("file:///models/tiny", "file", "/models/tiny", None),
    ("file:///models/tiny/", "file", "/models/tiny", None),
])
def test_parse_valid_sources(source, scheme, path, claim):
    parsed = ModelSource.parse(source)
    assert (parsed.scheme, parsed.path, parsed.claim) == (scheme, path, claim)


@pytest.mark.parametrize("source", [
    "s3://bucket/model", "hf://", "hf://a/b/c", "pvc://Bad_Claim/x", "file://relative/x",
    "file:///models/../etc", "/models/x", "",
])
def test_parse_rejects_what_the_crd_rejects(source):
    with pytest.raises(ValueError):
        ModelSource.parse(source)


def test_file_source_mounts_host_path_read_only_at_the_same_path():
    mount = plan_model_mount(ModelSource.parse("file:///data/m"), "model", image="img", image_pull_policy=None,
                             security_context=SECURITY, token_env=[])
    assert mount.path == "/data/m"
    assert mount.volumes == ({"name": "model-host", "hostPath": {"path": "/data/m", "type": "Directory"}},)
    assert mount.mounts == ({"name": "model-host", "mountPath": "/data/m", "readOnly": True},)
    assert mount.init_containers == ()


def test_pvc_source_mounts_the_claim_read_only_and_points_into_it():
    mount = plan_model_mount(ModelSource.parse("pvc://weights/llama/8b"), "draft", image="img",
                             image_pull_policy=None, security_context=SECURITY, token_env=[])
    assert mount.path == "/mnt/draft/llama/8b"
    assert mount.volumes[0]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert mount.mounts[0] == {"name": "draft-pvc", "mountPath": "/mnt/draft", "readOnly": True}


def test_hf_source_downloads_in_an_init_container_with_the_token_from_a_secret():
    token_env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    mount = plan_model_mount(ModelSource.parse("hf://org/model", revision="abc123"), "model", image="img:1",
                             image_pull_policy="IfNotPresent", security_context=SECURITY, token_env=token_env)
    (init,) = mount.init_containers
    assert mount.path == "/model-cache/model"
    assert init["command"] == ["hf", "download", "org/model", "--local-dir", "/model-cache/model",
                               "--revision", "abc123"]
    assert init["image"] == "img:1" and init["imagePullPolicy"] == "IfNotPresent"
    assert token_env[0] in init["env"]
    assert init["securityContext"] == SECURITY
    assert {"name": "model-cache", "mountPath": "/model-cache"} in init["volumeMounts"]


def test_a_gguf_file_source_is_a_host_path_of_type_file():
    source = ModelSource.parse("file:///models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.is_gguf_file
    mount = plan_model_mount(source, "model", image="img", image_pull_policy=None, security_context=SECURITY,
                             token_env=[])
    assert mount.path == "/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert mount.volumes == ({"name": "model-host", "hostPath": {"path": mount.path, "type": "File"}},)
    assert not ModelSource.parse("pvc://weights/gguf-models").is_gguf_file
    assert ModelSource.parse("pvc://weights/m/x.gguf").is_gguf_file
