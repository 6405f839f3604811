"""Chunked token log-probs on a CUDA device: equal to the naive version, far less peak memory.

Skipped (with the reason) where no CUDA device is present; the CPU suite covers the same maths.
"""

from __future__ import annotations

import pytest
import torch

from klong_megatron.algo.logprobs import naive_token_logprobs, token_logprobs

pytestmark = pytest.mark.gpu


def _run(fn, hidden, weight, targets, g, **kw):
    hidden.grad = weight.grad = None
    lp, ent = fn(hidden, weight, targets, **kw)
    ((lp * g).sum() + (ent * g).sum()).backward()
    return lp.detach(), ent.detach(), hidden.grad, weight.grad


def _inputs(t, v, h, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(t, h, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (t,), device="cuda", generator=g)
    return hidden, weight, targets, torch.randn(t, device="cuda", generator=g)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_chunked_matches_naive(dtype, tol) -> None:
    args = _inputs(1000, 5000, 64, dtype)
    got = _run(token_logprobs, *args, chunk_size=256)
    want = _run(naive_token_logprobs, *args)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_cuda_chunked_peak_memory_is_a_fraction_of_naive() -> None:
    args = _inputs(8192, 32768, 512, torch.bfloat16)
    peaks = {}
    for name, fn, kw in (("naive", naive_token_logprobs, {}), ("chunked", token_logprobs, {"chunk_size": 512})):
        _run(fn, *args, **kw)  # warm-up; grads exist afterwards
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(fn, *args, **kw)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["chunked"] * 8 <= peaks["naive"], peaks
