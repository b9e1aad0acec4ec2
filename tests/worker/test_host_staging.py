"""PinnedStaging (runner/host_staging.py): uploads through the reused pinned buffer arrive intact,
also across many wraps of both halves while earlier copies may still be queued."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infergrid.worker.runner.host_staging import PinnedStaging

pytestmark = pytest.mark.gpu


def test_uploads_survive_many_wraps_behind_queued_work():
    dev = torch.device("cuda")
    staging = PinnedStaging(dev, num_bytes=1 << 16)  # 32 KiB halves: a wrap every few dozen uploads
    rng = np.random.default_rng(0)
    big = torch.randn(2048, 2048, device=dev)
    sent, got = [], []
    for i in range(2000):
        if i % 50 == 0:
            big = big @ big / 64  # queue device work so that copies are still pending when slices recycle
        array = rng.integers(-(1 << 40), 1 << 40, size=int(rng.integers(0, 900)), dtype=np.int64)
        sent.append(array)
        got.append(staging.from_numpy(array))
    floats = torch.rand(7, 3)
    on_device = staging.to_device(floats)
    torch.cuda.synchronize()
    assert all(np.array_equal(a, g.cpu().numpy()) for a, g in zip(sent, got, strict=True))
    assert torch.equal(on_device.cpu(), floats) and on_device.shape == (7, 3)
    large = torch.arange(100_000)  # over a quarter of a half: its own pinned copy
    assert torch.equal(staging.to_device(large).cpu(), large)
