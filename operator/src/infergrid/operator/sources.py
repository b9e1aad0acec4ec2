"""Model sources (hf://, pvc://, file://) and how a worker pod gets each one onto its filesystem.

  hf://ORG/NAME      an init container downloads into the pod's emptyDir model cache
  pvc://CLAIM/PATH   the claim is mounted read-only at /mnt/<role>; the model is at /mnt/<role>/PATH
  file:///ABS/PATH   a hostPath volume mounted at the same path (test beds, single-node setups)

A pvc:// or file:// path may also name a `.gguf` file (a hostPath of type File then); the worker
converts GGUF sources once into its model cache (GGUF_CACHE_PATH, inside the pod's /tmp emptyDir).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_PATH = "/model-cache"
# Where workers write the Hugging Face directory converted from a GGUF source (the /tmp emptyDir).
GGUF_CACHE_PATH = "/tmp/infergrid-models"

_HF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A parsed `spec.model.source` (same rules as the CRD's CEL validation)."""

    scheme: str
    path: str
    claim: str | None = None
    revision: str | None = None

    @property
    def is_gguf_file(self) -> bool:
        """The path names a single GGUF file rather than a directory."""
        return self.path.endswith(".gguf")

    @classmethod
    def parse(cls, source: str, revision: str | None = None) -> ModelSource:
        scheme, sep, rest = source.partition("://")
        if not sep:
            raise ValueError(f"model source {source!r} has no scheme (hf://, pvc://, file://)")
        if scheme == "hf":
            if not _HF.match(rest):
                raise ValueError(f"hf source {source!r} must look like hf://ORG/NAME")
            return cls("hf", rest, revision=revision)
        if scheme == "pvc":
            claim, _, sub = rest.partition("/")
            if not _CLAIM.match(claim):
                raise ValueError(f"pvc source {source!r} must look like pvc://CLAIM/PATH")
            return cls("pvc", sub.strip("/"), claim=claim)
        if scheme == "file":
            if not rest.startswith("/") or rest.startswith("//") or "/../" in rest or rest.endswith("/.."):
                raise ValueError(f"file source {source!r} must be an absolute path: file:///PATH")
            return cls("file", rest.rstrip("/") or "/")
        raise ValueError(f"unknown model source scheme {scheme!r} in {source!r}")


@dataclasses.dataclass(frozen=True)
class ModelMount:
    """What a worker pod needs for one model: the path the engine loads, plus volumes and init containers."""

    path: str
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    init_containers: tuple[dict[str, Any], ...] = ()


def plan_model_mount(
    source: ModelSource,
    role: str,
    *,
    image: str,
    image_pull_policy: str | None,
    security_context: dict[str, Any],
    token_env: list[dict[str, Any]],
) -> ModelMount:
    """Volumes, mounts and (for hf://) a download init container for the model named `role`."""
    if source.scheme == "file":
        volume = f"{role}-host"
        return ModelMount(
            path=source.path,
            volumes=({"name": volume, "hostPath": {"path": source.path,
                                                   "type": "File" if source.is_gguf_file else "Directory"}},),
            mounts=({"name": volume, "mountPath": source.path, "readOnly": True},),
        )
    if source.scheme == "pvc":
        volume, root = f"{role}-pvc", f"/mnt/{role}"
        return ModelMount(
            path=f"{root}/{source.path}" if source.path else root,
            volumes=({"name": volume, "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}},),
            mounts=({"name": volume, "mountPath": root, "readOnly": True},),
        )
    dest = f"{MODEL_CACHE_PATH}/{role}"
    command = ["hf", "download", source.path, "--local-dir", dest]
    if source.revision:
        command += ["--revision", source.revision]
    init = {
        "name": f"download-{role}",
        "image": image,
        "command": command,
        "env": [{"name": "HF_HOME", "value": f"{MODEL_CACHE_PATH}/.hf"}, *token_env],
        "volumeMounts": [{"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": security_context,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
    }
    if image_pull_policy:
        init["imagePullPolicy"] = image_pull_policy
    # The cache volume itself is shared by all roles and declared once by the worker builder.
    return ModelMount(path=dest, init_containers=(init,))
