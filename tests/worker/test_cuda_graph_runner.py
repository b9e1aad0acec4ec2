"""The one forward-pass graph runner (runner/cuda_graph.py) in its query-length-1 case, decode: on CPU,
with a stand-in for the captured graph, a batch of 3 decode sequences lands in the 4-sequence bucket;
the dummy row is a sequence of length 1 reading the null block, query starts stay 0, 1, 2, ... (the
multi-token case: tests/worker/test_spec_decode_units.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from infergrid.worker.layers.attention import AttentionMetadata
from infergrid.worker.runner.cuda_graph import CUDAGraphRunner, pack_key, unpack_key


def test_decode_is_the_query_length_one_case():
    runner = SimpleNamespace(config=SimpleNamespace(max_num_seqs=8), device=torch.device("cpu"), block_size=4,
                             max_blocks_per_seq=6, max_model_len=24, dtype=torch.float32,
                             model_config=SimpleNamespace(hidden_size=2))
    graphs = CUDAGraphRunner(runner, max_query_len=1)
    assert graphs.kind == "decode" and graphs.inputs.query_start_loc is None
    assert graphs.keys == [pack_key(bs, bs) for bs in (1, 2, 4, 8)]  # one token capacity per bucket: itself
    seen = {}

    class FakeGraph:
        def __init__(self, key: int) -> None:
            self.bs, self.cap = unpack_key(key)

        def replay(self) -> None:
            bs = self.bs
            seen.update(bs=bs, cap=self.cap, qsl=graphs.query_start_loc[: bs + 1].tolist(),
                        seq_lens=graphs.seq_lens[:bs].tolist(), slots=graphs.slot_mapping[:bs].tolist(),
                        tables=graphs.block_tables[:bs, :2].tolist())
            graphs.hidden[:bs] = torch.stack([graphs.input_ids[:bs], graphs.positions[:bs]], dim=1).float()

    graphs.graphs = {key: FakeGraph(key) for key in graphs.keys}
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([41, 22, 13]), query_start_loc=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        seq_lens=torch.tensor([10, 7, 2], dtype=torch.int32),
        block_tables=torch.tensor([[5, 6, 7], [3, 4, 0], [2, 0, 0]], dtype=torch.int32),
        max_query_len=1, max_seq_len=10, block_size=4,
    )
    batch = SimpleNamespace(input_ids=torch.tensor([100, 101, 102]), positions=torch.tensor([9, 6, 1]), meta=meta)
    key = graphs.bucket(3, 3, 1, 3)
    assert key == pack_key(4, 4)
    assert graphs.bucket(3, 6, 2, 3) is None  # more than one query token per sequence: not a decode graph
    assert graphs.bucket(9, 9, 1, 3) is None  # larger than the largest bucket
    hidden = graphs.run(batch, key)
    assert hidden[:, 0].tolist() == [100.0, 101.0, 102.0] and hidden[:, 1].tolist() == [9.0, 6.0, 1.0]
    assert seen["bs"] == 4 and seen["cap"] == 4 and seen["qsl"] == [0, 1, 2, 3, 4]
    assert seen["seq_lens"] == [10, 7, 2, 1] and seen["slots"] == [41, 22, 13, 0]
    assert seen["tables"] == [[5, 6], [3, 4], [2, 0], [0, 0]]
