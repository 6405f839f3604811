"""FLOP estimates for throughput metrics (TFLOP/s, MFU). Pure arithmetic; estimates, not counters."""

from __future__ import annotations

from klong_megatron.config.model import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of a decoder.

    ``6 * N`` for the weight matmuls (N: all parameters that multiply activations, the output layer
    included, the input embedding lookup excluded; for MoE only the experts a token is routed to)
    plus ``6 * L * seq_len * d_q`` for causal attention
    scores and values (half of the full ``12 * L * S * d_q``), the Megatron/PaLM convention. Packed
    windows attend only within themselves, so this over-counts attention slightly for short windows.
    """
    h = cfg.hidden_size
    d_q = (cfg.kv_channels or h // cfg.num_attention_heads) * cfg.num_attention_heads
    matmul_params = cfg.num_parameters(active=True) - cfg.padded_vocab_size() * h * (1 if cfg.untie_embeddings else 0)
    return 6.0 * matmul_params + 6.0 * cfg.num_layers * seq_len * d_q
