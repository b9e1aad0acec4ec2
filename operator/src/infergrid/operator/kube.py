"""A small async Kubernetes API client over aiohttp that speaks plain dicts.

The operator's children are plain dicts from the builders, so a typed client adds nothing but CPU time;
credentials come from the kubeconfig (or the in-cluster service account) via the `kubernetes` package.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kubernetes

# kind -> (plural, namespaced) for every kind the operator touches.
RESOURCES: dict[str, tuple[str, bool]] = {
    "Deployment": ("deployments", True),
    "Service": ("services", True),
    "Pod": ("pods", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "NetworkPolicy": ("networkpolicies", True),
    "PodMonitor": ("podmonitors", True),
    "ServiceMonitor": ("servicemonitors", True),
    "InferenceService": ("inferenceservices", True),
    "Event": ("events", True),
    "EndpointSlice": ("endpointslices", True),
    "ServiceAccount": ("serviceaccounts", True),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "ClusterKopfPeering": ("clusterkopfpeerings", False),
    "KopfPeering": ("kopfpeerings", True),
}

_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class ApiError(Exception):
    """A non-2xx answer from the API server, with its status code and Status reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """REST path of a collection (name None) or of one object."""
    plural, is_namespaced = RESOURCES[kind]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}" if is_namespaced and namespace else f"{root}/{plural}"
    return f"{path}/{quote(name)}" if name else path


class KubeClient:
    """Async JSON client: `get`, `apply` (server-side apply), `merge_patch`, `create`, `delete`, `discover`."""

    def __init__(self, server: str, *, ssl_context: ssl.SSLContext | bool, auth: Any = None,
                 retries: int = 3, timeout: float = 30.0, max_connections: int = 128) -> None:
        self.server = server.rstrip("/")
        self._ssl = ssl_context
        self._auth = auth  # callable returning the Authorization header value, or None
        self._retries = retries
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, **kwargs: Any) -> KubeClient:
        """Credentials from `kubeconfig` / $KUBECONFIG / ~/.kube/config, else the in-cluster account."""
        cfg = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_incluster_config(client_configuration=cfg)
        context: ssl.SSLContext | bool
        if cfg.verify_ssl:
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        else:
            context = False
        if cfg.cert_file and isinstance(context, ssl.SSLContext):
            context.load_cert_chain(cfg.cert_file, cfg.key_file)

        def auth() -> str | None:
            # Newer clients keep the token under "BearerToken", older ones under "authorization";
            # the lookup also runs the in-cluster loader's refresh hook (rotated service account tokens).
            for name in ("BearerToken", "authorization"):
                if token := cfg.get_api_key_with_prefix(name):
                    return token
            return aiohttp.BasicAuth(cfg.username, cfg.password).encode() if cfg.username else None

        return cls(cfg.host, ssl_context=context, auth=auth, **kwargs)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._max_connections)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        """One API call; connection errors, 429 and 5xx are retried a few times, other errors raise ApiError."""
        url = self.server + path + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if self._auth is not None and (token := self._auth()):
            headers["Authorization"] = token
        data = json.dumps(body) if body is not None else None
        for attempt in range(self._retries + 1):
            is_last = attempt == self._retries
            try:
                async with self._get_session().request(method, url, data=data, headers=headers) as response:
                    text = await response.text()
                    if response.status < 400:
                        return json.loads(text) if text else {}
                    error = _api_error(response.status, text)
                    if response.status not in _RETRYABLE_STATUS or is_last:
                        raise error
            except (aiohttp.ClientConnectionError, TimeoutError):
                if is_last:
                    raise
            await asyncio.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self.request("GET", object_path(api_version, kind, namespace, name))

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self.request("POST", object_path(obj["apiVersion"], obj["kind"], meta.get("namespace")),
                                  body=obj)

    async def apply(self, obj: Mapping[str, Any], *, field_manager: str, force: bool = True,
                    subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply: creates the object or updates the fields this manager owns."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if subresource:
            path += f"/{subresource}"
        # NOTE: Strict: a field the API server does not know (a typo in spec.podTemplate or spec.affinity, which
        # pass through) fails the apply, and the failure reaches the status, instead of being dropped.
        params = {"fieldManager": field_manager, "force": "true" if force else "false", "fieldValidation": "Strict"}
        return await self.request("PATCH", path, body=obj, params=params,
                                  content_type="application/apply-patch+yaml")

    async def merge_patch(self, api_version: str, kind: str, namespace: str | None, name: str,
                          patch: Mapping[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        path = object_path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource else "")
        return await self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return await self.request("DELETE", object_path(api_version, kind, namespace, name))

    async def list(self, api_version: str, kind: str, namespace: str | None, *,
                   label_selector: str | None = None) -> dict[str, Any]:
        """The collection (its `items` and `metadata.resourceVersion`, where a watch starts)."""
        params = {"labelSelector": label_selector} if label_selector else None
        return await self.request("GET", object_path(api_version, kind, namespace), params=params)

    async def watch(self, api_version: str, kind: str, namespace: str | None, *, resource_version: str,
                    label_selector: str | None = None, timeout_seconds: int = 300) -> AsyncIterator[dict[str, Any]]:
        """Watch events (`{"type", "object"}`) after `resource_version`, until the server ends the watch.

        Raises ApiError(410) when the version is too old (the caller re-lists); an ERROR event with a
        Status object is raised as ApiError too. Bookmarks are requested and passed through.
        """
        params = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            params["labelSelector"] = label_selector
        url = self.server + object_path(api_version, kind, namespace) + "?" + urlencode(params)
        headers = {"Accept": "application/json"}
        if self._auth is not None and (token := self._auth()):
            headers["Authorization"] = token
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_seconds + 30)
        async with self._get_session().get(url, headers=headers, timeout=timeout) as response:
            if response.status >= 400:
                raise _api_error(response.status, await response.text())
            while line := await response.content.readline():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    raise ApiError(int(status.get("code", 500)), status.get("reason", ""), status.get("message", ""))
                yield event

    async def has_kind(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves `kind` in `api_version` (e.g. a CRD is installed)."""
        root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        try:
            listing = await self.request("GET", root)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("kind") == kind for r in listing.get("resources", []))


def _api_error(status: int, text: str) -> ApiError:
    try:
        payload = json.loads(text)
        return ApiError(status, payload.get("reason", ""), payload.get("message", text))
    except (ValueError, AttributeError):
        return ApiError(status, "", text[:500])
