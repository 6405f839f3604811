"""The one HF <-> Megatron name/layout mapping, per parameter: used by import, export, the sharded push and
the streaming converter alike.

    g = hf_group("decoder.layers.3.self_attention.linear_qkv.weight", cfg, names)
    g.kind, g.hf   # "qkv", ("model.layers.3.self_attn.q_proj.weight", "...k_proj.weight", "...v_proj.weight")
    full = group_to_megatron(g, hf_tensors, cfg)   # HF tensors -> the unsharded Megatron tensor
    group_to_hf(g, full, cfg)                      # inverse: {HF name: tensor}

A *group* is one Megatron parameter (its global, unsharded name and value) and the HF tensors it is made
of. Every conversion is a loop over groups, so memory is bounded by the largest group (an embedding, or
q/k/v and their fused ``linear_qkv``), and a process can convert only the groups it owns (a TP/PP/EP shard,
one tensor of a streaming conversion). Kinds:

    same   one HF tensor as is (``index`` e: expert e of transformers' fused ``[E, ...]`` layout, import only)
    vocab  embedding / lm head: zero rows padded to Megatron's padded vocabulary on import, cut on export
    qkv    q/k/v fused into ``linear_qkv`` in Megatron's grouped order (per KV group: its queries, k, v)
    cat    gate/up stacked into SwiGLU ``linear_fc1`` as ``[gate; up]``
    router a GLM router built without ``expert_bias``: export adds a zero ``e_score_correction_bias``

Names (``names`` = the model's global parameter names, so the TE / local spec and SequentialMLP / grouped-GEMM
experts are told apart): see the table in ``megatron/hf.py``. A Megatron name without an HF counterpart is
a KeyError naming it; ``_extra_state`` and router runtime counters are never converted (:func:`is_weight`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch

from klong_megatron.config.model import ModelConfig

RUNTIME_BUFFERS = ("local_tokens_per_expert", "global_tokens_per_expert", "ga_steps")
"""Router counters Megatron keeps as buffers: state of a run, not weights; never imported or exported."""
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))")


def is_weight(name: str) -> bool:
    """True for a Megatron state-dict entry that is converted (not TE extra state, not a runtime counter)."""
    return not name.endswith("_extra_state") and name.rsplit(".", 1)[-1] not in RUNTIME_BUFFERS


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


def layer_map(names: Collection[str], i: int) -> dict[str, str]:
    """Megatron layer-i one-to-one names -> HF names, for whichever spec the model was built with."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    te = f"{m}self_attention.linear_qkv.layer_norm_weight" in names
    moe = f"{m}mlp.router.weight" in names  # an MoE layer keeps a separate pre-MLP norm under TE too
    return {
        (f"{m}self_attention.linear_qkv.layer_norm_weight" if te else f"{m}input_layernorm.weight"): (
            f"{h}input_layernorm.weight"
        ),
        (f"{m}mlp.linear_fc1.layer_norm_weight" if te and not moe else f"{m}pre_mlp_layernorm.weight"): (
            f"{h}post_attention_layernorm.weight"
        ),
        f"{m}self_attention.linear_proj.weight": f"{h}self_attn.o_proj.weight",
        f"{m}mlp.linear_fc2.weight": f"{h}mlp.down_proj.weight",
        f"{m}self_attention.q_layernorm.weight": f"{h}self_attn.q_norm.weight",
        f"{m}self_attention.k_layernorm.weight": f"{h}self_attn.k_norm.weight",
        f"{m}mlp.router.expert_bias": f"{h}mlp.gate.e_score_correction_bias",
        f"{m}mlp.shared_experts.linear_fc2.weight": f"{h}mlp.shared_experts.down_proj.weight",
    }


def expert_weight_names(prefix: str, e: int, names: Collection[str]) -> tuple[str, str]:
    """Megatron names of routed expert ``e``'s fc1 / fc2 weights under ``prefix`` (``decoder.layers.i.mlp.``):
    TE grouped GEMM (``model.moe_grouped_gemm``: ``experts.linear_fc1.weight{e}``, TE ``GroupedLinear``'s
    names) when ``names`` holds them, else SequentialMLP (``experts.local_experts.{e}.linear_fc1.weight``)."""
    grouped = f"{prefix}experts.linear_fc1.weight{e}"
    if grouped in names:
        return grouped, f"{prefix}experts.linear_fc2.weight{e}"
    me = f"{prefix}experts.local_experts.{e}."
    return f"{me}linear_fc1.weight", f"{me}linear_fc2.weight"


@dataclass(frozen=True)
class HFGroup:
    """One Megatron parameter's HF tensors: ``kind`` (see the module docstring), their names, fused index."""

    kind: str
    hf: tuple[str, ...]
    index: int | None = None


