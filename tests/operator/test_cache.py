"""The watch cache: keyed by the owning service's labels, trimmed, and emptied by DELETED events."""

from operator_helpers import isvc_body

from infergrid.operator.cache import ServiceCache


def worker(kind_body: dict, name: str = "w-1") -> dict:
    return {"metadata": {"name": name, "namespace": "team-a",
                         "labels": {"infergrid.dev/inferenceservice": "llama"}}, **kind_body}


def test_services_are_stored_without_managed_fields_and_removed_on_delete():
    cache = ServiceCache()
    body = isvc_body()
    body["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    key = cache.update_service(None, body)
    assert key == ("team-a", "llama")
    assert "managedFields" not in cache.services[key]["metadata"]
    assert cache.services[key]["spec"] == body["spec"]
    body["spec"]["replicas"] = 9  # the cache holds a copy, not the caller's object
    assert "replicas" not in cache.services[key]["spec"]
    cache.update_service("DELETED", body)
    assert key not in cache.services


def test_deployments_and_pods_are_keyed_by_their_service_label():
    cache = ServiceCache()
    assert cache.update_deployment("ADDED", {"metadata": {"name": "x", "namespace": "n"}}) is None
    key = cache.update_deployment("ADDED", worker({"spec": {"replicas": 3}}, "llama-worker"))
    assert cache.current_replicas(key) == 3
    cache.update_pod("ADDED", worker({"status": {}}, "w-1"))
    cache.update_pod("MODIFIED", worker({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, "w-2"))
    assert sorted(cache.pods[key]) == ["w-1", "w-2"] and cache.pods[key]["w-2"].is_ready
    cache.update_pod("DELETED", worker({}, "w-1"))
    cache.update_pod("DELETED", worker({}, "w-2"))
    assert key not in cache.pods
    cache.update_deployment("DELETED", worker({}, "llama-worker"))
    assert cache.current_replicas(key) is None
