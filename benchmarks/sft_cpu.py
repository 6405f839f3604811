"""CPU SFT step time and tokens/s of the demo model; overhead of the CPU compatibility layer.

    .venv/bin/python benchmarks/sft_cpu.py [--steps 6] [--seq 2048] [--micro 1]

Part 1 runs real Megatron training steps (forward + backward + DDP + optimizer) of the `tiny` demo
model on synthetic packed sequences. Part 2 isolates the compat layer's cost: the same model
forward+backward with the device-mapping TorchFunctionMode active vs suspended (the optimizer path
cannot run without it, so the ratio is measured on forward+backward only). Median of the timed steps
after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from sft_tiny_data import tiny_data  # noqa: E402

from klong_megatron.config.data import ContextPolicyConfig, DataConfig  # noqa: E402
from klong_megatron.config.model import ModelConfig  # noqa: E402
from klong_megatron.config.sft import SFTConfig  # noqa: E402
from klong_megatron.config.trainer import TrainerConfig  # noqa: E402
from klong_megatron.megatron import cpu_compat  # noqa: E402
from klong_megatron.sft.trainer import SFTTrainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=1)
    a = ap.parse_args()
    model = ModelConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=352,
        vocab_size=512,
        seq_length=a.seq,
    )  # fmt: skip (hydra_configs/model/tiny.yaml)
    cfg = SFTConfig(
        model=model,
        data=DataConfig(policy=ContextPolicyConfig(max_len=a.seq)),
        trainer=TrainerConfig(
            train_steps=a.steps + 1,
            global_batch_size=2 * a.micro,
            micro_batch_size=a.micro,
            log_every=10**6,
            save_every=0,
        ),  # fmt: skip
    )
    import tempfile

    data = tiny_data(n_train=8, n_valid=2, seq_len=a.seq)
    trainer = SFTTrainer(cfg, tempfile.mkdtemp(), data=data)
    from sft_tiny_data import TinyOrder

    from klong_megatron.sft.batches import GlobalBatches

    trainer.batches = GlobalBatches(TinyOrder(8, 0).indices, cfg.trainer.global_batch_size)
    times = [trainer.train_step()["step_time_s"] for _ in range(a.steps + 1)][1:]
    step = statistics.median(times)
    tokens = cfg.trainer.global_batch_size * a.seq

    mb = trainer.collate([data["train"][i] for i in range(a.micro)])
    inner = trainer.model.module

    def fwd_bwd() -> float:
        t0 = time.perf_counter()
        loss = inner(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"]).sum()
        loss.backward()
        return time.perf_counter() - t0

    fwd_bwd()
    with_mode = statistics.median(fwd_bwd() for _ in range(a.steps))
    with cpu_compat.suspended():
        fwd_bwd()
        without = statistics.median(fwd_bwd() for _ in range(a.steps))

    t = Table(title=f"SFT on CPU ({torch.get_num_threads()} threads), tiny model, seq {a.seq}")
    for col in ("measure", "value"):
        t.add_column(col)
    t.add_row("train step (fwd+bwd+DDP+Adam), median s", f"{step:.3f}")
    t.add_row("tokens/s (global batch)", f"{tokens / step:,.0f}")
    t.add_row("fwd+bwd with compat mode, s", f"{with_mode:.3f}")
    t.add_row("fwd+bwd without compat mode, s (baseline)", f"{without:.3f}")
    t.add_row("compat overhead (ratio vs baseline)", f"{with_mode / without:.3f}x")
    Console().print(t)


if __name__ == "__main__":
    main()
