"""Hugging Face <-> Megatron weights for Llama / Qwen2 / Qwen3-family decoders (safetensors, local dirs).

    cfg = model_config_from_hf(hf_dir, seq_length=8192)   # ModelConfig from config.json
    load_hf_weights(megatron_model, hf_dir, cfg)          # HF tensors -> this GPTModel
    save_hf_weights(megatron_model, cfg, out_dir, hf_dir) # GPTModel -> HF safetensors (+ config, tokenizer)
    hf_tensors(megatron_model, cfg)                       # GPTModel -> {HF name: tensor} (weight sync)

Name/layout mapping (local and Transformer Engine specs): q/k/v projections are fused into
``linear_qkv`` in Megatron's grouped order (per KV group: its query heads, then k, then v);
gate/up into ``linear_fc1`` as ``[gate; up]``; RMSNorm weights map one to one (TE keeps the
pre-attention / pre-MLP norms inside ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``).
The embedding is padded with zero rows to the padded vocabulary on import and cut on export.

Limits: whole-model conversion in one process (TP=1, PP=1). For a sharded run, import at TP=1,
save a ``dist_checkpointing`` checkpoint and load it with any TP/PP (it reshards on load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from klong_megatron.config.model import ModelConfig

_SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def model_config_from_hf(hf_dir: str | Path, seq_length: int | None = None) -> ModelConfig:
    """A ModelConfig matching ``hf_dir/config.json`` (raises ValueError for an unsupported architecture)."""
    c = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = (c.get("architectures") or ["?"])[0]
    if arch not in _SUPPORTED:
        raise ValueError(f"{hf_dir}/config.json: architecture {arch!r} is not supported (expected one of {_SUPPORTED})")
    heads = c["num_attention_heads"]
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
        qk_layernorm=arch == "Qwen3ForCausalLM",
        untie_embeddings=not c.get("tie_word_embeddings", False),
    )


def _read_hf(hf_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _dims(cfg: ModelConfig) -> tuple[int, int, int]:
    d = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_query_groups or cfg.num_attention_heads
    return d, groups, cfg.num_attention_heads // groups


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v ``[heads*d, ...]`` -> Megatron ``linear_qkv`` ``[groups*(per_group+2)*d, ...]``."""
    d, groups, per = _dims(cfg)
    rest = q.shape[1:]
    q = q.reshape(groups, per * d, *rest)
    k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    d, groups, per = _dims(cfg)
    rest = qkv.shape[1:]
    g = qkv.reshape(groups, (per + 2) * d, *rest)
    q, k, v = g[:, : per * d], g[:, per * d : (per + 1) * d], g[:, (per + 1) * d :]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _layer_map(names: set[str], i: int) -> dict[str, str]:
    """Megatron layer-i norm names -> HF names, for whichever spec the model was built with."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    te = f"{m}self_attention.linear_qkv.layer_norm_weight" in names
    return {
        (f"{m}self_attention.linear_qkv.layer_norm_weight" if te else f"{m}input_layernorm.weight"): (
            f"{h}input_layernorm.weight"
        ),
        (f"{m}mlp.linear_fc1.layer_norm_weight" if te else f"{m}pre_mlp_layernorm.weight"): (
            f"{h}post_attention_layernorm.weight"
        ),
        f"{m}self_attention.linear_proj.weight": f"{h}self_attn.o_proj.weight",
        f"{m}mlp.linear_fc2.weight": f"{h}mlp.down_proj.weight",
        f"{m}self_attention.q_layernorm.weight": f"{h}self_attn.q_norm.weight",
        f"{m}self_attention.k_layernorm.weight": f"{h}self_attn.k_norm.weight",
    }


def hf_to_megatron(hf: dict[str, torch.Tensor], cfg: ModelConfig, names: set[str]) -> dict[str, torch.Tensor]:
    """Megatron state dict (only keys in ``names``) from an HF state dict."""
    out: dict[str, torch.Tensor] = {}
    emb = hf["model.embed_tokens.weight"]
    padded = torch.zeros(cfg.padded_vocab_size(), emb.shape[1], dtype=emb.dtype)
    padded[: emb.shape[0]] = emb
    out["embedding.word_embeddings.weight"] = padded
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if "output_layer.weight" in names:
        head = hf.get("lm_head.weight", emb)
        out["output_layer.weight"] = torch.zeros_like(padded)
        out["output_layer.weight"][: head.shape[0]] = head
    for i in range(cfg.num_layers):
        h, m = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
        for meg, hfk in _layer_map(names, i).items():
            if meg in names:
                out[meg] = hf[hfk]
        out[f"{m}self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[f"{h}q_proj.weight"], hf[f"{h}k_proj.weight"], hf[f"{h}v_proj.weight"], cfg
        )
        if cfg.qkv_bias:
            out[f"{m}self_attention.linear_qkv.bias"] = fuse_qkv(
                hf[f"{h}q_proj.bias"], hf[f"{h}k_proj.bias"], hf[f"{h}v_proj.bias"], cfg
            )
        mlp = f"model.layers.{i}.mlp."
        out[f"{m}mlp.linear_fc1.weight"] = torch.cat([hf[f"{mlp}gate_proj.weight"], hf[f"{mlp}up_proj.weight"]])
    missing = names - out.keys() - {n for n in names if n.endswith("_extra_state")}
    if missing:
        raise KeyError(f"HF checkpoint does not provide Megatron parameters: {sorted(missing)[:5]}")
    return out


def megatron_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict from a full (TP=1, PP=1) Megatron state dict; vocabulary padding is cut."""
    v = cfg.vocab_size
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:v],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}  # fmt: skip
    if cfg.untie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"][:v]
    names = set(sd)
    for i in range(cfg.num_layers):
        h, m = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
        for meg, hfk in _layer_map(names, i).items():
            if meg in sd:
                out[hfk] = sd[meg]
        q, k, vv = split_qkv(sd[f"{m}self_attention.linear_qkv.weight"], cfg)
        out.update({f"{h}q_proj.weight": q, f"{h}k_proj.weight": k, f"{h}v_proj.weight": vv})
        if cfg.qkv_bias:
            q, k, vv = split_qkv(sd[f"{m}self_attention.linear_qkv.bias"], cfg)
            out.update({f"{h}q_proj.bias": q, f"{h}k_proj.bias": k, f"{h}v_proj.bias": vv})
        gate, up = sd[f"{m}mlp.linear_fc1.weight"].chunk(2)
        out[f"model.layers.{i}.mlp.gate_proj.weight"] = gate
        out[f"model.layers.{i}.mlp.up_proj.weight"] = up
    return {k: t.contiguous() for k, t in out.items()}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _check_unsharded(model: torch.nn.Module) -> None:
    from megatron.core import parallel_state

    if (
        parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size()
        > 1
    ):
        raise ValueError("HF conversion runs on the whole model (TP=1, PP=1); convert first, then load the "
                         "dist checkpoint at any TP/PP")  # fmt: skip


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, cfg: ModelConfig) -> None:
    """Copy the HF checkpoint in ``hf_dir`` into ``model`` (a GPTModel built from ``cfg``), exactly."""
    _check_unsharded(model)
    model = _unwrap(model)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    new = hf_to_megatron(_read_hf(Path(hf_dir)), cfg, set(own))
    with torch.no_grad():
        for name, tensor in new.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, model expects "
                                 f"{tuple(own[name].shape)} (check model config vs config.json)")  # fmt: skip
            own[name].copy_(tensor)


