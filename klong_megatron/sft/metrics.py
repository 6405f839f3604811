"""FLOP estimates for throughput metrics (TFLOP/s, MFU). Pure arithmetic; estimates, not counters.

Convention (Megatron / PaLM): training = 3 x forward; per token ``6 * N`` for the weight matmuls and, for
causal attention, ``6 * L * n * d_q`` (scores and values, half of the full square) where ``n`` is the
length of the window the token attends within. Packed windows attend only within themselves, so the
attention term is summed per window (``sum n_i^2``), not over the packed sequence length: counting the
whole sequence overstates MFU (1.10x at 8k, 1.18x at 16k on the demo's window mix). Padding is not counted.
"""

from __future__ import annotations

from collections.abc import Iterable

from klong_megatron.config.model import ModelConfig

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}
"""Dense bf16 peak per GPU from NVIDIA's datasheets (SXM parts; the sparsity figures are twice these)."""


def _matmul_params(cfg: ModelConfig) -> int:
    """Parameters that multiply activations (output layer included, input embedding lookup excluded; for MoE
    only the routed experts a token uses)."""
    h = cfg.hidden_size
    return cfg.num_parameters(active=True) - cfg.padded_vocab_size() * h * (1 if cfg.untie_embeddings else 0)


def _d_q(cfg: ModelConfig) -> int:
    return (cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads) * cfg.num_attention_heads


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of a token in a window of ``seq_len`` tokens (see the module docstring)."""
    return 6.0 * _matmul_params(cfg) + 6.0 * cfg.num_layers * seq_len * _d_q(cfg)


def window_training_flops(cfg: ModelConfig, window_lengths: Iterable[int]) -> float:
    """Training FLOPs of packed windows of these lengths: ``6 N sum(n) + 6 L d_q sum(n^2)``."""
    lengths = list(window_lengths)
    return flops_from_sums(cfg, sum(lengths), sum(n * n for n in lengths))


def flops_from_sums(cfg: ModelConfig, tokens: float, squared: float) -> float:
    """:func:`window_training_flops` from ``sum(n)`` and ``sum(n^2)`` (what ranks all-reduce)."""
    return 6.0 * _matmul_params(cfg) * tokens + 6.0 * cfg.num_layers * _d_q(cfg) * squared


def datasheet_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 datasheet peak of a GPU named like ``torch.cuda.get_device_name()``; None when unknown."""
    for key, peak in DATASHEET_BF16_TFLOPS.items():
        if key in device_name.upper():
            return peak
    return None
