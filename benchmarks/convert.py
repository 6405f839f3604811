"""``klong-convert`` peak memory and time vs the whole-model path, on a random Qwen3-shaped bf16 HF checkpoint.

    .venv/bin/python benchmarks/convert.py [--layers 16] [--hidden 1024] [--ffn 4096] [--vocab 65536]

Writes the HF folder (random weights, written tensor by tensor), then runs each step in a fresh process and
reports its wall time and peak RSS (VmHWM); "extra" is over the ``baseline`` process (same imports,
process group and meta model, no tensors). Steps: ``hf-to-dist`` and ``dist-to-hf`` (the CLI; also with
64 MiB read batches), and
``whole-model`` (what a conversion in one process costs without streaming: build the model at TP 1, load
the HF weights, save the dist checkpoint). The largest group is the padded embedding with its HF source.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from klong_megatron.config.model import ModelConfig


def model_cfg(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.hidden // 64,
                       num_query_groups=a.hidden // 256, kv_channels=64, ffn_hidden_size=a.ffn, vocab_size=a.vocab,
                       seq_length=4096, qk_layernorm=True, untie_embeddings=True, transformer_impl="local")  # fmt: skip


def write_hf(cfg: ModelConfig, out: Path) -> int:
    """A random bf16 HF checkpoint of ``cfg`` (names and shapes from the mapping on a meta model); its bytes."""
    from klong_megatron.config.trainer import ParallelConfig
    from klong_megatron.megatron.convert import meta_model
    from klong_megatron.megatron.hf import hf_config
    from klong_megatron.megatron.hf_map import exported_names, group_to_hf, hf_group
    from klong_megatron.megatron.parallel import destroy_distributed, init_distributed
    from klong_megatron.megatron.safetensors_io import SafetensorsWriter

    init_distributed(ParallelConfig(), seed=0)
    params = dict(meta_model(cfg, torch.bfloat16).state_dict())
    names = exported_names(params, cfg)
    metas = {k: t for n in names for k, t in group_to_hf(hf_group(n, cfg, params), params[n], cfg).items()}
    destroy_distributed()
    out.mkdir(parents=True)
    f = SafetensorsWriter(out / "model.safetensors", [(k, tuple(t.shape), t.dtype) for k, t in metas.items()])
    gen = torch.Generator().manual_seed(0)
    for k, t in metas.items():
        f.write(k, (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16))
    (out / "config.json").write_text(json.dumps({**hf_config(cfg), "torch_dtype": "bfloat16"}))
    return sum(t.numel() * 2 for t in metas.values())


def child(mode: str, work: Path, cfg_json: str) -> None:
    """One measured step in this process; prints {"rss": bytes}."""
    cfg = ModelConfig(**json.loads(cfg_json))
    if mode.startswith(("hf-to-dist", "dist-to-hf")):
        from klong_megatron.cli.convert import main

        command, *flags = mode.split()
        back = work / f"back{len(flags)}"
        src, dst = (work / "hf", work / "dist") if command == "hf-to-dist" else (work / "dist", back)
        main([command, str(src), str(dst), *flags])
    else:
        from klong_megatron.config.trainer import ParallelConfig
        from klong_megatron.megatron import checkpoint as ckpt
        from klong_megatron.megatron.convert import meta_model
        from klong_megatron.megatron.hf import load_hf_weights
        from klong_megatron.megatron.model import build_gpt
        from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

        init_distributed(ParallelConfig(), seed=0)
        meta_model(cfg)
        if mode == "whole-model":
            model = build_gpt(cfg, bf16=True)
            load_hf_weights(model, work / "hf", cfg)
            ckpt.save_checkpoint(work / "whole", model, None, None, ckpt.TrainState())
        destroy_distributed()
    from klong_megatron.cli.convert import peak_rss_bytes

    print(json.dumps({"rss": peak_rss_bytes()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]), a.child[2])
    cfg = model_cfg(a)
    from dataclasses import asdict

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        total = write_hf(cfg, work / "hf")
        group = cfg.padded_vocab_size() * cfg.hidden_size * 2 + cfg.vocab_size * cfg.hidden_size * 2
        print(f"model: {cfg.num_parameters() / 1e6:.0f}M parameters, {total / 2**20:.0f} MiB bf16; largest group "
              f"(embedding + its HF source): {group / 2**20:.0f} MiB")  # fmt: skip
        print("| step | wall s | peak RSS MiB | extra over baseline MiB |\n|---|---:|---:|---:|")
        base = 0
        for mode in ("baseline", "hf-to-dist", "dist-to-hf", "dist-to-hf --batch-mb 64", "whole-model"):
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--child", mode, str(work), json.dumps(asdict(cfg))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            rss = json.loads(proc.stdout.strip().splitlines()[-1])["rss"]
            base = base or rss
            print(f"| {mode} | {time.perf_counter() - start:.1f} | {rss / 2**20:.0f} | {(rss - base) / 2**20:.0f} |")
        from klong_megatron.megatron.safetensors_io import SafetensorsDir

        src, back = SafetensorsDir(work / "hf"), SafetensorsDir(work / "back0")
        exact = set(src) == set(back) and all(torch.equal(src[k], back[k]) for k in src)
        print(f"hf -> dist -> hf bit-exact: {exact}")


if __name__ == "__main__":
    main()