def hf_config(cfg: ModelConfig, tokenizer: Any | None = None) -> dict[str, Any]:
    """The ``config.json`` of the HF model equal to ``cfg`` (Llama; Qwen2 with qkv bias; Qwen3 with qk norm).

    The vocabulary is ``cfg.vocab_size`` (export cuts Megatron's padded rows). Inverse of
    :func:`model_config_from_hf` up to ``make_vocab_size_divisible_by``.
    """
    arch = "Qwen3ForCausalLM" if cfg.qk_layernorm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    d, groups, _ = _dims(cfg)
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[arch],
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
    if tokenizer is not None:
        out["eos_token_id"] = tokenizer.eos_token_id
        out["bos_token_id"] = tokenizer.bos_token_id
        out["pad_token_id"] = tokenizer.pad_token_id
    return out


def export_hf(model: torch.nn.Module, cfg: ModelConfig, out_dir: str | Path, tokenizer: Any) -> Path:
    """Write ``model`` as a self-contained HF checkpoint: safetensors, ``config.json`` and the tokenizer.

    This is what the rollout servers load (``/update_weights_from_disk``, ``klong-devserver``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer), indent=2))
    tokenizer.save_pretrained(str(out))
    return save_hf_weights(model, cfg, out)


def hf_tensors(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF names (what ``/update_weights_from_distributed`` sends).

    Tensors stay on the model's device and dtype, detached; names and layout are those of
    :func:`save_hf_weights` (vocabulary padding cut). Whole model only (TP = PP = 1).
    """
    _check_unsharded(model)
    sd = {k: v.detach() for k, v in _unwrap(model).state_dict().items() if not k.endswith("_extra_state")}
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
