"""A small Kubernetes REST client (httpx) for the test bed's own needs: get, list, patch, watch.

It understands the kubeconfigs the test bed writes (bearer token or client certificate, CA file or
data, or insecure-skip-tls-verify). Operators and tests should use their own clients (kopf, kubectl).
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml


class ApiError(RuntimeError):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, body: str, method: str, path: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


def _materialize(data_b64: str, suffix: str, tmp: list[Path]) -> str:
    f = tempfile.NamedTemporaryFile(prefix="infergrid-kube-", suffix=suffix, delete=False)
    f.write(base64.b64decode(data_b64))
    f.close()
    tmp.append(Path(f.name))
    return f.name


class KubeClient:
    """Talks to the API server named by a kubeconfig's current context."""

    def __init__(self, kubeconfig: str | Path, timeout: float = 30.0):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next((u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {})
        self.server = cluster["server"].rstrip("/")
        self._cluster = cluster
        self._tmp: list[Path] = []
        verify: ssl.SSLContext | bool
        if cluster.get("insecure-skip-tls-verify"):
            verify = False
        else:
            if cluster.get("certificate-authority-data"):
                pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
                verify = ssl.create_default_context(cadata=pem)
            elif cluster.get("certificate-authority"):
                verify = ssl.create_default_context(cafile=cluster["certificate-authority"])
            else:
                verify = ssl.create_default_context()
        headers = {}
        if user.get("token"):
            headers["Authorization"] = f"Bearer {user['token']}"
        cert = None
        if user.get("client-certificate-data"):
            cert = (
                _materialize(user["client-certificate-data"], ".crt", self._tmp),
                _materialize(user["client-key-data"], ".key", self._tmp),
            )
        elif user.get("client-certificate"):
            cert = (user["client-certificate"], user["client-key"])
        if cert and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(*cert)
        self._http = httpx.Client(base_url=self.server, verify=verify, headers=headers, timeout=timeout)
        self._verify = verify
        self._headers = headers

    def ca_data(self) -> bytes | None:
        """The PEM of the CA this client trusts for the API server (None: TLS is not verified)."""
        if self._cluster.get("insecure-skip-tls-verify"):
            return None
        if self._cluster.get("certificate-authority-data"):
            return base64.b64decode(self._cluster["certificate-authority-data"])
        if self._cluster.get("certificate-authority"):
            return Path(self._cluster["certificate-authority"]).read_bytes()
        return None

    def close(self) -> None:
        """Close connections and remove materialized credential files."""
        self._http.close()
        for p in self._tmp:
            p.unlink(missing_ok=True)

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        ok_missing: bool = False,
    ) -> dict[str, Any] | None:
        """One API call; returns the decoded JSON (None on 404 when `ok_missing`)."""
        content = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        r = self._http.request(method, path, content=content, params=params, headers=headers)
        if r.status_code == 404 and ok_missing:
            return None
        if r.status_code >= 300:
            raise ApiError(r.status_code, r.text, method, path)
        return r.json() if r.content else {}

    def get(self, path: str, ok_missing: bool = False, **params: Any) -> dict[str, Any] | None:
        """GET path."""
        return self.request("GET", path, params=params or None, ok_missing=ok_missing)

    def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """POST obj to the collection at path."""
        out = self.request("POST", path, obj)
        assert out is not None
        return out

    def merge_patch(self, path: str, patch: dict[str, Any], ok_missing: bool = False) -> dict[str, Any] | None:
        """JSON merge patch."""
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json", ok_missing=ok_missing)

    def strategic_patch(self, path: str, patch: dict[str, Any], ok_missing: bool = False) -> dict[str, Any] | None:
        """Strategic merge patch (lists with merge keys, such as pod conditions, merge by key)."""
        return self.request(
            "PATCH", path, patch, content_type="application/strategic-merge-patch+json", ok_missing=ok_missing
        )

    def delete(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """DELETE path (a missing object is not an error)."""
        return self.request("DELETE", path, body, ok_missing=True)

    def watch(
        self,
        path: str,
        resource_version: str,
        timeout_seconds: int = 60,
        on_open: Callable[[httpx.Response], None] | None = None,
        **params: Any,
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events ({"type", "object"}) until the server ends the stream.

        `on_open` receives the streaming response; closing it from another thread ends the watch.
        """
        q = dict(params, watch="1", resourceVersion=resource_version, timeoutSeconds=str(timeout_seconds),
                 allowWatchBookmarks="true")
        with httpx.Client(base_url=self.server, verify=self._verify, headers=self._headers,
                          timeout=httpx.Timeout(10.0, read=timeout_seconds + 30)) as http:
            with http.stream("GET", path, params=q) as r:
                if on_open is not None:
                    on_open(r)
                if r.status_code >= 300:
                    raise ApiError(r.status_code, r.read().decode(errors="replace"), "WATCH", path)
                for line in r.iter_lines():
                    if line.strip():
                        yield json.loads(line)