def hf_group(name: str, cfg: ModelConfig, names: Collection[str], hf_keys: Collection[str] | None = None) -> HFGroup:
    """The group of Megatron parameter ``name`` (a global name, in ``names``). ``hf_keys`` (import only): the
    HF checkpoint's names, to read a tied lm head from the embedding and experts from the fused layout."""
    if name == "embedding.word_embeddings.weight":
        return HFGroup("vocab", ("model.embed_tokens.weight",))
    if name == "output_layer.weight":
        tied = hf_keys is not None and "lm_head.weight" not in hf_keys
        return HFGroup("vocab", ("model.embed_tokens.weight" if tied else "lm_head.weight",))
    if name == "decoder.final_layernorm.weight":
        return HFGroup("same", ("model.norm.weight",))
    m = _LAYER.fullmatch(name)
    if m is None:
        raise KeyError(f"{name}: no HF counterpart")
    i, rest = int(m[1]), m[2]
    one = layer_map(names, i).get(name)
    if one is not None:
        return HFGroup("same", (one,))
    a, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return HFGroup("qkv", (f"{a}q_proj.{kind}", f"{a}k_proj.{kind}", f"{a}v_proj.{kind}"))
    if rest in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
        p = mlp + ("shared_experts." if "shared" in rest else "")
        return HFGroup("cat", (f"{p}gate_proj.weight", f"{p}up_proj.weight"))
    if rest == "mlp.router.weight":
        bias = f"decoder.layers.{i}.mlp.router.expert_bias" in names
        if not bias and hf_keys is not None and f"{mlp}gate.e_score_correction_bias" in hf_keys:
            raise KeyError(f"HF layer {i} has gate.e_score_correction_bias but the model has no router.expert_bias "
                           "(set model.moe_router_expert_bias=true)")  # fmt: skip
        glm_zero_bias = not bias and cfg.moe_router_score == "sigmoid"  # GLM always has the buffer
        return HFGroup("router" if glm_zero_bias else "same", (f"{mlp}gate.weight",))
    if rest == "mlp.shared_experts.gate_weight":
        raise ValueError(f"{name}: a gated shared expert has no HF counterpart")
    e = _EXPERT.fullmatch(rest)
    if e is None:
        raise KeyError(f"{name}: no HF counterpart")
    idx, fc = int(e[1] if e[1] is not None else e[4]), e[2] or e[3]
    if hf_keys is not None and f"{mlp}experts.gate_up_proj" in hf_keys:  # transformers' fused [E, 2I, H] / [E, H, I]
        return HFGroup("same", (f"{mlp}experts.{'gate_up_proj' if fc == 'linear_fc1' else 'down_proj'}",), idx)
    x = f"{mlp}experts.{idx}."
    if fc == "linear_fc1":
        return HFGroup("cat", (f"{x}gate_proj.weight", f"{x}up_proj.weight"))
    return HFGroup("same", (f"{x}down_proj.weight",))


def group_to_megatron(
    g: HFGroup, hf: Mapping[str, torch.Tensor], cfg: ModelConfig, rows: int | None = None
) -> torch.Tensor:
    """The unsharded Megatron tensor of group ``g`` from ``hf`` (reads only ``g.hf``). ``rows``: the padded
    vocabulary of a ``vocab`` group (default ``cfg.padded_vocab_size()``)."""
    missing = [n for n in g.hf if n not in hf]
    if missing:
        raise KeyError(f"HF checkpoint does not provide {missing[0]}")
    ts = [hf[n] for n in g.hf]
    if g.kind == "qkv":
        return fuse_qkv(*ts, cfg)
    if g.kind == "cat":
        return torch.cat(ts)
    t = ts[0] if g.index is None else ts[0][g.index]
    if g.kind != "vocab":
        return t
    rows = rows or cfg.padded_vocab_size()
    if t.shape[0] > rows:
        raise ValueError(f"{g.hf[0]} has {t.shape[0]} rows, more than the model's vocabulary ({rows})")
    padded = t.new_zeros(rows, *t.shape[1:])
    padded[: t.shape[0]] = t
    return padded


def group_to_hf(g: HFGroup, t: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`group_to_megatron`: ``{HF name: tensor}`` (views of ``t`` where possible)."""
    if g.kind == "qkv":
        return dict(zip(g.hf, split_qkv(t, cfg), strict=True))
    if g.kind == "cat":
        return dict(zip(g.hf, t.chunk(2), strict=True))
    if g.kind == "vocab":
        return {g.hf[0]: t[: cfg.vocab_size]}
    if g.kind == "router":
        bias = g.hf[0].replace("gate.weight", "gate.e_score_correction_bias")
        return {g.hf[0]: t, bias: t.new_zeros(cfg.num_experts, dtype=torch.float32)}
    return {g.hf[0]: t}


def exported_names(names: Iterable[str], cfg: ModelConfig) -> list[str]:
    """The Megatron names that export writes, in order (weights only; a tied output layer is the embedding)."""
    return [n for n in names if is_weight(n) and (n != "output_layer.weight" or cfg.untie_embeddings)]


def hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, names: Collection[str]) -> dict[str, torch.Tensor]:
    """Megatron state dict (the weights among ``names``) from an HF state dict (or a lazy mapping)."""
    keys = set(hf.keys())
    return {n: group_to_megatron(hf_group(n, cfg, names, keys), hf, cfg) for n in names if is_weight(n)}


def megatron_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict from a full (unsharded) Megatron state dict; vocabulary padding is cut."""
    out: dict[str, torch.Tensor] = {}
    for name in exported_names(sd, cfg):
        out.update(group_to_hf(hf_group(name, cfg, sd), sd[name], cfg))
    return {k: t.contiguous() for k, t in out.items()}


def layer_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """HF tensors of decoder layer ``i`` from the full (unsharded) Megatron tensors ``decoder.layers.{i}.*``."""
    prefix = f"decoder.layers.{i}."
    return megatron_to_hf({k: v for k, v in sd.items() if k.startswith(prefix)}, cfg)
