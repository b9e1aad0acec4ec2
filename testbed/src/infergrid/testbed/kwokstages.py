"""KWOK Stage objects for the test bed's fake nodes and pods.

Nodes use KWOK's default stages (initialize + heartbeat). Pods use ours, which leave the kubelet's
remaining jobs to the pod runner (:mod:`infergrid.testbed.podrunner`):

* ``pod-running`` — a scheduled pod gets phase Running, a pod IP from its node's podCIDR, and
  containerStatuses. It is Ready at once only when no container has a readinessProbe; otherwise
  Ready stays False until the pod runner (or a test, via ``ControlPlane.set_pod_ready``) probes it.
* ``pod-delete`` — a deleted pod no pod runner has claimed goes away at once.
* ``pod-delete-graceful`` — a claimed pod (annotation ``RUNNER_ANNOTATION``) is removed by KWOK only
  when its grace period ends; normally the runner stops the process first and then deletes the
  pod itself, as a kubelet does.
* ``pod-complete`` — unclaimed Job pods succeed (KWOK's default behaviour).
"""

from __future__ import annotations

RUNNER_ANNOTATION = "testbed.infergrid.dev/pod-runner"

_POD_RUNNING = """\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-running
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: '.metadata.deletionTimestamp', operator: DoesNotExist}
    - {key: '.status.podIP', operator: DoesNotExist}
  next:
    statusTemplate: |
      {{ $now := Now }}
      {{ $probed := false }}
      {{ range .spec.containers }}{{ if .readinessProbe }}{{ $probed = true }}{{ end }}{{ end }}
      {{ $ready := "True" }}{{ if $probed }}{{ $ready = "False" }}{{ end }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: PodScheduled
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: {{ $ready | Quote }}
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: {{ $ready | Quote }}
        type: ContainersReady
      {{ range .spec.readinessGates }}
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: {{ .conditionType | Quote }}
      {{ end }}
      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        imageID: ""
        name: {{ .name | Quote }}
        ready: {{ if .readinessProbe }}false{{ else }}true{{ end }}
        started: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}
      initContainerStatuses:
      {{ range .spec.initContainers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
      {{ end }}
      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
"""

_POD_DELETE = f"""\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - {{key: '.metadata.deletionTimestamp', operator: Exists}}
    - {{key: '.metadata.finalizers', operator: DoesNotExist}}
    - {{key: '.metadata.annotations["{RUNNER_ANNOTATION}"]', operator: DoesNotExist}}
  next:
    delete: true
"""

_POD_DELETE_GRACEFUL = f"""\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete-graceful
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - {{key: '.metadata.deletionTimestamp', operator: Exists}}
    - {{key: '.metadata.finalizers', operator: DoesNotExist}}
    - {{key: '.metadata.annotations["{RUNNER_ANNOTATION}"]', operator: Exists}}
  delay:
    durationMilliseconds: 0
    durationFrom: {{expressionFrom: '.metadata.deletionTimestamp'}}
  next:
    delete: true
"""

_POD_COMPLETE = f"""\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-complete
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - {{key: '.metadata.deletionTimestamp', operator: DoesNotExist}}
    - {{key: '.status.phase', operator: In, values: [Running]}}
    - {{key: '.metadata.ownerReferences.[].kind', operator: In, values: [Job]}}
    - {{key: '.metadata.annotations["{RUNNER_ANNOTATION}"]', operator: DoesNotExist}}
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - image: {{{{ .image | Quote }}}}
        name: {{{{ .name | Quote }}}}
        ready: false
        restartCount: 0
        started: false
        state:
          terminated:
            exitCode: 0
            finishedAt: {{{{ $now | Quote }}}}
            reason: Completed
            startedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      phase: Succeeded
"""


def kwok_config() -> str:
    """The multi-document KWOK config file: our pod stages (node stages stay KWOK's defaults)."""
    return "---\n".join([_POD_RUNNING, _POD_DELETE, _POD_DELETE_GRACEFUL, _POD_COMPLETE])
