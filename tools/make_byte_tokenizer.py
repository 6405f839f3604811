"""Build the bundled byte-level tokenizer (klong_megatron/data/assets/byte_tokenizer).

256 byte tokens (no merges) + ChatML specials, with a ChatML chat template that renders reasoning as
``<think>..</think>`` and tool calls Hermes-style (``<tool_call>{"name", "arguments"}</tool_call>``).
It is a regular Hugging Face tokenizer directory, so the embedded default takes the same code path as a
real model's tokenizer. Run: ``python tools/make_byte_tokenizer.py``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "klong_megatron" / "data" / "assets" / "byte_tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    # Newlines are written as {{ nl }} so that Jinja's trim_blocks/lstrip_blocks cannot eat them.
    "{% set nl = '\\n' %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}"
    "<|im_start|>assistant{{ nl }}"
    "{% if m.reasoning_content %}<think>{{ nl }}{{ m.reasoning_content }}{{ nl }}</think>{{ nl }}{% endif %}"
    "{{ m.content }}"
    "{% for tc in m.tool_calls or [] %}"
    "{% if not loop.first or m.content %}{{ nl }}{% endif %}"
    '<tool_call>{{ nl }}{"name": "{{ tc.function.name }}", "arguments": '
    "{% if tc.function.arguments is string %}{{ tc.function.arguments }}"
    "{% else %}{{ tc.function.arguments | tojson }}{% endif %}"
    "}{{ nl }}</tool_call>"
    "{% endfor %}"
    "<|im_end|>{{ nl }}"
    "{% else %}"
    "<|im_start|>{{ m.role }}{{ nl }}{{ m.content }}<|im_end|>{{ nl }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ nl }}{% endif %}"
)


def build() -> PreTrainedTokenizerFast:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    build().save_pretrained(OUT)
    print(f"wrote {OUT}")
