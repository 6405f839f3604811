"""GPT model provider on ``megatron.core``: ModelConfig -> TransformerConfig -> GPTModel.

One adapter for the optional Transformer Engine dependency: ``HAVE_TE`` says whether it imports.
``transformer_impl="auto"`` takes the TE layer spec when TE is importable (GPU clusters) and the
local (pure torch) spec otherwise, warning once; ``"te"`` requires TE, ``"local"`` forbids it.

Attention inputs differ per spec: the local spec takes a block-diagonal causal mask ``[B,1,S,S]``
(True = masked out) for packed windows; the TE spec takes ``PackedSeqParams(qkv_format="thd")``.
:func:`uses_packed_seq_params` tells the step function which one to build.

Usage (after ``parallel_state.initialize_model_parallel`` and, on CPU, ``apply_cpu_compat()``)::

    model = build_gpt(model_cfg, parallel=ParallelConfig(tp=2))   # first/last PP stage from parallel_state
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig

log = logging.getLogger(__name__)

try:  # optional heavy dependency: installed in GPU cluster images only
    import transformer_engine  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except Exception:  # ImportError, or a broken CUDA extension
    HAVE_TE = False


def _patch_moe_router_without_te() -> None:
    """megatron-core 0.16.1 defines ``moe_utils.te_general_gemm`` only when TE imports, but the MoE router
    reads it unconditionally (NameError without TE). Defining it as None is what that code expects."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_expert_bias_padding_mask() -> None:
    """megatron-core 0.16.1 ``TopKRouter._apply_expert_bias`` masks ``routing_map`` ``[tokens, experts]`` with the
    ``[tokens]`` padding mask without a trailing axis: it raises (broadcast) whenever the expert bias and a
    padding mask meet. Give the mask that axis; idempotent."""
    from megatron.core.transformer.moe.router import TopKRouter

    if getattr(TopKRouter, "_klong_padding_axis", False):
        return
    original = TopKRouter._apply_expert_bias

    def apply_expert_bias(self, routing_map, padding_mask=None):
        if padding_mask is not None and padding_mask.dim() == routing_map.dim() - 1:
            padding_mask = padding_mask.unsqueeze(-1)
        return original(self, routing_map, padding_mask=padding_mask)

    TopKRouter._apply_expert_bias = apply_expert_bias
    TopKRouter._klong_padding_axis = True


def resolve_impl(cfg: ModelConfig, have_te: bool | None = None, on_gpu: bool | None = None) -> str:
    """``"te"`` or ``"local"`` for ``cfg.transformer_impl`` given whether TE imports (default: ``HAVE_TE``).

    On a GPU (``on_gpu``, default: CUDA available) ``auto`` without TE is an error: the local spec
    needs a dense ``[B,1,S,S]`` mask (4.3 GB per 64k-token sample) and runs out of memory instead.
    ``model.transformer_impl=local`` waives it explicitly.
    """
    have_te = HAVE_TE if have_te is None else have_te
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if cfg.transformer_impl == "te" and not have_te:
        raise ValueError("model.transformer_impl=te but transformer_engine is not importable; use auto or local")
    if cfg.transformer_impl == "auto" and on_gpu and not have_te:
        raise ValueError(
            "transformer_engine is not importable on this GPU node (model.transformer_impl=auto): use the training "
            "image (tools/images/train.Dockerfile) or install the train-gpu extra; model.transformer_impl=local runs "
            "Megatron's local spec instead (dense attention masks: short sequences only)"
        )
    if cfg.transformer_impl == "local" or not have_te:  # CPU: the runs' "implementation:" line says so
        return "local"
    return "te"


