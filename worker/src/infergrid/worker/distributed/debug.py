"""Collective-sequence guard (INFERGRID_TP_DEBUG=1): makes a divergence between the ranks visible.

NCCL hangs, silently, when two ranks issue different collectives (another op, size or order). In
debug mode every rank records each collective it issues, and each CUDA-graph replay (which stands
for the collectives captured in that graph), as a count and a running CRC of (event, shape, dtype).
At every checkpoint (end of INIT_KV_CACHE; before each step's forward pass, with the graph and
padded size the rank is about to run recorded; end of each step) the ranks all-gather (step, place,
count, CRC) over a separate gloo group, which no model collective uses, and all raise
`CollectiveMismatchError` with each rank's last events when they differ, before the mismatched
collectives are issued where possible. Each rank also logs one line per checkpoint. Off by default:
`record` and `check` are one attribute test then.
"""

from __future__ import annotations

import collections
import logging
import zlib

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_HISTORY = 16  # events shown per rank in a mismatch report


class CollectiveMismatchError(RuntimeError):
    """Ranks issued different sequences of collectives (they would hang under NCCL)."""


class _Trace:
    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None
        self.count = 0
        self.crc = 0
        self.num_checks = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=_HISTORY)


_TRACE = _Trace()


def enable(group: dist.ProcessGroup) -> None:
    """Start recording; `group` is a gloo group over all ranks, used for the checks only."""
    global _TRACE
    _TRACE = _Trace()
    _TRACE.group = group


def disable() -> None:
    global _TRACE
    _TRACE = _Trace()


def is_enabled() -> bool:
    return _TRACE.group is not None


def num_checks() -> int:
    """Checkpoints passed since `enable` (all ranks agreed at each)."""
    return _TRACE.num_checks


def record(event: str, tensor: torch.Tensor | None = None) -> None:
    """Note one collective (or graph replay) this rank issues now."""
    t = _TRACE
    if t.group is None:
        return
    text = event if tensor is None else f"{event}{list(tensor.shape)}:{str(tensor.dtype).removeprefix('torch.')}"
    t.count += 1
    t.crc = zlib.crc32(text.encode(), t.crc)
    t.recent.append(f"#{t.count} {text}")
    logger.debug("tp-debug collective %s", t.recent[-1])


def check(step: int, where: str) -> None:
    """All ranks at the same step and place with the same collectives so far, or CollectiveMismatchError."""
    t = _TRACE
    if t.group is None:
        return
    mine = torch.tensor([step, zlib.crc32(where.encode()), t.count, t.crc], dtype=torch.int64)
    size = dist.get_world_size(t.group)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=t.group)
    states = [tuple(int(v) for v in s.tolist()) for s in everyone]
    rank = dist.get_rank()
    logger.info("tp-debug rank %d step %d %s: %d collectives, crc %08x", rank, step, where, t.count, t.crc)
    if len(set(states)) == 1:
        t.num_checks += 1
        return
    reports: list[object] = [None] * size
    dist.all_gather_object(reports, (where, list(t.recent)), group=t.group)
    lines = [f"rank {r}: step {s[0]} {reports[r][0]}, {s[2]} collectives, crc {s[3]:08x}; "  # type: ignore[index]
             f"last: {reports[r][1]}" for r, s in enumerate(states)]  # type: ignore[index]
    raise CollectiveMismatchError(f"tensor-parallel ranks diverged by step {step} {where}:\n  " + "\n  ".join(lines))
