"""The pure builders: InferenceService body -> child objects (no cluster)."""

import dataclasses

import pytest
from operator_helpers import container, flag_value, full_command, isvc_body

from infergrid.operator import constants as c
from infergrid.operator.builders import (
    build_children,
    build_client_service,
    build_network_policy,
    build_pod_disruption_budget,
    build_pod_monitor,
    build_router_deployment,
    build_router_network_policy,
    build_router_pod_monitor,
    build_worker_deployment,
    build_worker_headless_service,
    endpoint_url,
    selector_string,
)
from infergrid.operator.builders.router import build_router_role, build_router_role_binding
from infergrid.operator.config import OperatorConfig
from infergrid.operator.spec import ServiceSpec, desired_replicas

CONFIG = OperatorConfig(worker_image="registry.local/worker:test")


def spec_of(**kw):
    return ServiceSpec.from_body(isvc_body(**kw))


def deployment_of(current_replicas=None, **kw):
    return build_worker_deployment(spec_of(**kw), CONFIG, current_replicas)


def spec_hash(deployment):
    return deployment["spec"]["template"]["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]


# ---------------------------------------------------------------- children, names, ownership

def test_children_are_workers_and_router_all_owned_by_the_service():
    children = build_children(spec_of(), CONFIG)
    assert [(ch["kind"], ch["metadata"]["name"]) for ch in children] == [
        ("Service", "llama-workers"), ("Service", "llama"), ("PodDisruptionBudget", "llama-worker"),
        ("NetworkPolicy", "llama-worker"), ("NetworkPolicy", "llama-router"), ("ServiceAccount", "llama-router"),
        ("Role", "llama-router"), ("RoleBinding", "llama-router"), ("Deployment", "llama-router"),
        ("Deployment", "llama-worker"),
    ]
    for child in children:
        assert child["metadata"]["namespace"] == "team-a"
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "infergrid.dev/v1alpha1", "kind": "InferenceService", "name": "llama",
            "uid": "uid-llama", "controller": True, "blockOwnerDeletion": True,
        }]
        assert child["metadata"]["labels"][c.LABEL_MANAGED_BY] == "infergrid-operator"
        assert child["metadata"]["labels"][c.LABEL_ISVC] == "llama"


def test_pod_monitor_only_when_the_crd_exists():
    assert "PodMonitor" not in [ch["kind"] for ch in build_children(spec_of(), CONFIG)]
    names = [ch["metadata"]["name"] for ch in build_children(spec_of(), CONFIG, has_pod_monitor=True)
             if ch["kind"] == "PodMonitor"]
    assert names == ["llama-worker", "llama-router"]


def test_longest_valid_name_keeps_every_child_name_a_dns_label():
    name = "a" * 50  # the CRD's maxLength for metadata.name
    for child in build_children(spec_of(name=name), CONFIG, has_pod_monitor=True):
        assert len(child["metadata"]["name"]) <= 63


def test_selector_and_endpoint():
    spec = spec_of()
    assert selector_string(spec) == "infergrid.dev/inferenceservice=llama,app.kubernetes.io/component=worker"
    assert endpoint_url(spec) == "http://llama.team-a.svc:80"


# ---------------------------------------------------------------- worker Deployment

@pytest.mark.parametrize("tp", [1, 2, 8])
def test_gpu_request_and_limit_equal_tensor_parallel_size(tp):
    deployment = deployment_of(engine={"tensorParallelSize": tp})
    resources = container(deployment)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == str(tp)
    assert resources["limits"]["nvidia.com/gpu"] == str(tp)
    assert flag_value(full_command(deployment), "--tensor-parallel-size") == str(tp)


def test_gpu_resource_name_is_configurable_and_tolerated():
    deployment = deployment_of(engine={"tensorParallelSize": 2}, resources={"gpuResourceName": "amd.com/gpu",
                                                                            "cpu": "8", "memory": "64Gi"})
    resources = container(deployment)["resources"]
    assert resources == {"requests": {"amd.com/gpu": "2", "cpu": "8", "memory": "64Gi"},
                         "limits": {"amd.com/gpu": "2", "memory": "64Gi"}}
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_worker_command_line():
    argv = full_command(deployment_of(model={"source": "file:///models/tiny", "servedName": "tiny-chat"},
                                      engine={"maxModelLen": 512, "dtype": "float32"}))
    assert argv[:10] == ["infergrid-worker", "serve", "--model", "/models/tiny", "--host", "$(POD_IP)",
                         "--port", "8000", "--served-model-name", "tiny-chat"]
    assert flag_value(argv, "--max-model-len") == "512"
    assert flag_value(argv, "--dtype") == "float32"


