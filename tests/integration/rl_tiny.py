"""Tiny Megatron GPT + RL micro-batches for the RL-loss tests (single process and torchrun workers).

Batches follow the ``klong_megatron.megatron.rl_loss`` contract with the local layer spec (causal
``[B, 1, S, S]`` mask); advantages are +1 on even windows and -1 on odd ones.
"""

from __future__ import annotations

import torch

from klong_megatron.algo.grpo import policy_loss
from klong_megatron.config.model import ModelConfig

VOCAB, SEQ = 100, 16
MODEL = ModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ, transformer_impl="local"
)


def rl_batch(num: int, seed: int, trained_from: int = 3) -> dict[str, torch.Tensor]:
    """``num`` windows of length SEQ; loss mask from position ``trained_from`` (varies token counts)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (num, SEQ + 1), generator=g)
    mask = torch.zeros(num, SEQ)
    mask[:, trained_from:] = 1.0
    return {
        "tokens": seq[:, :-1],
        "labels": seq[:, 1:],
        "position_ids": torch.arange(SEQ).expand(num, SEQ).clone(),
        "attention_mask": torch.ones(num, 1, SEQ, SEQ, dtype=torch.bool).triu(1),
        "loss_mask": mask,
        "advantages": torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(num)]),
    }


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full ``[B, S, V_local]`` logits through the model's own output layer (the reference path)."""
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"]).float()


def reference_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], num_tokens: float, **kw) -> torch.Tensor:
    """Policy loss from full logits [B, S, V] (naive log-softmax), normalised by ``num_tokens``."""
    all_logp = torch.log_softmax(logits, dim=-1)
    logp = all_logp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    entropy = -(all_logp.exp() * all_logp).sum(-1)
    old, adv, mask = batch["old_logprobs"], batch["advantages"], batch["loss_mask"]
    loss, _ = policy_loss(logp, old, adv, mask, entropy=entropy, num_tokens=num_tokens, **kw)
    return loss
