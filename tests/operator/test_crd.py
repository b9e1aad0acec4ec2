"""The InferenceService CRD file: structure, subresources, defaults in step with the operator, chart copy."""

from operator_helpers import CHART, CRD_PATH, crd_schema, isvc_body, load_crd

from infergrid.operator import constants as c
from infergrid.operator.spec import ServiceSpec


def walk(schema, path=""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def node(path):
    schema = crd_schema()
    for part in path.split("."):
        schema = schema["properties"][part]
    return schema


def test_chart_carries_an_identical_copy():
    assert (CHART / "crds" / CRD_PATH.name).read_bytes() == CRD_PATH.read_bytes()


def test_names_and_single_served_version():
    crd = load_crd()
    assert crd["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    assert crd["spec"]["names"]["kind"] == c.KIND
    assert [v["name"] for v in crd["spec"]["versions"]] == [c.VERSION]
    assert crd["spec"]["versions"][0]["storage"] and crd["spec"]["versions"][0]["served"]


def test_short_name_is_our_own():
    """KServe's InferenceService has the same plural and the short name `isvc`: ours must differ."""
    names = load_crd()["spec"]["names"]
    assert names["shortNames"] == ["igs"]
    assert names["plural"] == c.PLURAL  # so docs name it inferenceservices.infergrid.dev where it matters


def test_printer_columns():
    columns = load_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    visible = [col["name"].upper() for col in columns if not col.get("priority")]
    assert visible == ["MODEL", "REPLICAS", "READY", "ENDPOINT", "AGE"]


def test_status_and_scale_subresources():
    sub = load_crd()["spec"]["versions"][0]["subresources"]
    assert sub["status"] == {}
    assert sub["scale"] == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector"}


def test_schema_is_structural():
    for path, schema in walk(crd_schema()):
        has_type = "type" in schema or schema.get("x-kubernetes-int-or-string")
        assert has_type, f"{path or '<root>'} has no type"
        if schema.get("type") == "object" and path not in ("", "metadata"):
            assert "properties" in schema or "additionalProperties" in schema \
                or schema.get("x-kubernetes-preserve-unknown-fields"), f"{path} is an untyped object"


def test_every_cel_rule_has_a_message_naming_a_field():
    rules = [(path, rule) for path, schema in walk(crd_schema())
             for rule in schema.get("x-kubernetes-validations", [])]
    assert len(rules) >= 10
    for path, rule in rules:
        assert rule["message"].startswith("spec."), (path, rule)


def test_crd_defaults_match_the_operator_defaults():
    spec = ServiceSpec.from_body(isvc_body())
    engine, resources = spec.engine, spec.resources
    expected = {
        "spec.engine.dtype": engine.dtype,
        "spec.engine.maxNumSeqs": engine.max_num_seqs,
        "spec.engine.gpuMemoryUtilization": engine.gpu_memory_utilization,
        "spec.engine.tensorParallelSize": engine.tensor_parallel_size,
        "spec.engine.prefixCaching.enabled": engine.enable_prefix_caching,
        "spec.engine.speculative.method": engine.speculative.method,
        "spec.resources.gpuResourceName": resources.gpu_resource_name,
        "spec.resources.shmSize": resources.shm_size,
        "spec.timeouts.startupSeconds": spec.startup_seconds,
        "spec.timeouts.drainSeconds": spec.drain_seconds,
        "spec.model.tokenSecretRef.key": "token",
    }
    for path, value in expected.items():
        assert node(path)["default"] == value, path
    # NOTE: no CRD default for numTokens (a CEL rule refuses it with method none); the operator's is 4.
    assert "default" not in node("spec.engine.speculative.numTokens")
    assert engine.speculative.num_tokens == 4
    assert "default" not in node("spec.engine.speculative.disableByBatchSize")  # (the worker's default)
    assert node("spec.engine.speculative.disableByBatchSize")["minimum"] == 1
    assert engine.speculative.disable_by_batch_size is None
    tuned = ServiceSpec.from_body(isvc_body(engine={"speculative": {"method": "ngram", "disableByBatchSize": 8}}))
    assert tuned.engine.speculative.disable_by_batch_size == 8
    scaled = ServiceSpec.from_body(isvc_body(autoscaling={"maxReplicas": 4})).autoscaling
    assert node("spec.autoscaling.minReplicas")["default"] == scaled.min_replicas
    assert node("spec.autoscaling.targetQueueDepth")["default"] == scaled.target_queue_depth
    assert node("spec.autoscaling.targetKVCacheUsage")["default"] == scaled.target_kv_cache_usage
    assert node("spec.autoscaling.scaleDownDelaySeconds")["default"] == scaled.scale_down_delay_seconds


def test_status_has_what_the_scale_subresource_and_printer_columns_read():
    status = node("status")["properties"]
    for key in ("replicas", "readyReplicas", "selector", "endpoint", "observedGeneration", "conditions"):
        assert key in status
    condition = status["conditions"]["items"]["properties"]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(condition)
