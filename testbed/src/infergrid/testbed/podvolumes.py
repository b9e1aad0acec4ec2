"""What a kubelet mounts into a container, for processes that run on the host: Secret and ConfigMap
volumes, and the pod's service-account credentials.

Pods here are local processes without a mount namespace, so a volume cannot appear at its
`mountPath`. Instead each Secret/ConfigMap volume is written under the pod's directory and every
argument or env value that starts with a mount path is rewritten to that directory::

    mountPath /etc/infergrid/api-keys  ->  <pod dir>/volumes/api-keys
    --api-key-file /etc/infergrid/api-keys/keys  ->  --api-key-file <pod dir>/volumes/api-keys/keys

Like the kubelet, the files are refreshed while the pod runs (files replaced atomically), so a
rotated Secret reaches the process without a restart. Service-account credentials are a kubeconfig
(a TokenRequest token bound to the pod, the API server's CA) passed as KUBECONFIG: the process gets
exactly its ServiceAccount's RBAC rights, as in a real cluster.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from infergrid.testbed.kubeapi import ApiError, KubeClient
from infergrid.testbed.podexec import PodSpecError

#: Lifetime asked for service-account tokens (the pod runner renews them at half-life).
TOKEN_SECONDS = 3600


def volume_files(pod: Mapping[str, Any], volume: Mapping[str, Any], client: KubeClient) -> dict[str, bytes] | None:
    """The files of one Secret or ConfigMap volume (relative path -> bytes); None for other volume kinds."""
    ns = pod["metadata"]["namespace"]
    for kind, name_key in (("secret", "secretName"), ("configMap", "name")):
        source = volume.get(kind)
        if source is None:
            continue
        name = source.get(name_key, "")
        obj = client.get(f"/api/v1/namespaces/{ns}/{kind.lower()}s/{name}", ok_missing=True)
        if obj is None:
            if source.get("optional"):
                return {}
            raise PodSpecError(f"{kind} {ns}/{name} (volume {volume['name']!r}) not found")
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} if kind == "secret" \
            else {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        items = source.get("items")
        if not items:
            return data
        files = {}
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise PodSpecError(f"{kind} {ns}/{name} has no key {item['key']!r} (volume {volume['name']!r})")
            files[item["path"]] = data[item["key"]]
        return files
    return None


def write_files(root: Path, files: Mapping[str, bytes]) -> None:
    """Make `root` hold exactly `files`, each replaced atomically (a reader never sees half a file)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.read_bytes() == content:
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content)
        tmp.chmod(0o600)
        os.replace(tmp, path)
    for path in root.rglob("*"):
        if path.is_file() and str(path.relative_to(root)) not in files and not path.name.endswith(".tmp"):
            path.unlink()


def sync_volumes(pod: Mapping[str, Any], container: Mapping[str, Any], client: KubeClient,
                 root: Path) -> dict[str, str]:
    """Write the container's Secret/ConfigMap mounts under `root`; return mountPath -> local directory."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", []) or []}
    mapping: dict[str, str] = {}
    for mount in container.get("volumeMounts", []) or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise PodSpecError(f"volumeMount {mount['name']!r} names no volume of the pod")
        files = volume_files(pod, volume, client)
        if files is None:
            continue  # emptyDir, hostPath, ...: the host's own paths stand in
        local = root / mount["name"]
        write_files(local, files)
        mapping[mount["mountPath"].rstrip("/")] = str(local)
    return mapping


def remap(value: str, mapping: Mapping[str, str]) -> str:
    """`value` with a leading mount path replaced by its local directory (longest match first)."""
    for mount_path in sorted(mapping, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path + "/"):
            return mapping[mount_path] + value[len(mount_path):]
    return value


def service_account_kubeconfig(pod: Mapping[str, Any], client: KubeClient, path: Path) -> str | None:
    """Write a kubeconfig with a token for the pod's ServiceAccount; None if the pod opts out.

    The token comes from the TokenRequest API, bound to the pod (it dies with the pod), as the
    kubelet's projected service-account volume does.
    """
    spec = pod["spec"]
    if spec.get("automountServiceAccountToken") is False:
        return None
    meta = pod["metadata"]
    account = spec.get("serviceAccountName") or "default"
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
        "expirationSeconds": TOKEN_SECONDS,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}}
    try:
        answer = client.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", request)
    except ApiError as e:
        raise PodSpecError(f"no token for ServiceAccount {meta['namespace']}/{account}: {e}") from e
    cluster: dict[str, Any] = {"server": client.server}
    ca = client.ca_data()
    if ca is None:
        cluster["insecure-skip-tls-verify"] = True
    else:
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": answer["status"]["token"]}}],
        "contexts": [{"name": "pod", "context": {"cluster": "cluster", "user": account,
                                                  "namespace": meta["namespace"]}}],
        "current-context": "pod",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.chmod(0o600)
    os.replace(tmp, path)
    return str(path)
