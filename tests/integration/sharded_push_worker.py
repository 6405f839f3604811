"""torchrun worker for test_sharded_push.py: a tiny GPT at one TP/PP/EP layout pushes its weights.

    torchrun --nproc_per_node 2 sharded_push_worker.py LAYOUT OUT_JSON SERVER_URL
    LAYOUT: tp2 | pp2 | ep2 (ep2 is a GLM-shaped MoE)

Every rank builds its shards with the layout-independent init (seed 1), then all ranks stream the HF
tensors (``hf_sharded.hf_tensor_stream``); rank 0 pushes them to SERVER_URL over gloo with SGLang's
protocol (buckets of 16 kB, per-tensor checksum verification) and writes {HF name: checksum, ...}.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.model import build_gpt, init_layout_independent
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed
from klong_megatron.rl.weight_sync import DistributedWeightSync, contribute_shards, free_port
from klong_megatron.rollout.sglang import SGLangEngine
from klong_megatron.rollout.weight_group import tensor_checksum

LAYOUTS = {"tp2": ParallelConfig(tp=2), "pp2": ParallelConfig(pp=2), "ep2": ParallelConfig(ep=2)}


def tiny(layout: str) -> ModelConfig:
    """Dense: Qwen3-shaped (qk norm, GQA, untied head). MoE: GLM-4.5-shaped (dense first layer, shared expert)."""
    common = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                  vocab_size=259, seq_length=64, transformer_impl="local")  # fmt: skip
    if layout != "ep2":
        return ModelConfig(**common, qk_layernorm=True, untie_embeddings=True)
    return ModelConfig(**common, num_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2,
                       moe_shared_expert_ffn_hidden_size=16, moe_first_dense_layers=1, moe_router_score="sigmoid",
                       moe_router_expert_bias=True, moe_token_dispatcher="allgather", rotary_percent=0.5,
                       qkv_bias=True)  # fmt: skip


def build(cfg: ModelConfig, parallel: ParallelConfig, seed: int) -> torch.nn.Module:
    """This rank's shards: layout-independent init, then matrices x8 (the init is nearly uniform: greedy
    tokens of different seeds would look alike)."""
    model = build_gpt(cfg, parallel=parallel)
    init_layout_independent(model, cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


def main() -> None:
    layout, out, url = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    init_distributed(LAYOUTS[layout], seed=1)
    cfg = tiny(layout)
    model = build(cfg, LAYOUTS[layout], seed=1)
    if dist.get_rank() != 0:
        contribute_shards(model, cfg)
    else:
        from klong_megatron.megatron.hf_sharded import hf_tensor_stream

        seen: dict[str, str] = {}

        def recorded():
            for name, t in hf_tensor_stream(model, cfg):
                seen[name] = tensor_checksum(t)
                yield name, t

        async def push() -> dict[str, float]:
            engine = SGLangEngine([url], control_timeout_s=30)
            sync = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                         bucket_bytes=16_000, verify="checksum", timeout_s=60)  # fmt: skip
            try:
                await sync.push(recorded(), f"{layout}-v1")
                return sync.last_push
            finally:
                await sync.close()
                await engine.close()

        stats = asyncio.run(push())
        out.write_text(json.dumps({"checksums": seen, "stats": stats}))
    destroy_distributed()


if __name__ == "__main__":
    main()
