"""Chunked token log-probs/entropy: equal to the naive full-logits version, without [T, V] tensors."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from klong_megatron.algo.logprobs import naive_token_logprobs, token_logprobs, vocab_parallel_token_logprobs


def _inputs(t, v, h, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (t,), generator=g)
    g_lp, g_ent = torch.randn(t, generator=g), torch.randn(t, generator=g)
    return hidden, weight, targets, g_lp, g_ent


def _values_and_grads(fn, hidden, weight, targets, g_lp, g_ent, use=("lp", "ent"), **kw):
    lp, ent = fn(hidden, weight, targets, **kw)
    loss = (lp * g_lp).sum() * ("lp" in use) + (ent * g_ent).sum() * ("ent" in use)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return lp.detach(), ent.detach(), gh, gw


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 40),
    v=st.integers(2, 70),
    h=st.integers(1, 12),
    chunk=st.integers(1, 50),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    use=st.sampled_from([("lp", "ent"), ("lp",), ("ent",)]),
)
def test_chunked_matches_naive_values_and_gradients(t, v, h, chunk, temperature, use) -> None:
    args = _inputs(t, v, h)
    got = _values_and_grads(token_logprobs, *args, use=use, chunk_size=chunk, temperature=temperature)
    want = _values_and_grads(naive_token_logprobs, *args, use=use, temperature=temperature)
    for name, a, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_gradcheck_in_float64() -> None:
    hidden, weight, targets, *_ = _inputs(9, 13, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w: token_logprobs(x, w, targets, chunk_size=4, temperature=0.8), (hidden, weight)
    )


def test_leading_batch_dims_are_kept() -> None:
    hidden, weight, targets, *_ = _inputs(12, 17, 6)
    lp, ent = token_logprobs(hidden.view(3, 4, 6), weight, targets.view(3, 4), chunk_size=5)
    ref_lp, ref_ent = naive_token_logprobs(hidden, weight, targets)
    assert lp.shape == ent.shape == (3, 4)
    torch.testing.assert_close(lp.flatten(), ref_lp)
    torch.testing.assert_close(ent.flatten(), ref_ent)


def test_bf16_weights_match_naive_bf16_and_keep_gradient_dtypes() -> None:
    args = _inputs(64, 300, 32, dtype=torch.bfloat16)
    lp, ent, gh, gw = _values_and_grads(token_logprobs, *args, chunk_size=16)
    rlp, rent, rgh, rgw = _values_and_grads(naive_token_logprobs, *args)
    assert lp.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(lp, rlp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, rent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gh.float(), rgh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), rgw.float(), rtol=2e-2, atol=2e-2)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produced (what a [T, V] logits buffer would show up as)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("fn", ["chunked", "naive"])
def test_no_tensor_larger_than_one_chunk_of_logits_is_created(fn) -> None:
    t, v, h, chunk = 256, 300, 8, 16  # T*V = 76800 >> chunk*V = 4800 > V*H = 2400
    hidden, weight, targets, g_lp, g_ent = _inputs(t, v, h)
    with _LargestTensor() as probe:
        if fn == "chunked":
            _values_and_grads(token_logprobs, hidden, weight, targets, g_lp, g_ent, chunk_size=chunk)
        else:
            _values_and_grads(naive_token_logprobs, hidden, weight, targets, g_lp, g_ent)
    limit = chunk * v
    assert (probe.largest <= limit) == (fn == "chunked"), probe.largest


class _ThreadGroup:
    """In-process stand-in for a 2-rank process group: each rank is a thread; all_reduce meets at a barrier."""

    def __init__(self, size: int) -> None:
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size)

    def reducer(self, rank: int):
        def all_reduce(t: torch.Tensor, op: str) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            self.barrier.wait()
            t.copy_(stacked.amax(0) if op == "max" else stacked.sum(0))

        return all_reduce


@pytest.mark.parametrize("split", [10, 13])
def test_vocab_shards_with_reductions_reassemble_the_full_result(split) -> None:
    hidden, weight, targets, g_lp, g_ent = _inputs(11, 20, 4)
    want = _values_and_grads(token_logprobs, hidden, weight, targets, g_lp, g_ent, chunk_size=4)
    group, bounds, results = _ThreadGroup(2), [(0, split), (split, 20)], [None, None]

    def rank(r: int) -> None:
        lo, hi = bounds[r]
        shard = weight.detach()[lo:hi].clone().requires_grad_()
        results[r] = _values_and_grads(
            vocab_parallel_token_logprobs, hidden, shard, targets, g_lp, g_ent,
            vocab_start=lo, all_reduce=group.reducer(r), chunk_size=4,
        )  # fmt: skip

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for lp, ent, gh, _ in results:
        torch.testing.assert_close(lp, want[0])
        torch.testing.assert_close(ent, want[1])
        torch.testing.assert_close(gh, want[2])
    torch.testing.assert_close(torch.cat([results[0][3], results[1][3]]), want[3])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"targets": torch.tensor([0, 1, 25])}, "targets must be < vocabulary size 20"),
        ({"targets": torch.tensor([0, -100, 1])}, "targets must be >= 0"),
        ({"targets": torch.tensor([0, 1])}, "hidden is"),
        ({"weight": torch.zeros(20, 5)}, r"weight must be \[V, H=4\]"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_bad_input_is_named(kw, match) -> None:
    args = {"hidden": torch.zeros(3, 4), "weight": torch.zeros(20, 4), "targets": torch.tensor([0, 1, 2])}
    args |= {k: v for k, v in kw.items() if k in args}
    opts = {"chunk_size": 2} | {k: v for k, v in kw.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        token_logprobs(args["hidden"], args["weight"], args["targets"], **opts)


def test_per_token_temperatures_equal_each_token_at_its_own_temperature() -> None:
    """Rows packed from rollouts sampled at different temperatures: each token scored at its own one."""
    hidden, weight, targets, g_lp, g_ent = _inputs(10, 23, 6)
    temps = torch.tensor([0.7] * 4 + [1.0] * 3 + [0.3] * 3)
    got = _values_and_grads(token_logprobs, hidden, weight, targets, g_lp, g_ent, chunk_size=3, temperature=temps)
    want = _values_and_grads(naive_token_logprobs, hidden, weight, targets, g_lp, g_ent, temperature=temps)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    for i, t in enumerate(temps.tolist()):  # token i == the same token scored alone at the scalar temperature
        lp_i, _ = token_logprobs(hidden[i : i + 1], weight, targets[i : i + 1], temperature=t)
        torch.testing.assert_close(got[0][i : i + 1], lp_i.detach())
    with pytest.raises(ValueError, match="targets' shape"):
        token_logprobs(hidden, weight, targets, temperature=temps[:5])
