"""In-process generation for development: a PyTorch causal LM + KV-cached sampling.

Dataflow: prompt ids -> ``backend.prefill`` (one forward, KV cache) -> loop: sample a token
(temperature, top-p) -> stop on a stop token / eos, ``max_new_tokens``, the model's context length,
or an abort -> ``Generation``.

Log-probs follow SGLang 0.5.23 (``srt/layers/sampler.py``): ``log_softmax(logits / T)`` of the sampled
token (before top-p), ``log_softmax(logits)`` for greedy requests (T = 0) or when
``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set (``original_logprobs=True``).

Pausing (SGLang's ``/pause_generation`` modes): ``abort`` aborts what runs and holds new requests;
``retract`` and ``in_place`` stop running requests between two tokens (releasing the model for a
weight load) and hold new ones; on ``resume`` a retracted request recomputes its KV cache with the
current weights, an in-place one continues on its old cache. ``running()`` counts requests that
hold a KV cache now (what makes SGLang's ``/flush_cache`` answer 400).

Backends (``CausalLM`` protocol): a local Hugging Face causal-LM directory (``HFCausalLM``) or a
tiny randomly initialised Llama for demos and tests (``tiny_llama``); the project's Megatron GPT
plugs in through the same two methods.

``DevModel`` serialises requests (one generation at a time, requests queue on a lock): it is a
development engine for CPU runs and tests, NOT a replacement for SGLang (no batching, no prefix
cache, no tensor parallelism). ``DevEngine`` exposes it through the async ``Engine`` contract.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

from klong_megatron.config.rollout import DevServerConfig
from klong_megatron.data.render import load_tokenizer
from klong_megatron.rollout.engine import PAUSE_MODES, EngineError, Generation, SamplingParams, WeightUpdate


class CausalLM(Protocol):
    """What generation needs from a model. Logits are float tensors of shape [vocab]."""

    max_context: int
    eos_token_ids: tuple[int, ...]

    def prefill(self, input_ids: list[int]) -> tuple[torch.Tensor, Any]: ...

    def decode(self, token: int, cache: Any) -> tuple[torch.Tensor, Any]: ...

    def load_weights(self, path: str) -> None: ...

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]: ...

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]: ...


class HFCausalLM:
    """A local Hugging Face causal LM (``AutoModelForCausalLM``), fp32 on CPU unless told otherwise."""

    def __init__(self, model: Any, *, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = device
        cfg = model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 4096))
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type") == "yarn" and rope.get("original_max_position_embeddings"):
            # transformers applies YaRN itself; the usable context is the original one x factor
            self.max_context = max(self.max_context, int(rope["original_max_position_embeddings"] * rope["factor"]))
        eos = cfg.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HFCausalLM:
        from transformers import AutoModelForCausalLM

        if not (Path(path) / "config.json").exists():
            raise ValueError(f"model: {path} is not a Hugging Face model directory (no config.json)")
        return cls(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True), device=device)

    def prefill(self, input_ids: list[int]) -> tuple[torch.Tensor, Any]:
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    def decode(self, token: int, cache: Any) -> tuple[torch.Tensor, Any]:
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values

    def load_weights(self, path: str) -> None:
        """Copy the weights of the HF checkpoint at ``path`` in place (same architecture required)."""
        new = HFCausalLM.from_dir(path, device=self.device, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(new.model.state_dict(), strict=True)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors under the names of its checkpoint files (views, no copies).

        transformers keeps MoE experts fused in memory (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
        ``mlp.experts.down_proj`` ``[E, H, I]``) while checkpoints (and SGLang's loaders) name them per
        expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``); both directions use this mapping."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.model.state_dict().items():
            if name.endswith("mlp.experts.gate_up_proj"):
                base = name.removesuffix("gate_up_proj")
                for e, both in enumerate(t):
                    gate, up = both.chunk(2)
                    out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
            elif name.endswith("mlp.experts.down_proj"):
                base = name.removesuffix("down_proj")
                out.update({f"{base}{e}.down_proj.weight": d for e, d in enumerate(t)})
            else:
                out[name] = t
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
        """Copy the given HF-named tensors in place (any subset; cast to the model's dtype/device).

        All names and shapes are checked before anything is copied: a bad update changes nothing.
        An unknown name raises ValueError, or (``strict=False``, SGLang's behaviour) is skipped and
        returned. Names are checkpoint names (per-expert for MoE, see :meth:`checkpoint_tensors`).
        """
        own = self.checkpoint_tensors()
        skipped = [n for n in tensors if n not in own]
        if skipped and strict:
            raise ValueError(f"unknown parameter {skipped[0]!r} (not in this {type(self.model).__name__})")
        tensors = {n: t for n, t in tensors.items() if n in own}
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)}, the model has {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, t in tensors.items():
                own[name].copy_(t)
        return skipped


def tiny_llama(vocab_size: int, *, seed: int = 0, max_context: int = 4096, eos_token_id: int | None = None) -> Any:
    """A randomly initialised 2-layer Llama (~0.2M params + embeddings) for demos and tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def sample_token(
    logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator, *, original_logprobs: bool = False
) -> tuple[int, float]:
    """Sample from logits [V]; returns (token id, its log-prob as SGLang reports it).

    The log-prob is under ``log_softmax(logits / T)`` (top-p does not change it), or under
    ``log_softmax(logits)`` when T = 0 (greedy) or ``original_logprobs`` (SGLANG_RETURN_ORIGINAL_LOGPROB).
    """
    if sampling.temperature == 0:
        tok = int(torch.argmax(logits))
        return tok, float(torch.log_softmax(logits, dim=-1)[tok])
    scaled = torch.log_softmax(logits / sampling.temperature, dim=-1)
    logp = torch.log_softmax(logits, dim=-1) if original_logprobs else scaled
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    tok = int(torch.multinomial(probs, 1, generator=gen))
    return tok, float(logp[tok])


class DevModel:
    """Thread-safe generation over one ``CausalLM`` (requests run one at a time)."""

    def __init__(
        self, lm: CausalLM, *, weight_version: str = "0", name: str = "dev", original_logprobs: bool | None = None
    ) -> None:
        self.lm = lm
        self.weight_version = weight_version
        self.name = name
        if original_logprobs is None:
            original_logprobs = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes")
        self.original_logprobs = original_logprobs
        self._lock = threading.Lock()
        self._state = threading.Condition()  # guards the pause state and the counters below
        self._paused = ""  # "" or one of PAUSE_MODES
        self._running = 0  # requests holding a KV cache now (not retracted)
        self._abort_epoch = 0
        self._aborted_rids: set[str] = set()
        self._seed_counter = 0
        self.tokens_generated = 0

    def abort(self, rid: str | None = None) -> None:
        """Abort every request in flight or queued now (or only ``rid``)."""
        if rid:
            self._aborted_rids.add(rid)
        else:
            self._abort_epoch += 1

    # ----- pause / resume (SGLang's /pause_generation, /continue_generation) -----------------------
    def pause(self, mode: str = "abort") -> None:
        """Hold new requests; ``abort`` also aborts running ones, the others stop them between tokens."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._state:
            self._paused = mode
        if mode == "abort":
            self.abort()

    def resume(self) -> None:
        with self._state:
            self._paused = ""
            self._state.notify_all()

    @property
    def paused(self) -> str:
        return self._paused

    def running(self) -> int:
        """Requests holding a KV cache now (paused in place included, retracted ones not)."""
        return self._running

    def _wait_resumed(self) -> None:
        with self._state:
            self._state.wait_for(lambda: not self._paused)

    @torch.inference_mode()
    def generate(self, input_ids: list[int], sampling: SamplingParams, *, rid: str = "") -> Generation:
        """Blocking generation; raises ValueError for a prompt that does not fit the context."""
        if not input_ids:
            raise ValueError("input_ids is empty")
        while True:  # a paused server holds new requests (SGLang: is_pause_cond)
            self._wait_resumed()
            epoch = self._abort_epoch
            self._lock.acquire()
            if not self._paused:
                break
            self._lock.release()
        try:
            return self._generate(input_ids, sampling, lambda: epoch != self._abort_epoch or rid in self._aborted_rids)
        finally:
            self._lock.release()
            self._aborted_rids.discard(rid)

    def _yield_if_paused(self) -> str:
        """Between two tokens: while paused (retract / in_place), let weight loads take the model."""
        mode = self._paused
        if not mode or mode == "abort":
            return ""
        if mode == "retract":
            self._running -= 1
        self._lock.release()
        try:
            self._wait_resumed()
        finally:
            self._lock.acquire()
            if mode == "retract":
                self._running += 1
        return mode

    def _generate(self, ids: list[int], sp: SamplingParams, aborted: Any) -> Generation:
        budget = min(sp.max_new_tokens, self.lm.max_context - len(ids))
        if budget < 1:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the context of {self.lm.max_context}")
        self._seed_counter += 1
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else self._seed_counter * 7919 + 17)
        stops = set(sp.stop_token_ids) | set(self.lm.eos_token_ids)
        out: list[int] = []
        lps: list[float] = []
        reason = "length"
        if aborted():
            return Generation([], [], "abort", prompt_tokens=len(ids), weight_version=self.weight_version)
        self._running += 1
        try:
            logits, cache = self.lm.prefill(ids)
            for i in range(budget):
                tok, lp = sample_token(logits, sp, gen, original_logprobs=self.original_logprobs)
                out.append(tok)
                lps.append(lp)
                if tok in stops:
                    reason = "stop"
                    break
                if self._yield_if_paused() == "retract":  # SGLang recomputes a retracted request's KV cache
                    logits, cache = self.lm.prefill(ids + out[:-1])
                if aborted():
                    reason = "abort"
                    break
                if i + 1 < budget:
                    logits, cache = self.lm.decode(tok, cache)
        finally:
            self._running -= 1
        self.tokens_generated += len(out)
        return Generation(out, lps, reason, prompt_tokens=len(ids), weight_version=self.weight_version)

    def load_weights(self, path: str, version: str) -> None:
        """Reload weights between requests (waits for the current generation to finish or pause)."""
        with self._lock:
            self.lm.load_weights(path)
            self.weight_version = version

    def load_tensors(self, tensors: dict[str, torch.Tensor], version: str | None, *, strict: bool = True) -> list[str]:
        """Copy named tensors into the model between requests; ``version=None`` keeps the version.

        ``strict=False`` skips names the model does not have, as SGLang's model loaders do
        (``if name in params_dict``); returns the skipped names.
        """
        with self._lock:
            skipped = self.lm.load_tensors(tensors, strict=strict)
            if version is not None:
                self.weight_version = version
            return skipped

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and persistent buffers under HF names (for the weight checker)."""
        return self.lm.checkpoint_tensors()


class DevEngine:
    """The ``Engine`` contract over an in-process ``DevModel`` (generation runs in a worker thread)."""

    def __init__(self, model: DevModel) -> None:
        self.model = model

    async def generate(self, input_ids: list[int], sampling: SamplingParams) -> Generation:
        try:
            return await asyncio.to_thread(self.model.generate, list(input_ids), sampling)
        except ValueError as e:
            raise EngineError(f"dev engine: {e}") from e

    async def abort(self) -> None:
        self.model.abort()

    async def update_weights(self, update: WeightUpdate) -> None:
        if update.path is None:
            raise EngineError("dev engine: only disk weight updates (WeightUpdate(path=...)) are supported")
        await asyncio.to_thread(self.model.load_weights, update.path, update.version)

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def build_dev_model(cfg: DevServerConfig) -> tuple[DevModel, Any]:
    """DevServerConfig -> (DevModel, tokenizer or None)."""
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny":
        if tokenizer is None:
            raise ValueError("devserver.model=tiny needs a tokenizer (its vocabulary sizes the model)")
        model = tiny_llama(
            len(tokenizer), seed=cfg.seed, max_context=cfg.max_context, eos_token_id=tokenizer.eos_token_id
        )
        lm = HFCausalLM(model.to(dtype), device=cfg.device)
    else:
        lm = HFCausalLM.from_dir(cfg.model, device=cfg.device, dtype=dtype)
    return DevModel(lm, name=cfg.model), tokenizer
