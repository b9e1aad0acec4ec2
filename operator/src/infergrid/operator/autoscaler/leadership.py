"""Whether this operator replica is the active one under kopf peering (the autoscaler acts only then).

kopf pauses the handlers of a replica that sees a live peer of higher priority (or a second one of its
own priority) in the peering object's status; the autoscaler's loop is not a kopf handler, so it reads
the same record and applies the same rule. Standalone operators are always active.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

from infergrid.operator.kube import ApiError, KubeClient

logger = logging.getLogger(__name__)


def is_active(peers: Mapping[str, Any], priority: int, now: datetime.datetime) -> bool:
    """kopf's rule over a peering object's `status` (identity -> {priority, lifetime, lastseen})."""
    same = 0
    for record in peers.values():
        if not isinstance(record, Mapping):
            continue
        try:
            seen = datetime.datetime.fromisoformat(str(record["lastseen"]))
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=datetime.UTC)
            alive = (now - seen).total_seconds() <= float(record.get("lifetime", 60))
            other = int(record.get("priority", 0))
        except (KeyError, ValueError, TypeError):
            continue
        if not alive:
            continue
        if other > priority:
            return False
        same += other == priority
    return same <= 1  # our own record, or none yet


class Leadership:
    """Reads the peering object (cluster-wide, or the namespace's for namespaced operators) on demand."""

    def __init__(self, api: KubeClient, peering: str | None, priority: int, clusterwide: bool = True) -> None:
        self.api, self.peering, self.priority, self.clusterwide = api, peering, priority, clusterwide
        self._answers: dict[str, tuple[float, bool]] = {}  # peering path -> (when read, active)

    async def is_active(self, namespace: str) -> bool:
        """Whether to act on services of `namespace` (the peering object is read at most once a second)."""
        if self.peering is None:
            return True
        if self.clusterwide:
            path = f"/apis/kopf.dev/v1/clusterkopfpeerings/{self.peering}"
        else:
            path = f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{self.peering}"
        read_at, active = self._answers.get(path, (-1e9, False))
        if time.monotonic() - read_at < 1.0:
            return active
        try:
            body = await self.api.request("GET", path)
            active = is_active(body.get("status") or {}, self.priority, datetime.datetime.now(datetime.UTC))
        except (ApiError, OSError, TimeoutError) as exc:
            logger.debug("cannot read peering %s: %s", path, exc)
            active = False  # kopf pauses too without its peering object
        self._answers[path] = (time.monotonic(), active)
        return active
