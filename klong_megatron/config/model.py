"""Schema of the GPT model architecture (``model=`` group). Parallelism lives in the trainer config."""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """A Llama/Qwen/GLM-family decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional MoE MLPs."""

    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int | None = None
    """Key/value heads (GQA); None means as many as attention heads (MHA)."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 * hidden_size."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size // num_attention_heads."""
    vocab_size: int = MISSING
    """Embedding rows; padded up to a multiple of ``make_vocab_size_divisible_by`` x TP."""
    make_vocab_size_divisible_by: int = 128
    seq_length: int = MISSING
    """Longest sequence the model is built for (RoPE cache); the packed training length must fit."""
    rotary_base: int = 10000
    native_context: int | None = None
    """Context the checkpoint was trained on without RoPE scaling (HF ``max_position_embeddings``, or
    ``rope_scaling.original_max_position_embeddings``); longer sequences need ``rope_scaling``. None: unchecked."""
    rope_scaling: str | None = None
    """None (plain RoPE) or "yarn" (YaRN, HF ``rope_scaling: {rope_type: yarn}``): extends native_context by
    rope_scaling_factor, with the attention factor 0.1 ln(factor) + 1 on cos/sin (HF's default)."""
    rope_scaling_factor: float = 1.0
    """YaRN factor: the usable context is native_context x rope_scaling_factor."""
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    rotary_percent: float = 1.0
    """Share of each head's dimensions that get RoPE (GLM-4.5: 0.5; the first ones, non-interleaved)."""
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False
    """Qwen2 uses bias on q/k/v projections."""
    qk_layernorm: bool = False
    """Qwen3 normalises queries and keys per head."""
    untie_embeddings: bool = True
    """Separate output layer (Llama/Qwen >= 7B); False ties it to the input embedding."""
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    transformer_impl: str = "auto"
    """"auto" (Transformer Engine when importable), "te" (required), or "local" (torch only)."""
    num_experts: int | None = None
    """Routed experts per MoE layer; None means a dense model (every other moe_* field is ignored)."""
    moe_ffn_hidden_size: int | None = None
    """MLP width of one routed expert (required with num_experts)."""
    moe_router_topk: int = 2
    """Experts each token is sent to."""
    moe_shared_expert_ffn_hidden_size: int | None = None
    """Total width of the always-on shared expert(s) (GLM-4.5: n_shared_experts x expert width); None: none."""
    moe_first_dense_layers: int = 0
    """The first k layers keep a dense MLP of ffn_hidden_size (GLM-4.5: first_k_dense_replace)."""
    moe_router_score: str = "softmax"
    """Router scores: "softmax" (Qwen3-MoE) or "sigmoid" (GLM-4.5); the top-k weights are renormalised."""
    moe_router_expert_bias: bool = False
    """Aux-loss-free load balancing: a per-expert bias added for selection only (GLM-4.5's e_score_correction_bias)."""
    moe_routed_scaling: float = 1.0
    """Factor on the routed experts' weights (GLM-4.5: routed_scaling_factor)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss weight (0: none)."""
    moe_token_dispatcher: str = "alltoall"
    """Megatron token dispatcher: "alltoall" (GPU clusters) or "allgather" (also works on CPU)."""
    moe_grouped_gemm: bool = False
    """All local experts in one grouped GEMM (TE GroupedLinear; needs Transformer Engine). HF import/export map
    its weight names; off by default until validated on a GPU (the sharded RL weight push assumes SequentialMLP)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            value = getattr(self, name)
            if value is not MISSING and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        heads, hidden = self.num_attention_heads, self.hidden_size
        if heads is MISSING or hidden is MISSING:
            return
        if self.kv_channels is None and hidden % heads:
            raise ValueError(f"hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})")
        if self.num_query_groups is not None and (self.num_query_groups < 1 or heads % self.num_query_groups):
            raise ValueError(f"num_query_groups ({self.num_query_groups}) must divide num_attention_heads ({heads})")
        if self.transformer_impl not in ("auto", "te", "local"):
            raise ValueError(f"transformer_impl must be auto, te or local, got {self.transformer_impl!r}")
        if not 0.0 <= self.attention_dropout < 1.0 or not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError("attention_dropout and hidden_dropout must be in [0, 1)")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        self._check_rope_scaling()
        if self.num_experts is not None:
            self._check_moe()

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling not in (None, "yarn"):
            raise ValueError(f"rope_scaling must be null or yarn, got {self.rope_scaling!r}")
        if self.native_context is not None and self.native_context < 1:
            raise ValueError(f"native_context must be >= 1 or null, got {self.native_context}")
        if self.rope_scaling == "yarn" and (self.native_context is None or self.rope_scaling_factor <= 1.0):
            raise ValueError(
                "rope_scaling=yarn needs native_context (the original max_position_embeddings) and "
                f"rope_scaling_factor > 1, got native_context={self.native_context}, factor={self.rope_scaling_factor}"
            )
        if self.seq_length is not MISSING:
            self.check_context(self.seq_length, "model.seq_length")

    def context_limit(self) -> int | None:
        """Longest sequence the positions are trained for: native_context (x rope_scaling_factor with YaRN)."""
        if self.native_context is None:
            return None
        return int(self.native_context * (self.rope_scaling_factor if self.rope_scaling else 1.0))

    def check_context(self, length: int, name: str) -> None:
        """ValueError naming ``name``=``length`` and the model's context when ``length`` exceeds it."""
        limit = self.context_limit()
        if limit is None or length <= limit:
            return
        if self.rope_scaling is None:
            factor = length / self.native_context
            raise ValueError(
                f"{name} ({length}) exceeds the model's native context model.native_context ({self.native_context}) "
                f"and RoPE is not scaled: positions past {self.native_context} were never trained. Set "
                f"model.rope_scaling=yarn model.rope_scaling_factor={factor:g} (or more), or use windows of at most "
                f"{self.native_context} tokens"
            )
        raise ValueError(
            f"{name} ({length}) exceeds the YaRN-scaled context of the model: model.native_context "
            f"({self.native_context}) x model.rope_scaling_factor ({self.rope_scaling_factor:g}) = {limit}"
        )

    def _check_moe(self) -> None:
        if self.num_experts < 1 or self.moe_ffn_hidden_size is None or self.moe_ffn_hidden_size < 1:
            raise ValueError("num_experts must be >= 1 and moe_ffn_hidden_size set (>= 1) for an MoE model")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(
                f"moe_router_topk must be in [1, num_experts={self.num_experts}], got {self.moe_router_topk}"
            )
        if self.num_layers is not MISSING and not 0 <= self.moe_first_dense_layers < self.num_layers:
            raise ValueError(f"moe_first_dense_layers must be in [0, num_layers), got {self.moe_first_dense_layers}")
        if self.moe_router_score not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_score must be softmax or sigmoid, got {self.moe_router_score!r}")
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(f"moe_token_dispatcher must be alltoall or allgather, got {self.moe_token_dispatcher!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def moe_layer_pattern(self) -> list[int]:
        """Per layer: 1 for an MoE MLP, 0 for a dense one (Megatron's ``moe_layer_freq`` list)."""
        return [0 if i < self.moe_first_dense_layers else 1 for i in range(self.num_layers)]

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count with the padded vocabulary at TP=1 (for FLOP / MFU estimates).

        ``active``: only what one token uses (its ``moe_router_topk`` routed experts, not all of them).
        """
        h, L = self.hidden_size, self.num_layers
        d = self.kv_channels or h // self.num_attention_heads
        q = self.num_attention_heads * d
        kv = 2 * (self.num_query_groups or self.num_attention_heads) * d
        attn = h * (q + kv) + q * h + 2 * h + (q + kv if self.qkv_bias else 0) + (2 * d if self.qk_layernorm else 0)
        dense_mlp = 3 * h * (self.ffn_hidden_size or 4 * h)
        if self.is_moe:
            experts = self.moe_router_topk if active else self.num_experts
            moe_mlp = 3 * h * (experts * self.moe_ffn_hidden_size + (self.moe_shared_expert_ffn_hidden_size or 0))
            moe_mlp += h * self.num_experts  # router
            dense_layers = self.moe_first_dense_layers
            mlps = dense_layers * dense_mlp + (L - dense_layers) * moe_mlp
        else:
            mlps = L * dense_mlp
        emb = self.padded_vocab_size() * h * (2 if self.untie_embeddings else 1)
        return L * attn + mlps + emb + h


def register(cs: ConfigStore) -> None:
    cs.store(group="model", name="model_schema", node=ModelConfig)
