"""Schema of the GPT model architecture (``model=`` group). Parallelism lives in the trainer config."""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """A Llama/Qwen-family decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention."""

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

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self) -> int:
        """Parameter count (for FLOP / MFU estimates), with the padded vocabulary at TP=1."""
        h, L = self.hidden_size, self.num_layers
        d = self.kv_channels or h // self.num_attention_heads
        q = self.num_attention_heads * d
        kv = 2 * (self.num_query_groups or self.num_attention_heads) * d
        ffn = self.ffn_hidden_size or 4 * h
        per_layer = h * (q + kv) + q * h + 3 * h * ffn + 2 * h + (q + kv if self.qkv_bias else 0)
        emb = self.padded_vocab_size() * h * (2 if self.untie_embeddings else 1)
        return L * per_layer + emb + h


def register(cs: ConfigStore) -> None:
    cs.store(group="model", name="model_schema", node=ModelConfig)
