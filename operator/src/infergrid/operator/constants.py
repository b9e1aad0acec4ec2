"""Names shared by the CRD, the builders, the handlers and the chart."""

GROUP = "infergrid.dev"
VERSION = "v1alpha1"
PLURAL = "inferenceservices"
KIND = "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"

FIELD_MANAGER = "infergrid-operator"

# Labels on every child object (and on the worker pods).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_ISVC = "infergrid.dev/inferenceservice"

APP_NAME = "infergrid"
MANAGED_BY = "infergrid-operator"
COMPONENT_WORKER = "worker"
COMPONENT_ROUTER = "router"

# NOTE: the pod-template annotation whose change rolls the worker Deployment.
ANNOTATION_SPEC_HASH = "infergrid.dev/spec-hash"

# An explicit wake from zero: any change of its value asks the autoscaler for a replica (and restarts the
# idle timer); `kubectl annotate isvc NAME infergrid.dev/wake="$(date +%s)" --overwrite`.
ANNOTATION_WAKE = "infergrid.dev/wake"

WORKER_PORT = 8000
WORKER_PORT_NAME = "http"
ROUTER_PORT = 8080
ROUTER_PORT_NAME = "http"
SERVICE_PORT = 80

# Where the router pod mounts the Secret named by spec.router.apiKeySecretRef (the operator never reads it).
API_KEYS_MOUNT_PATH = "/etc/infergrid/api-keys"

# How long the preStop hook waits so endpoints drop the pod before SIGTERM reaches the worker.
PRESTOP_SLEEP_SECONDS = 5
