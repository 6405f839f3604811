"""bf16: weights loaded into a model whose optimizer already exists must survive the next optimizer step.

Megatron's bf16 optimizer keeps fp32 main params copied when it is built; a later model-only load
(``init_from_checkpoint``, the SFT -> RL handoff) changes the bf16 params only, and the next step writes
the stale main params back (megatron-core ``optimizer.py`` ``reload_model_params``: "Call whenever the
parameters are changed outside of the optimizer"). Save A, perturb, load A, one step at lr 0: weights == A.
"""

from __future__ import annotations

import torch

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import TrainerConfig
from klong_megatron.megatron import checkpoint as ckpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed
from klong_megatron.megatron.training import build_training_model


def test_bf16_main_params_are_reloaded_after_a_model_only_load(tmp_path):
    t = TrainerConfig(train_steps=1, global_batch_size=1, lr=0.0, weight_decay=0.0, bf16=True)
    init_distributed(t.parallel, t.seed)
    try:
        cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, vocab_size=64,
                          seq_length=16, transformer_impl="local")  # fmt: skip
        model, optimizer, _ = build_training_model(cfg, t)
        params = [p for p in model.parameters()]
        assert params[0].dtype == torch.bfloat16
        with torch.no_grad():  # A: different from what the optimizer copied at construction
            for p in params:
                p.add_(0.5)
        a = [p.detach().clone() for p in params]
        ckpt.save_checkpoint(tmp_path / "a", model, None, None, ckpt.TrainState())
        with torch.no_grad():
            for p in params:
                p.sub_(1.0)
        ckpt.load_model_weights(tmp_path / "a", model, optimizer)
        assert all(torch.equal(p, x) for p, x in zip(params, a, strict=True))
        model.zero_grad_buffer()
        optimizer.zero_grad()
        for p in params:
            p.main_grad.zero_()
        optimizer.step()
        changed = [i for i, (p, x) in enumerate(zip(params, a, strict=True)) if not torch.equal(p, x)]
        assert not changed, f"{len(changed)} of {len(params)} parameters moved back to their construction values"
    finally:
        destroy_distributed()