def test_served_name_defaults_to_the_service_name():
    assert flag_value(full_command(deployment_of()), "--served-model-name") == "llama"


def test_pod_ip_comes_from_the_downward_api():
    env = {e["name"]: e for e in container(deployment_of())["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_file_source_is_a_host_path_passed_directly():
    deployment = deployment_of(model={"source": "file:///models/tiny"})
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "model-host", "hostPath": {"path": "/models/tiny", "type": "Directory"}} in pod["volumes"]
    assert {"name": "model-host", "mountPath": "/models/tiny", "readOnly": True} in container(deployment)["volumeMounts"]
    assert "initContainers" not in pod


def test_workers_convert_gguf_sources_into_their_writable_tmp():
    deployment = deployment_of(model={"source": "file:///models/smollm2.gguf"})
    assert {"name": "model-host", "hostPath": {"path": "/models/smollm2.gguf", "type": "File"}} in \
        deployment["spec"]["template"]["spec"]["volumes"]
    worker = container(deployment)
    assert flag_value(full_command(deployment), "--model-cache-dir") == "/tmp/infergrid-models"
    assert {"name": "tmp", "mountPath": "/tmp"} in worker["volumeMounts"]
    assert flag_value(full_command(deployment), "--model") == "/models/smollm2.gguf"


def test_pvc_source_mounts_the_claim():
    deployment = deployment_of(model={"source": "pvc://weights/llama-3"})
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "model-pvc", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert flag_value(full_command(deployment), "--model") == "/mnt/model/llama-3"


def test_hf_source_downloads_into_an_empty_dir_cache_with_the_token_by_reference():
    deployment = deployment_of(model={"source": "hf://org/m", "revision": "v1",
                                      "tokenSecretRef": {"name": "hf-token", "key": "tok"}})
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == "download-model"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "tok"}}} in init["env"]
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]
    worker = container(deployment)
    assert {"name": "model-cache", "mountPath": "/model-cache", "readOnly": True} in worker["volumeMounts"]
    assert flag_value(full_command(deployment), "--model") == "/model-cache/model"
    # The serving container never sees the token; it loads offline from the cache.
    assert all(e["name"] != "HF_TOKEN" for e in worker["env"])
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in worker["env"]


def test_draft_model_gets_its_own_mount_and_flag():
    deployment = deployment_of(model={"source": "hf://org/big"}, engine={"speculative": {
        "method": "draft", "numTokens": 4, "draft": {"model": {"source": "hf://org/small"}}}})
    inits = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [i["name"] for i in inits] == ["download-model", "download-draft"]
    argv = full_command(deployment)
    assert flag_value(argv, "--draft-model") == "/model-cache/draft"
    assert flag_value(argv, "--speculative-method") == "draft"
    assert flag_value(argv, "--num-speculative-tokens") == "4"
    assert "--draft-lm-head-dtype" not in argv
    fp8 = deployment_of(model={"source": "hf://org/big"}, engine={"speculative": {
        "method": "draft", "draft": {"model": {"source": "hf://org/small"}, "lmHeadDtype": "fp8"}}})
    assert flag_value(full_command(fp8), "--draft-lm-head-dtype") == "fp8"



def test_a_speculative_method_alone_proposes_the_default_4_tokens():
    argv = full_command(deployment_of(engine={"speculative": {"method": "ngram"}}))
    assert flag_value(argv, "--speculative-method") == "ngram"
    assert flag_value(argv, "--num-speculative-tokens") == "4"


def test_speculative_method_none_adds_no_speculative_flags():
    argv = full_command(deployment_of(engine={"speculative": {"method": "none"}}))
    assert not any(arg.startswith(("--speculative", "--num-speculative", "--draft")) for arg in argv)

