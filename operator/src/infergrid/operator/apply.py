"""Create-or-patch of child objects, idempotent and safe to run twice at once.

Each child is sent with server-side apply (one request creates it or patches the fields we own). A 409
(AlreadyExists from a racing create, or Conflict) and a 422 that may come from a stale object of the same
name are answered by re-reading the object: if another controller owns it we wait for the garbage
collector instead of fighting over it, otherwise the apply is retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from infergrid.operator.constants import FIELD_MANAGER
from infergrid.operator.kube import ApiError, KubeClient

MAX_ATTEMPTS = 4


class ChildOwnedElsewhere(Exception):
    """A child's name is taken by an object another controller owns (e.g. not yet garbage-collected)."""


def describe(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']}"


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


async def apply_child(api: KubeClient, desired: Mapping[str, Any], *,
                      field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """Create or patch one child; returns the object the server stored."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return await api.apply(desired, field_manager=field_manager)
        except ApiError as exc:
            if exc.status not in (409, 422) or attempt == MAX_ATTEMPTS - 1:
                raise
            await _check_owner(api, desired, exc)
        await asyncio.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


async def _check_owner(api: KubeClient, desired: Mapping[str, Any], exc: ApiError) -> None:
    meta = desired["metadata"]
    try:
        current = await api.get(desired["apiVersion"], desired["kind"], meta.get("namespace"), meta["name"])
    except ApiError as read_error:
        if read_error.status == 404:
            return  # gone in between: the next apply creates it
        raise
    ours, theirs = controller_uid(desired), controller_uid(current)
    if theirs is not None and theirs != ours:
        raise ChildOwnedElsewhere(f"{describe(desired)} is controlled by another owner (uid {theirs})") from exc
    if exc.status == 422:
        raise exc  # invalid for a reason of its own: retrying the same body cannot help


# NOTE: the API server checks a RoleBinding against the Role it names (RBAC escalation prevention), so
# bindings go out after everything else: a binding racing its Role is refused with 404.
_LATE_KINDS = frozenset({"RoleBinding"})


async def apply_children(api: KubeClient, children: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Apply all children concurrently (RoleBindings after their Roles); the first failure is raised after
    all have finished."""
    children = list(children)
    results: list[Any] = []
    for wave in ([ch for ch in children if ch["kind"] not in _LATE_KINDS],
                 [ch for ch in children if ch["kind"] in _LATE_KINDS]):
        results += await asyncio.gather(*(apply_child(api, child) for child in wave), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
    return results
