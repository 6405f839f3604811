"""Build the bundled demo BPE tokenizer (klong_megatron/data/assets/demo_bpe_tokenizer).

The RL demo's tokenizer: the byte tokenizer's ChatML template and specials, plus ``<tool_call>`` /
``</tool_call>`` as single added tokens (as in Qwen2.5/Qwen3) and byte-level BPE merges (GPT-2 style
pre-tokenization: merges stay inside words, numbers and punctuation runs) learned from scripted-expert
transcripts of the demo task family. A trajectory is ~2.5x fewer tokens than with bytes, so the tiny demo
model learns the tool-call syntax in the minutes the CPU demo has. Deterministic; the training seeds
(500_000+) are disjoint from the RL demo's task seeds. Run: ``python tools/make_demo_tokenizer.py``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from klong_megatron.data.demo_tasks import expert_trajectory, make_task
from klong_megatron.data.render import load_tokenizer

OUT = Path(__file__).resolve().parents[1] / "klong_megatron" / "data" / "assets" / "demo_bpe_tokenizer"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TAGS = ["<tool_call>", "</tool_call>"]
VOCAB_SIZE = 1024


def corpus(count: int = 600) -> list[str]:
    """Chat-template renderings of expert trajectories with 1-3 functions of every formula form."""
    byte = load_tokenizer("byte")
    texts = []
    for i in range(count):
        seed = 500_000 + i
        traj = expert_trajectory(make_task(seed, 1 + i % 3), seed=seed)
        texts.append(byte.apply_chat_template([m.to_openai() for m in traj.messages], tokenize=False))
    return texts


def build() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TOOL_TAGS),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )
    fast.chat_template = load_tokenizer("byte").chat_template
    return fast


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    build().save_pretrained(OUT)
    print(f"wrote {OUT}")
