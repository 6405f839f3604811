"""Hugging Face <-> Megatron weights for Llama / Qwen2 / Qwen3 decoders and the Qwen3-MoE / GLM-4.5 MoE families.

    cfg = model_config_from_hf(hf_dir, seq_length=8192)   # ModelConfig from config.json
    load_hf_weights(megatron_model, hf_dir, cfg)          # HF tensors -> this GPTModel
    save_hf_weights(megatron_model, cfg, out_dir, hf_dir) # GPTModel -> HF safetensors (+ config, tokenizer)
    hf_tensors(megatron_model, cfg)                       # GPTModel -> {HF name: tensor} (weight sync)

Architectures: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` (dense),
``Qwen3MoeForCausalLM`` (softmax top-k router, renormalised; no shared expert) and ``Glm4MoeForCausalLM``
(GLM-4.5 / GLM-4.5-Air: sigmoid router with ``e_score_correction_bias`` and ``routed_scaling_factor``, one
shared expert, dense first ``first_k_dense_replace`` layers, partial RoPE, q/k/v bias, optional qk norm).

Name/layout mapping (local and Transformer Engine specs): q/k/v projections are fused into
``linear_qkv`` in Megatron's grouped order (per KV group: its query heads, then k, then v);
gate/up into ``linear_fc1`` as ``[gate; up]``; RMSNorm weights map one to one (TE keeps the
pre-attention / pre-MLP norms inside ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``).
The embedding is padded with zero rows to the padded vocabulary on import and cut on export.

MoE layers (``mlp.router`` + ``mlp.experts.local_experts.E`` + ``mlp.shared_experts``, Megatron's
SequentialMLP, i.e. ``moe_grouped_gemm=False``):

    model.layers.N.mlp.gate.weight                     <-> decoder.layers.N.mlp.router.weight
    model.layers.N.mlp.gate.e_score_correction_bias    <-> decoder.layers.N.mlp.router.expert_bias (GLM)
    model.layers.N.mlp.experts.E.{gate,up}_proj.weight <-> ...mlp.experts.local_experts.E.linear_fc1.weight [gate; up]
    model.layers.N.mlp.experts.E.down_proj.weight      <-> ...mlp.experts.local_experts.E.linear_fc2.weight
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight <-> ...mlp.shared_experts.linear_fc{1,2}.weight

Import also reads experts stored fused (``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` = per expert ``[gate; up]``,
``mlp.experts.down_proj`` ``[E, H, I]``); export writes the per-expert names of the published checkpoints
(what transformers' ``save_pretrained`` writes too). The router's runtime counters (``local_tokens_per_expert``)
are never converted.

The mapping itself (one per parameter, used by import, export, the sharded push and ``klong-convert``) is
``megatron/hf_map.py``. Import (:func:`load_hf_weights`) runs at any TP / PP / EP: each rank reads only its
own tensors; export here (:func:`hf_tensors`, :func:`save_hf_weights`) is whole-model (TP = PP = EP = 1):
sharded export is ``hf_sharded.hf_tensor_stream``, a 100B-scale model is converted by ``klong-convert``.

Limits: MoE: no
group-limited routing (GLM ``n_group`` / ``topk_group`` must be 1), top-k weights must be renormalised
(``norm_topk_prob``), Qwen3-MoE sparse layers must be all but a leading ``mlp_only_layers`` prefix
(``decoder_sparse_step`` 1), no Megatron shared-expert gate, no grouped-GEMM expert layout. GLM's
multi-token-prediction layers (``model.layers.{num_hidden_layers}...``, ``num_nextn_predict_layers``)
are skipped on import and not written on export (the exported config says ``num_nextn_predict_layers: 0``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from klong_megatron.config.model import ModelConfig
from klong_megatron.megatron.hf_map import (  # noqa: F401  (re-exported: the mapping's public names)
    RUNTIME_BUFFERS as _RUNTIME_BUFFERS,
)
from klong_megatron.megatron.hf_map import (
    _dims,
    expert_weight_names,
    fuse_qkv,
    group_to_megatron,
    hf_group,
    hf_to_megatron,
    is_weight,
    layer_to_hf,
    megatron_to_hf,
    split_qkv,
)
from klong_megatron.megatron.safetensors_io import SafetensorsDir

_DENSE = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_MOE = ("Qwen3MoeForCausalLM", "Glm4MoeForCausalLM")
_SUPPORTED = _DENSE + _MOE
__all__ = ["expert_weight_names", "fuse_qkv", "hf_to_megatron", "layer_to_hf", "megatron_to_hf", "split_qkv"]


def model_config_from_hf(hf_dir: str | Path, seq_length: int | None = None) -> ModelConfig:
    """A ModelConfig matching ``hf_dir/config.json`` (raises ValueError for an unsupported architecture)."""
    c = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = (c.get("architectures") or ["?"])[0]
    if arch not in _SUPPORTED:
        raise ValueError(f"{hf_dir}/config.json: architecture {arch!r} is not supported (expected one of {_SUPPORTED})")
    heads = c["num_attention_heads"]
    moe = _moe_fields_from_hf(c, arch, hf_dir) if arch in _MOE else {}
    return ModelConfig(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads", heads),
        ffn_hidden_size=c["intermediate_size"],
        kv_channels=c.get("head_dim") or c["hidden_size"] // heads,
        vocab_size=c["vocab_size"],
        make_vocab_size_divisible_by=1,
        seq_length=seq_length or c.get("max_position_embeddings", 4096),
        rotary_base=int(c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000))),
        norm_epsilon=c.get("rms_norm_eps", 1e-6),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias", False)),
        qk_layernorm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM") or bool(c.get("use_qk_norm", False)),
        untie_embeddings=not c.get("tie_word_embeddings", False),
        **moe,
        **_rope_fields_from_hf(c, hf_dir),
    )


def _rope_fields_from_hf(c: dict[str, Any], hf_dir: str | Path) -> dict[str, Any]:
    """native_context and RoPE scaling from ``rope_scaling`` / ``rope_parameters`` (YaRN or none)."""
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"native_context": c.get("max_position_embeddings")}
    if kind != "yarn":
        raise ValueError(f"{hf_dir}/config.json: RoPE scaling {kind!r} is not supported (only yarn)")
    original = rope.get("original_max_position_embeddings") or c["max_position_embeddings"]
    beta_fast, beta_slow = float(rope.get("beta_fast", 32.0)), float(rope.get("beta_slow", 1.0))
    return dict(native_context=original, rope_scaling="yarn", rope_scaling_factor=float(rope["factor"]),
                yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow)  # fmt: skip


def _rope_scaling_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``rope_scaling`` dict of ``cfg`` (empty without scaling)."""
    if cfg.rope_scaling != "yarn":
        return {}
    return {"rope_type": "yarn", "factor": cfg.rope_scaling_factor, "original_max_position_embeddings":
            cfg.native_context, "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}  # fmt: skip


def _moe_fields_from_hf(c: dict[str, Any], arch: str, hf_dir: str | Path) -> dict[str, Any]:
    """The MoE (and partial-RoPE) ModelConfig fields of a Qwen3-MoE / GLM-4.5 ``config.json``."""

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{hf_dir}/config.json ({arch}): {what} is not supported")

    if c.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={c['hidden_act']!r}")
    if not c.get("norm_topk_prob", arch == "Glm4MoeForCausalLM"):
        raise unsupported("norm_topk_prob=false (un-renormalised top-k weights)")
    layers = c["num_hidden_layers"]
    out: dict[str, Any] = {"moe_ffn_hidden_size": c["moe_intermediate_size"],
                           "moe_router_topk": c["num_experts_per_tok"]}  # fmt: skip
    if arch == "Qwen3MoeForCausalLM":
        if c.get("attention_bias", False):
            raise unsupported("attention_bias=true (Qwen3-MoE puts a bias on o_proj too)")
        dense = list(c.get("mlp_only_layers") or [])
        if c.get("decoder_sparse_step", 1) != 1 or dense != list(range(len(dense))):
            raise unsupported(f"decoder_sparse_step={c.get('decoder_sparse_step')} / mlp_only_layers={dense} "
                              "(only a leading block of dense layers)")  # fmt: skip
        out.update(num_experts=c.get("num_experts") or c["num_local_experts"], moe_first_dense_layers=len(dense),
                   moe_router_score="softmax")  # fmt: skip
    else:  # Glm4MoeForCausalLM
        if c.get("n_group", 1) != 1 or c.get("topk_group", 1) != 1:
            raise unsupported(f"group-limited routing (n_group={c.get('n_group')}, topk_group={c.get('topk_group')})")
        shared = c.get("n_shared_experts", 1) or 0
        rope = c.get("rope_parameters") or {}
        out.update(
            num_experts=c.get("n_routed_experts") or c["num_local_experts"],
            moe_shared_expert_ffn_hidden_size=shared * c["moe_intermediate_size"] or None,
            moe_first_dense_layers=min(c.get("first_k_dense_replace", 1), layers),
            moe_router_score="sigmoid",
            moe_router_expert_bias=True,
            moe_routed_scaling=float(c.get("routed_scaling_factor", 1.0)),
            rotary_percent=float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5))),
        )
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _check_unsharded(model: torch.nn.Module) -> None:
    from megatron.core import parallel_state

    sizes = {"TP": parallel_state.get_tensor_model_parallel_world_size(),
             "PP": parallel_state.get_pipeline_model_parallel_world_size(),
             "EP": parallel_state.get_expert_model_parallel_world_size()}  # fmt: skip
    if any(v > 1 for v in sizes.values()):
        raise ValueError(f"HF export here needs the whole model in one process (TP=PP=EP=1, got {sizes}); a sharded "
                         "model streams with hf_sharded.hf_tensor_stream, a checkpoint converts with "
                         "klong-convert dist-to-hf")  # fmt: skip