def layer_spec(
    cfg: ModelConfig, have_te: bool | None = None, config: TransformerConfig | None = None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The transformer layer spec for ``cfg`` (TE or local, see :func:`resolve_impl`).

    An MoE model gets a block spec with one entry per layer of this pipeline stage (``config``, the
    model's TransformerConfig; default: ``to_transformer_config(cfg)``): dense MLPs for the first
    ``moe_first_dense_layers``, MoE MLPs after.
    """
    te = resolve_impl(cfg, have_te) == "te"
    if cfg.is_moe:
        config = config or to_transformer_config(cfg)
        return get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm")
    if te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")


def uses_packed_seq_params(cfg: ModelConfig) -> bool:
    """True when attention takes THD ``PackedSeqParams`` (TE), False for a ``[B,1,S,S]`` mask (local)."""
    return resolve_impl(cfg) == "te"


def to_transformer_config(
    cfg: ModelConfig, parallel: ParallelConfig | None = None, *, bf16: bool = False
) -> TransformerConfig:
    """The one converter from our dataclasses to Megatron's ``TransformerConfig``.

    ``bf16`` selects bf16 params/compute (GPU); fp32 otherwise. Fusions (:func:`fusion_fields`) are on
    with Transformer Engine and off on the local spec (CPU). YaRN RoPE scaling sets the ``yarn_*``
    attributes megatron-core's ``YarnRotaryEmbedding`` and attention read (they exist on
    ``MLATransformerConfig`` only, so they are set on the instance).
    """
    parallel = parallel or ParallelConfig()
    dtype = torch.bfloat16 if bf16 else torch.float32
    te = resolve_impl(cfg) == "te"
    config = TransformerConfig(
        **fusion_fields(cfg, te),
        **_moe_fields(cfg, parallel),
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        attention_dropout=cfg.attention_dropout,
        hidden_dropout=cfg.hidden_dropout,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
        persist_layer_norm=False,
        # THD micro-batches padded for CP / SP vary in length: the pipeline exchanges shapes first
        variable_seq_lengths=te and parallel.pp > 1 and (parallel.cp > 1 or parallel.sequence_parallel),
        recompute_granularity=parallel.recompute_granularity,
        recompute_method="uniform" if parallel.recompute_granularity == "full" else None,
        recompute_num_layers=1 if parallel.recompute_granularity == "full" else None,
    )
    if cfg.rope_scaling == "yarn":
        config.yarn_rotary_scaling_factor = cfg.rope_scaling_factor
        config.yarn_original_max_position_embeddings = cfg.native_context
        config.yarn_beta_fast, config.yarn_beta_slow = cfg.yarn_beta_fast, cfg.yarn_beta_slow
        config.yarn_mscale, config.yarn_mscale_all_dim = 1.0, 0.0  # HF default: attention factor 0.1 ln(s) + 1
        config.yarn_correction_range_round_to_int = True  # HF's truncate=True
    return config


def _have_apex_grad_accum() -> bool:
    """Megatron's ``gradient_accumulation_fusion`` needs Apex's ``fused_weight_gradient_mlp_cuda`` (output layer)."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusion_fields(cfg: ModelConfig, te: bool, have_apex_grad_accum: bool | None = None) -> dict:
    """Kernel fusions: all on with Transformer Engine (GPU), all off on the local spec (CPU).

    RoPE fusion stays off under YaRN: megatron-core 0.16.1's fused THD RoPE drops YaRN's attention
    factor (``rope_utils.apply_rotary_pos_emb`` passes ``mscale`` only to the unfused kernels).
    Gradient-accumulation fusion also needs Apex (in NVIDIA's PyTorch images).
    """
    if not te:
        return dict(bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                    apply_rope_fusion=False, gradient_accumulation_fusion=False)  # fmt: skip
    have_apex = _have_apex_grad_accum() if have_apex_grad_accum is None else have_apex_grad_accum
    return dict(
        bias_activation_fusion=True,
        masked_softmax_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=cfg.rope_scaling is None,
        gradient_accumulation_fusion=have_apex,
    )


def _moe_fields(cfg: ModelConfig, parallel: ParallelConfig) -> dict:
    """The MoE part of the TransformerConfig (empty for a dense model)."""
    if not cfg.is_moe:
        return {}
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_ffn_hidden_size,
        moe_layer_freq=cfg.moe_layer_pattern(),
        moe_router_score_function=cfg.moe_router_score,
        moe_router_enable_expert_bias=cfg.moe_router_expert_bias,
        moe_router_topk_scaling_factor=cfg.moe_routed_scaling if cfg.moe_routed_scaling != 1.0 else None,
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_token_dispatcher_type=cfg.moe_token_dispatcher,
        moe_router_dtype="fp32",  # routing scores and top-k in fp32 under bf16 (Megatron's recommendation)
        moe_grouped_gemm=cfg.moe_grouped_gemm,
        expert_model_parallel_size=parallel.ep,
    )