def test_probes_are_sized_for_slow_model_loads():
    worker = container(deployment_of(timeouts={"startupSeconds": 1800}))
    startup = worker["startupProbe"]
    assert startup["httpGet"] == {"path": "/ready", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert worker["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/health"
    # Liveness must not kill a pod that is merely busy: a minute of failures at least.
    assert worker["livenessProbe"]["periodSeconds"] * worker["livenessProbe"]["failureThreshold"] >= 60


def test_grace_period_covers_pre_stop_and_drain():
    deployment = deployment_of(timeouts={"drainSeconds": 120})
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = container(deployment)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 120
    assert flag_value(full_command(deployment), "--drain-timeout") == "120"


def test_security_context_meets_pod_security_restricted():
    deployment = deployment_of(model={"source": "hf://org/m"})
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for ctr in [*pod["containers"], *pod["initContainers"]]:
        sc = ctr["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["readOnlyRootFilesystem"] is True


def test_shm_is_an_in_memory_empty_dir():
    deployment = deployment_of(resources={"shmSize": "8Gi"})
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(deployment)["volumeMounts"]


def test_image_from_spec_overrides_the_operator_default():
    assert container(deployment_of())["image"] == "registry.local/worker:test"
    assert container(deployment_of(image="mine:2", imagePullPolicy="Always"))["imagePullPolicy"] == "Always"
    assert container(deployment_of(image="mine:2"))["image"] == "mine:2"


def test_scheduling_fields_pass_through():
    deployment = deployment_of(nodeSelector={"gpu": "h100"}, priorityClassName="high",
                               tolerations=[{"key": "dedicated", "operator": "Exists"}],
                               affinity={"nodeAffinity": {"x": 1}}, imagePullSecrets=[{"name": "reg"}])
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["priorityClassName"] == "high"
    assert {"key": "dedicated", "operator": "Exists"} in pod["tolerations"]
    assert pod["affinity"] == {"nodeAffinity": {"x": 1}}
    assert pod["imagePullSecrets"] == [{"name": "reg"}]


def test_pod_template_overrides_merge_by_name_and_cannot_change_the_selector():
    deployment = deployment_of(podTemplate={
        "metadata": {"labels": {"team": "a", c.LABEL_ISVC: "hijack"}, "annotations": {"x": "y"}},
        "spec": {"serviceAccountName": "reader",
                 "containers": [{"name": "worker", "env": [{"name": "EXTRA", "value": "1"}]},
                                {"name": "sidecar", "image": "busybox"}]},
    })
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "a"
    assert template["metadata"]["labels"][c.LABEL_ISVC] == "llama"
    assert template["metadata"]["annotations"]["x"] == "y"
    assert template["spec"]["serviceAccountName"] == "reader"
    names = [ctr["name"] for ctr in template["spec"]["containers"]]
    assert names == ["worker", "sidecar"]
    env = {e["name"] for e in container(deployment)["env"]}
    assert {"EXTRA", "POD_IP"} <= env


def test_spec_hash_changes_with_the_pod_spec_but_not_with_replicas():
    base = spec_hash(deployment_of(replicas=1))
    assert spec_hash(deployment_of(replicas=5)) == base
    assert spec_hash(deployment_of(replicas=1)) == base  # deterministic
    assert spec_hash(deployment_of(engine={"maxNumSeqs": 8})) != base
    assert spec_hash(deployment_of(image="other:1")) != base
    deployment = deployment_of()
    assert deployment["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH] == spec_hash(deployment)


def test_rollout_surges_instead_of_dropping_a_serving_worker():
    deployment = deployment_of(timeouts={"startupSeconds": 600})
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert deployment["spec"]["progressDeadlineSeconds"] > 600


@pytest.mark.parametrize(("spec", "current", "expected"), [
    ({}, None, 1),
    ({"replicas": 3}, 7, 3),
    ({"replicas": 0}, None, 0),
    ({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, None, 2),
    ({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, 4, 4),
    ({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, 9, 5),
    ({"autoscaling": {"minReplicas": 0, "maxReplicas": 5}}, 0, 0),
    ({"autoscaling": {"minReplicas": 0, "maxReplicas": 5}}, None, 1),  # a new service comes up once
    # spec.replicas is the autoscaler's choice (over the Deployment's size), kept within bounds
    ({"replicas": 3, "autoscaling": {"minReplicas": 0, "maxReplicas": 5}}, 1, 3),
    ({"replicas": 0, "autoscaling": {"minReplicas": 0, "maxReplicas": 5}}, 2, 0),
    ({"replicas": 9, "autoscaling": {"minReplicas": 1, "maxReplicas": 5}}, 2, 5),
    ({"replicas": 0, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, 2, 2),
])
def test_replicas_fixed_or_kept_within_autoscaling_bounds(spec, current, expected):
    assert desired_replicas(spec_of(**spec), current) == expected
    assert deployment_of(current, **spec)["spec"]["replicas"] == expected


# ---------------------------------------------------------------- Services, PDB, NetworkPolicy, PodMonitor

def test_headless_service_selects_workers():
    svc = build_worker_headless_service(spec_of())
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {c.LABEL_ISVC: "llama", c.LABEL_COMPONENT: "worker"}
    assert svc["spec"]["ports"][0]["port"] == 8000


def test_every_child_kind_is_one_the_api_client_can_write():
    from infergrid.operator.kube import RESOURCES

    children = build_children(spec_of(), CONFIG, has_pod_monitor=True)
    assert {ch["kind"] for ch in children} <= set(RESOURCES)


def test_client_service_selects_the_router_pods():
    svc = build_client_service(spec_of())
    assert svc["metadata"]["name"] == "llama"
    assert svc["spec"]["selector"] == {c.LABEL_ISVC: "llama", c.LABEL_COMPONENT: "router"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]


def test_pdb_allows_one_worker_down():
    pdb = build_pod_disruption_budget(spec_of())
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {c.LABEL_ISVC: "llama", c.LABEL_COMPONENT: "worker"}


def test_network_policy_admits_router_and_prometheus_only():
    config = dataclasses.replace(CONFIG, prometheus_pod_labels={"app": "prom"},
                                 prometheus_namespace_labels={"team": "monitoring"})
    policy = build_network_policy(spec_of(), config)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {c.LABEL_ISVC: "llama", c.LABEL_COMPONENT: "router"}}},
        {"podSelector": {"matchLabels": {"app": "prom"}},
         "namespaceSelector": {"matchLabels": {"team": "monitoring"}}},
    ]


def test_network_policy_admits_the_operator_when_the_chart_names_it():
    config = dataclasses.replace(CONFIG, operator_pod_labels={"app.kubernetes.io/component": "operator"},
                                 operator_namespace="infergrid-system")
    (rule,) = build_network_policy(spec_of(), config)["spec"]["ingress"]
    assert rule["from"][-1] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "infergrid-system"}}}


def test_router_network_policy_admits_any_client_on_the_router_port_only():
    policy = build_router_network_policy(spec_of())
    assert policy["spec"]["podSelector"]["matchLabels"] == {c.LABEL_ISVC: "llama", c.LABEL_COMPONENT: "router"}
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]  # no `from`: any source


def test_router_deployment_runs_infergrid_router_for_this_service():
    spec = spec_of(router={"replicas": 2, "policy": "least-load", "apiKeySecretRef": {"name": "keys", "key": "k"}})
    deploy = build_router_deployment(spec, CONFIG)
    assert deploy["metadata"]["name"] == "llama-router"
    assert deploy["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["selector"]["matchLabels"] == {c.LABEL_ISVC: "llama", c.LABEL_COMPONENT: "router"}
    pod = deploy["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["image"] == CONFIG.router_image
    argv = ctr["command"] + ctr["args"]
    assert argv[0] == "infergrid-router"
    assert flag_value(argv, "--service") == "llama"
    assert flag_value(argv, "--workers-service") == "llama-workers"
    assert flag_value(argv, "--policy") == "least-load"
    assert flag_value(argv, "--api-key-file") == "/etc/infergrid/api-keys/k"
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {"secretName": "keys", "items": [{"key": "k", "path": "k"}]}
    assert pod["serviceAccountName"] == "llama-router"
    assert ctr["securityContext"]["runAsNonRoot"] is True
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True


def test_router_defaults_one_replica_prefix_aware_no_keys():
    deploy = build_router_deployment(spec_of(), CONFIG)
    ctr = deploy["spec"]["template"]["spec"]["containers"][0]
    assert deploy["spec"]["replicas"] == 1
    assert flag_value(ctr["args"], "--policy") == "prefix-aware"
    assert "--api-key-file" not in ctr["args"]


def test_router_rolls_when_its_spec_changes_and_not_for_worker_only_changes():
    def router_hash(**kw: object) -> str:
        return build_router_deployment(spec_of(**kw), CONFIG)["metadata"]["annotations"][c.ANNOTATION_SPEC_HASH]

    assert router_hash() == router_hash(engine={"maxNumSeqs": 7})
    assert router_hash() != router_hash(router={"policy": "round-robin"})


def test_router_role_reads_endpointslices_only():
    (rule,) = build_router_role(spec_of())["rules"]
    assert rule == {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"]}
    binding = build_router_role_binding(spec_of())
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama-router", "namespace": "team-a"}]


def test_pod_monitor_scrapes_worker_metrics():
    monitor = build_pod_monitor(spec_of())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    # the dashboards' and alerts' `service` label is the InferenceService's name
    assert monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["targetLabel"] == "service"


def test_router_pod_monitor_selects_the_router_pods_port_http():
    monitor = build_router_pod_monitor(spec_of())
    assert monitor["kind"] == "PodMonitor" and monitor["metadata"]["name"] == "llama-router"
    assert monitor["spec"]["selector"]["matchLabels"] == {c.LABEL_ISVC: "llama", c.LABEL_COMPONENT: "router"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_label_infergrid_dev_inferenceservice"],
                                        "targetLabel": "service"}]
    assert monitor["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"


def test_unknown_source_scheme_is_a_value_error():
    with pytest.raises(ValueError):
        spec_of(model={"source": "s3://x/y"})
