"""Test double for the policy model (the far edge): an Engine that replies with scripted turns.

``ScriptedEngine`` speaks the real ``Engine`` contract (token ids in, token ids + log-probs out)
but its "model" is a list of texts, so agent-loop tests can drive tool calls deterministically.
It records every context it was asked to continue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from klong_megatron.rollout.engine import Generation, SamplingParams, WeightUpdate


class ScriptedEngine:
    """Turn k answers ``script[k]`` (or ``script(k, context_ids)``), tokenized, plus end-of-turn."""

    def __init__(
        self,
        tokenizer: Any,
        script: list[str] | Callable[[int, list[int]], str],
        *,
        latency_s: float = 0.0,
        eot: str = "<|im_end|>",
    ) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.latency_s = latency_s
        self.eot_id = tokenizer.convert_tokens_to_ids(eot)
        self.contexts: list[list[int]] = []
        self.version = "scripted-0"

    def _text(self, k: int, ctx: list[int]) -> str | None:
        if callable(self.script):
            return self.script(k, ctx)
        return self.script[k] if k < len(self.script) else None

    async def generate(self, input_ids: list[int], sampling: SamplingParams) -> Generation:
        k = len(self.contexts)
        self.contexts.append(list(input_ids))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = self._text(k, input_ids)
        if text is None:
            text = "I am done."
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= sampling.max_new_tokens:
            ids = ids[: sampling.max_new_tokens]
            return Generation(ids, [-0.5] * len(ids), "length", len(input_ids), self.version)
        ids = ids + [self.eot_id]
        return Generation(ids, [-0.25] * len(ids), "stop", len(input_ids), self.version)

    async def abort(self) -> None:
        return None

    async def update_weights(self, update: WeightUpdate) -> None:
        self.version = update.version

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        return None