def build_gpt(
    cfg: ModelConfig,
    *,
    parallel: ParallelConfig | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    bf16: bool = False,
) -> GPTModel:
    """Build this rank's part of the GPT model (needs ``parallel_state`` initialised).

    ``pre_process`` / ``post_process`` (embedding / output layer present) default to whether this
    rank is the first / last pipeline stage. Output logits: ``[B, S, padded_vocab / TP]``; with
    ``labels`` the model returns per-token cross entropy ``[B, S]`` (fp32).
    """
    parallel = parallel or ParallelConfig()
    if cfg.is_moe:
        _patch_moe_router_without_te()
        _patch_expert_bias_padding_mask()
        if cfg.moe_token_dispatcher == "alltoall" and not torch.cuda.is_available():
            raise ValueError("model.moe_token_dispatcher=alltoall needs CUDA (it waits on CUDA events); use allgather")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    config = to_transformer_config(cfg, parallel, bf16=bf16)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, config=config),
        vocab_size=cfg.padded_vocab_size(parallel.tp),
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.untie_embeddings,
        position_embedding_type="yarn" if cfg.rope_scaling == "yarn" else "rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
    )
    if not torch.cuda.is_available():
        return model
    return model.cuda(torch.cuda.current_device())


_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")
_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")
_GROUPED_EXPERT = re.compile(r"\.experts\.(linear_fc[12])\.weight(\d+)$")  # TE GroupedLinear: weight{e}


def init_layout_independent(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Re-initialise every parameter from its *global* name, so any TP/PP layout starts from the same model.

    Megatron draws initial weights in build order on each rank, so a pipeline stage that builds only
    layers 2-3 draws different numbers than one process building layers 0-3. Here each parameter's
    full (unsharded) tensor comes from a generator seeded by ``(seed, global name)`` and this rank
    keeps its tensor-parallel shard. Same distributions as Megatron's defaults: N(0, std) weights,
    N(0, std / sqrt(2 L)) for the output projections of attention and MLP, ones for norms, zero biases.
    """
    offset = get_transformer_layer_offset(model.config)
    tp, tp_rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    # expert parallelism: this rank holds routed experts [ep_rank * local, (ep_rank + 1) * local)
    ep, ep_rank = parallel_state.get_expert_model_parallel_world_size(), parallel_state.get_expert_model_parallel_rank()
    expert_offset = ep_rank * (cfg.num_experts or 0) // ep
    for name, param in model.named_parameters():
        global_name = _LAYER.sub(lambda m: f"{m[1]}{int(m[2]) + offset}{m[3]}", name)
        global_name = _EXPERT.sub(lambda m: f"{m[1]}{int(m[2]) + expert_offset}{m[3]}", global_name)
        # grouped GEMM experts get the SequentialMLP name (and so the same initial weights)
        global_name = _GROUPED_EXPERT.sub(
            lambda m: f".experts.local_experts.{int(m[2]) + expert_offset}.{m[1]}.weight", global_name
        )
        if global_name == "output_layer.weight" and not cfg.untie_embeddings:
            global_name = "embedding.word_embeddings.weight"  # tied: the last stage's copy of the embedding
        shape = list(param.shape)
        dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
        if dim >= 0:
            shape[dim] *= tp
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
        if "norm" in name:
            full = torch.ones(shape)
        elif name.endswith("bias"):
            full = torch.zeros(shape)
        else:
            std = cfg.init_method_std
            if global_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                std /= math.sqrt(2.0 * cfg.num_layers)
            full = torch.empty(shape).normal_(0.0, std, generator=gen)
        if dim >= 0:  # a strided layout (SwiGLU fc1: [gate | up]) shards each of the `stride` parts
            stride = getattr(param, "partition_stride", 1)
            full = torch.cat([part.chunk(tp, dim=dim)[tp_rank] for part in full.chunk(stride, dim=dim)], dim=dim)
        with torch.no_grad():
            param.copy_(full.to(param.dtype))
