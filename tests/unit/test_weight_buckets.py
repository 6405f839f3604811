"""Weight-push buckets: order kept, at most ``bucket_bytes`` each unless one tensor alone is larger."""

from __future__ import annotations

import torch

from klong_megatron.rl.weight_sync import buckets


def test_buckets_keep_order_and_bound_bytes() -> None:
    sizes = [10, 10, 30, 5, 100, 1, 1]  # float32 elements -> 4 bytes each
    stream = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    got = list(buckets(iter(stream), bucket_bytes=80))
    assert [[n for n, _ in b] for b in got] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5", "t6"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 80 or len(b) == 1 for b in got)
    assert list(buckets(iter([]), 80)) == []
