"""Runs the SFT trainer on the tiny synthetic dataset and prints a JSON summary (test helper).

    python tests/integration/sft_driver.py OUT_DIR [key=value ...]
    torchrun --nproc_per_node 2 tests/integration/sft_driver.py OUT_DIR trainer.parallel.tp=2

``key=value`` pairs are dotted overrides of the tiny config below (ints/floats/bools parsed by YAML).
The summary (losses per step, final state, eval loss) is written by rank 0 to OUT_DIR/summary.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sft_tiny_data import tiny_data  # noqa: E402

from klong_megatron.config.sft import SFTConfig  # noqa: E402
from klong_megatron.megatron.parallel import destroy_distributed  # noqa: E402
from klong_megatron.sft.trainer import SFTTrainer  # noqa: E402

TINY = {
    "model": {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 128, "vocab_size": 64, "make_vocab_size_divisible_by": 32, "seq_length": 64,
    },
    "data": {"policy": {"max_len": 64}},
    "trainer": {
        "train_steps": 8, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2,
        "log_every": 100, "eval_every": 0,
    },
    "logger": {"backend": "console"},
}  # fmt: skip


def tiny_config(overrides: list[str]) -> SFTConfig:
    base = OmegaConf.merge(OmegaConf.structured(SFTConfig), TINY, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(base)


def main() -> None:
    out = Path(sys.argv[1])
    cfg = tiny_config(sys.argv[2:])
    summary = SFTTrainer(cfg, out, data=tiny_data()).run()
    if dist.get_rank() == 0:
        (out / "summary.json").write_text(json.dumps(summary))
    destroy_distributed()


if __name__ == "__main__":
    main()
