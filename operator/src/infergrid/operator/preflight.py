"""Checks before the operator starts: the CRDs it needs are served and its peering object exists.

Without them kopf logs in and then idles in silence (no InferenceService watch, or a peering it waits
for forever); `infergrid-operator` says what is missing and how to fix it, and exits non-zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiohttp

from infergrid.operator import constants as c
from infergrid.operator.kube import ApiError, KubeClient

PEERING_API = "kopf.dev/v1"


async def find_problems(api: KubeClient, *, peering: str | None, namespaces: Sequence[str]) -> list[str]:
    """What keeps the operator from working on this cluster, one sentence each (empty: nothing).

    `peering` None means standalone. With `namespaces` kopf uses namespaced KopfPeering objects, one
    per watched namespace (glob patterns cannot be checked and are skipped), else ClusterKopfPeering.
    """
    problems = []
    if not await api.has_kind(c.API_VERSION, c.KIND):
        problems.append(f"the {c.KIND} CRD ({c.PLURAL}.{c.GROUP}) is not installed: "
                        "`kubectl apply -f crds/` or `helm install` the chart")
    if peering is None:
        return problems
    kind = "KopfPeering" if namespaces else "ClusterKopfPeering"
    if not await api.has_kind(PEERING_API, kind):
        problems.append(f"the {kind} CRD ({kind.lower()}s.kopf.dev) is not installed, so peering "
                        f"{peering!r} cannot work: install charts/infergrid/crds/kopf-peering.yaml "
                        "(`helm install` does), or run one replica with --standalone")
        return problems
    for namespace in [ns for ns in namespaces if not _is_glob(ns)] if namespaces else [None]:
        try:
            await api.get(PEERING_API, kind, namespace, peering)
        except ApiError as exc:
            if exc.status != 404:
                raise
            where = f" in namespace {namespace}" if namespace else ""
            problems.append(f"{kind} {peering!r}{where} does not exist: create it (the chart does, with "
                            "peering.create=true), pass --peering NAME of an existing one, or run one "
                            "replica with --standalone")
    return problems


def _is_glob(namespace: str) -> bool:
    return any(ch in namespace for ch in "*?[]!")


async def check_cluster(kubeconfig: str | None, *, peering: str | None, namespaces: Sequence[str],
                        patience: float = 10.0) -> list[str]:
    """`find_problems` with its own client; an unreachable or refusing API server is a problem too.

    Problems are looked for again for `patience` seconds: CRDs applied a moment ago (`helm install`
    applies them right before the operator's Deployment) reach the discovery documents with a delay.
    """
    api = KubeClient.from_environment(kubeconfig)
    deadline = asyncio.get_running_loop().time() + patience
    try:
        while True:
            try:
                problems = await find_problems(api, peering=peering, namespaces=namespaces)
            except ApiError as exc:
                problems = [f"the API server at {api.server} refused the operator's checks: {exc}"]
            except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                problems = [f"cannot reach the API server at {api.server}: {exc!r}"]
            if not problems or asyncio.get_running_loop().time() >= deadline:
                return problems
            await asyncio.sleep(2.0)
    finally:
        await api.close()
