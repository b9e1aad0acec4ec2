"""Invalid InferenceServices are refused by the real API server at apply time, naming the field."""

import json

import pytest
from operator_helpers import REPO

from infergrid.operator.spec import ServiceSpec

VALID = {"model": {"source": "hf://meta-llama/Llama-3.2-1B"}}

INVALID = [
    # (id, spec or full-doc patch, text the error must contain)
    ("missing-model-source", {"model": {"revision": "main"}}, "spec.model.source"),
    ("missing-model", {"replicas": 1}, "spec.model"),
    ("negative-replicas", {**VALID, "replicas": -1}, "spec.replicas"),
    ("tp-not-power-of-two", {**VALID, "engine": {"tensorParallelSize": 3}}, "spec.engine.tensorParallelSize"),
    ("tp-zero", {**VALID, "engine": {"tensorParallelSize": 0}}, "spec.engine.tensorParallelSize"),
    ("unknown-scheme", {"model": {"source": "s3://bucket/llama"}}, "spec.model.source"),
    ("hf-without-repo", {"model": {"source": "hf://"}}, "spec.model.source"),
    ("pvc-bad-claim", {"model": {"source": "pvc://Bad_Claim/llama"}}, "spec.model.source"),
    ("file-relative", {"model": {"source": "file://models/llama"}}, "spec.model.source"),
    ("min-above-max", {**VALID, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas"),
    ("max-zero", {**VALID, "autoscaling": {"maxReplicas": 0}}, "spec.autoscaling.maxReplicas"),
    ("gpu-mem-above-one", {**VALID, "engine": {"gpuMemoryUtilization": 1.5}}, "spec.engine.gpuMemoryUtilization"),
    ("unknown-dtype", {**VALID, "engine": {"dtype": "int3"}}, "spec.engine.dtype"),
    ("draft-without-model", {**VALID, "engine": {"speculative": {"method": "draft"}}},
     "spec.engine.speculative"),
    ("draft-with-empty-draft", {**VALID, "engine": {"speculative": {"method": "draft", "draft": {}}}},
     "spec.engine.speculative.draft.model"),
    ("num-tokens-above-16", {**VALID, "engine": {"speculative": {"method": "ngram", "numTokens": 17}}},
     "spec.engine.speculative.numTokens"),
    ("unknown-router-policy", {**VALID, "router": {"policy": "random"}}, "spec.router.policy"),
    ("kv-target-above-one", {**VALID, "autoscaling": {"maxReplicas": 2, "targetKVCacheUsage": 2}},
     "spec.autoscaling.targetKVCacheUsage"),
    ("bad-gpu-resource-name", {**VALID, "resources": {"gpuResourceName": "gpu"}}, "spec.resources.gpuResourceName"),
    ("tiny-max-model-len", {**VALID, "engine": {"maxModelLen": 0}}, "spec.engine.maxModelLen"),
    ("revision-on-file-source", {"model": {"source": "file:///models/x", "revision": "main"}},
     "spec.model.revision"),
    ("draft-unknown-scheme", {**VALID, "engine": {"speculative": {
        "method": "draft", "draft": {"model": {"source": "ftp://x/y"}}}}},
     "spec.engine.speculative.draft.model.source"),
    ("draft-head-int4", {**VALID, "engine": {"speculative": {
        "method": "draft", "draft": {"model": {"source": "hf://org/small"}, "lmHeadDtype": "int4"}}}},
     "spec.engine.speculative.draft.lmHeadDtype"),
    ("typo-field", {**VALID, "replcas": 2}, "spec.replcas"),
    # fields that would otherwise be accepted and ignored
    ("num-tokens-without-method", {**VALID, "engine": {"speculative": {"numTokens": 8}}},
     "spec.engine.speculative.numTokens"),
    ("disable-by-batch-size-zero", {**VALID, "engine": {"speculative": {"method": "ngram", "disableByBatchSize": 0}}},
     "spec.engine.speculative.disableByBatchSize"),
    ("disable-by-batch-size-without-method", {**VALID, "engine": {"speculative": {"disableByBatchSize": 8}}},
     "spec.engine.speculative.disableByBatchSize"),
    ("num-tokens-with-method-none", {**VALID, "engine": {"speculative": {"method": "none", "numTokens": 8}}},
     "spec.engine.speculative.numTokens"),
    ("draft-revision-on-file-source", {**VALID, "engine": {"speculative": {
        "method": "draft", "draft": {"model": {"source": "file:///models/small", "revision": "main"}}}}},
     "spec.engine.speculative.draft.model.revision"),
    ("bad-cpu-quantity", {**VALID, "resources": {"cpu": "lots"}}, "spec.resources.cpu"),
]


def apply(control_plane, namespace, name, spec):
    doc = {"apiVersion": "infergrid.dev/v1alpha1", "kind": "InferenceService",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    return control_plane.kubectl("apply", "-f", "-", input=json.dumps(doc), check=False)


@pytest.mark.parametrize(("spec", "field"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_spec_is_refused_naming_the_field(infergrid_crds, k8s_namespace, spec, field):
    result = apply(infergrid_crds, k8s_namespace, "bad", spec)
    assert result.returncode != 0, f"accepted: {spec}"
    assert field in result.stderr, result.stderr
    assert infergrid_crds.kubectl("get", "inferenceservices", "-n", k8s_namespace, "-o", "name").stdout == ""


@pytest.mark.parametrize("name", ["9starts-with-digit", "x" * 51])
def test_invalid_name_is_refused(infergrid_crds, k8s_namespace, name):
    result = apply(infergrid_crds, k8s_namespace, name, VALID)
    assert result.returncode != 0 and "metadata.name" in result.stderr, result.stderr


def test_valid_spec_is_defaulted_by_the_server(infergrid_crds, k8s_namespace):
    assert apply(infergrid_crds, k8s_namespace, "ok", {**VALID, "autoscaling": {"maxReplicas": 3}}).returncode == 0
    stored = json.loads(infergrid_crds.kubectl("get", "inferenceservice/ok", "-n", k8s_namespace, "-o", "json").stdout)
    spec = stored["spec"]
    assert spec["engine"]["tensorParallelSize"] == 1
    assert spec["engine"]["prefixCaching"] == {"enabled": True}
    assert spec["autoscaling"]["minReplicas"] == 1
    assert spec["resources"]["gpuResourceName"] == "nvidia.com/gpu"


def test_replicas_with_autoscaling_is_the_autoscalers_choice_and_kubectl_scale_writes_it(
        infergrid_crds, k8s_namespace):
    spec = {**VALID, "replicas": 2, "autoscaling": {"minReplicas": 0, "maxReplicas": 4}}
    assert apply(infergrid_crds, k8s_namespace, "scaled", spec).returncode == 0
    infergrid_crds.kubectl("scale", "inferenceservice/scaled", "-n", k8s_namespace, "--replicas=3")
    stored = json.loads(infergrid_crds.kubectl("get", "inferenceservice/scaled", "-n", k8s_namespace,
                                               "-o", "json").stdout)
    assert stored["spec"]["replicas"] == 3 and stored["spec"]["autoscaling"]["maxReplicas"] == 4


def test_a_speculative_method_alone_is_stored_without_a_token_count(infergrid_crds, k8s_namespace):
    """numTokens has no server default (it would defeat the rule refusing it with method none): the operator's 4."""
    assert apply(infergrid_crds, k8s_namespace, "spec", {
        **VALID, "engine": {"speculative": {"method": "ngram"}}}).returncode == 0
    assert apply(infergrid_crds, k8s_namespace, "plain", VALID).returncode == 0
    for name, method in (("spec", "ngram"), ("plain", "none")):
        stored = json.loads(infergrid_crds.kubectl("get", f"inferenceservice/{name}", "-n", k8s_namespace,
                                                   "-o", "json").stdout)
        assert stored["spec"]["engine"]["speculative"] == {"method": method}
        assert ServiceSpec.from_body(stored).engine.speculative.num_tokens == 4


def test_the_example_is_valid(infergrid_crds, k8s_namespace):
    result = infergrid_crds.kubectl("apply", "--dry-run=server", "-n", k8s_namespace, "-f",
                                    str(REPO / "examples" / "tiny.yaml"))
    assert "created (server dry run)" in result.stdout


@pytest.mark.parametrize("source", ["file:///models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "pvc://weights/q/x.gguf"])
def test_a_gguf_file_is_a_valid_source(infergrid_crds, k8s_namespace, source):
    result = infergrid_crds.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input=json.dumps({
        "apiVersion": "infergrid.dev/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "gguf", "namespace": k8s_namespace}, "spec": {"model": {"source": source}}}))
    assert result.returncode == 0 and "created (server dry run)" in result.stdout, result.stderr
