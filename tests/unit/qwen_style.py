"""A tiny Qwen-style HF tokenizer built offline (trained byte-level BPE + a Qwen-style chat template).

The template follows Qwen2.5's structure: a default system prompt, ``<|im_start|>role\\n...<|im_end|>``
turns, Hermes ``<tool_call>`` JSON for tool calls, consecutive tool results grouped into one user turn
as ``<tool_response>`` blocks, and ``<think>`` reasoning.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

QWEN_STYLE_TEMPLATE = (
    "{%- set nl = '\\n' -%}"
    "{%- if messages[0].role == 'system' -%}<|im_start|>system{{ nl }}{{ messages[0].content }}<|im_end|>{{ nl }}"
    "{%- else -%}<|im_start|>system{{ nl }}You are a helpful assistant.<|im_end|>{{ nl }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' and loop.first -%}"
    "{%- elif m.role == 'user' or m.role == 'system' -%}"
    "<|im_start|>{{ m.role }}{{ nl }}{{ m.content }}<|im_end|>{{ nl }}"
    "{%- elif m.role == 'assistant' -%}<|im_start|>assistant"
    "{%- if m.reasoning_content -%}{{ nl }}<think>{{ nl }}{{ m.reasoning_content }}{{ nl }}</think>{%- endif -%}"
    "{%- if m.content -%}{{ nl }}{{ m.content }}{%- endif -%}"
    "{%- for tc in m.tool_calls or [] -%}{{ nl }}<tool_call>{{ nl }}"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}'
    "{{ nl }}</tool_call>{%- endfor -%}<|im_end|>{{ nl }}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}<|im_start|>user{%- endif -%}"
    "{{ nl }}<tool_response>{{ nl }}{{ m.content }}{{ nl }}</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}<|im_end|>{{ nl }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ nl }}{%- endif -%}"
)

CORPUS = [
    "I will read the paper first and then implement the method.",
    '<tool_call>\n{"name": "bash", "arguments": {"cmd": "ls -la && python train.py"}}\n</tool_call>',
    "<tool_response>\ntotal 8\ndrwxr-xr-x 2 root root 4096 model.py\n</tool_response>",
    "The loss decreased from 2.31 to 0.57 after 100 steps. Let me check the results.",
    "<think>\nThe function should return the weighted mean.\n</think>",
]


def build_qwen_style_tokenizer(out: Path) -> Path:
    """Train a ~600-token byte-level BPE (GPT-2 style pre-tokenization) and save it with the template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_STYLE_TEMPLATE
    fast.save_pretrained(out)
    return out