def _own_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights and persistent buffers, without TE extra state and router runtime counters."""
    return {k: v for k, v in model.state_dict().items() if is_weight(k)}


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, cfg: ModelConfig) -> None:
    """Copy the HF checkpoint in ``hf_dir`` into ``model`` (this rank's GPTModel built from ``cfg``), exactly.

    Any TP / PP / EP layout, no communication: each rank reads only the HF tensors of the parameters it holds
    (its pipeline stage's layers, its experts; lazily, one group at a time), builds each full Megatron tensor
    and keeps its tensor-parallel slice. Peak extra memory: the largest group (the embedding, or q/k/v)."""
    from klong_megatron.megatron.hf_sharded import global_params, local_shard

    hf = SafetensorsDir(hf_dir)
    params = global_params(_unwrap(model))
    keys = set(hf)
    with torch.no_grad():
        for name, (local, full_shape) in params.items():
            g = hf_group(name, cfg, params, keys)
            full = group_to_megatron(g, hf, cfg, rows=full_shape[0] if g.kind == "vocab" else None)
            if tuple(full.shape) != full_shape:
                raise ValueError(f"{hf_dir}: {name} has shape {tuple(full.shape)}, model expects {full_shape} "
                                 "(check model config vs config.json)")  # fmt: skip
            local.copy_(local_shard(name, full, local))


def hf_config(cfg: ModelConfig, tokenizer: Any | None = None) -> dict[str, Any]:
    """The ``config.json`` of the HF model equal to ``cfg`` (Llama; Qwen2 with qkv bias; Qwen3 with qk norm).

    MoE configs become ``Qwen3MoeForCausalLM`` (softmax router) or ``Glm4MoeForCausalLM`` (sigmoid router);
    a ValueError names what neither family can express. The vocabulary is ``cfg.vocab_size`` (export cuts
    Megatron's padded rows). Inverse of :func:`model_config_from_hf` up to ``make_vocab_size_divisible_by``.
    """
    if cfg.is_moe:
        return _moe_hf_config(cfg, tokenizer)
    arch = "Qwen3ForCausalLM" if cfg.qk_layernorm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[arch]
    return {"architectures": [arch], "model_type": model_type, **_base_hf_config(cfg, tokenizer)}


def _base_hf_config(cfg: ModelConfig, tokenizer: Any | None) -> dict[str, Any]:
    """The ``config.json`` fields every supported family shares (attention, norms, vocabulary, tokens)."""
    d, groups, _ = _dims(cfg)
    out: dict[str, Any] = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": groups,
        "head_dim": d,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_length,
        "rope_theta": float(cfg.rotary_base),
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": not cfg.untie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = {**_rope_scaling_to_hf(cfg), "rope_theta": float(cfg.rotary_base)}
    if tokenizer is not None:
        out["eos_token_id"] = tokenizer.eos_token_id
        out["bos_token_id"] = tokenizer.bos_token_id
        out["pad_token_id"] = tokenizer.pad_token_id
    return out


def _moe_hf_config(cfg: ModelConfig, tokenizer: Any | None) -> dict[str, Any]:
    """:func:`hf_config` for an MoE ``cfg``: Qwen3-MoE (softmax router) or GLM-4.5 (sigmoid router)."""
    glm = cfg.moe_router_score == "sigmoid"
    arch = "Glm4MoeForCausalLM" if glm else "Qwen3MoeForCausalLM"
    shared = cfg.moe_shared_expert_ffn_hidden_size
    problems = []
    if glm:
        if not shared or shared % cfg.moe_ffn_hidden_size:
            problems.append(f"moe_shared_expert_ffn_hidden_size={shared} (a multiple of moe_ffn_hidden_size)")
    else:
        checks = {"a shared expert": shared, "moe_router_expert_bias": cfg.moe_router_expert_bias,
                  "qkv_bias": cfg.qkv_bias, "qk_layernorm=false": not cfg.qk_layernorm,
                  "moe_routed_scaling != 1": cfg.moe_routed_scaling != 1.0,
                  "rotary_percent != 1": cfg.rotary_percent != 1.0}  # fmt: skip
        problems += [k for k, v in checks.items() if v]
    if problems:
        raise ValueError(f"no HF {arch} equals this MoE config: {', '.join(problems)}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base), **_rope_scaling_to_hf(cfg)}
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "glm4_moe" if glm else "qwen3_moe",
        **_base_hf_config(cfg, tokenizer),
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "num_experts_per_tok": cfg.moe_router_topk,
        "norm_topk_prob": True,
        "rope_parameters": rope,
    }
    if glm:
        rope["partial_rotary_factor"] = cfg.rotary_percent
        out.update(n_routed_experts=cfg.num_experts, n_shared_experts=shared // cfg.moe_ffn_hidden_size,
                   first_k_dense_replace=cfg.moe_first_dense_layers, routed_scaling_factor=cfg.moe_routed_scaling,
                   partial_rotary_factor=cfg.rotary_percent, n_group=1, topk_group=1,
                   use_qk_norm=cfg.qk_layernorm, num_nextn_predict_layers=0)  # fmt: skip
    else:
        dense = list(range(cfg.moe_first_dense_layers))
        out.update(num_experts=cfg.num_experts, decoder_sparse_step=1, mlp_only_layers=dense)
    return out


def export_hf(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, tokenizer: Any) -> Path:
    """Write ``model`` as a self-contained HF checkpoint: safetensors, ``config.json`` and the tokenizer.

    This is what the rollout servers load (``/update_weights_from_disk``, ``klong-devserver``).
    """
    return write_hf_dir({k: v.cpu() for k, v in hf_tensors(model, cfg).items()}, cfg, out_dir, tokenizer)


def write_hf_dir(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, tokenizer: Any) -> Path:
    """Write HF-named CPU ``tensors`` (``hf_tensors`` / ``hf_sharded.hf_tensor_stream``) as a self-contained HF
    checkpoint: ``model.safetensors``, ``config.json`` (dtype of the tensors: bf16 when trained in bf16) and
    the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg, tokenizer)
    dtype = next(iter(tensors.values())).dtype
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def hf_tensors(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF names (what ``/update_weights_from_distributed`` sends).

    Tensors stay on the model's device and dtype, detached; names and layout are those of
    :func:`save_hf_weights` (vocabulary padding cut). Whole model only (TP = PP = 1).
    """
    _check_unsharded(model)
    sd = {k: v.detach() for k, v in _own_state(_unwrap(model)).items()}
    return megatron_to_hf(sd, cfg)


def save_hf_weights(
    model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, hf_dir: str | Path | None = None
) -> Path:
    """Write ``model`` as HF safetensors into ``out_dir``, with config/tokenizer files copied from ``hf_dir``."""
    tensors = {k: v.cpu() for k, v in hf_tensors(model, cfg).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(hf_dir).iterdir() if hf_dir is not None else ():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            shutil.copy2(f, out / f.name)
    return out
