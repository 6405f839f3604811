"""``klong-convert``: HF safetensors <-> Megatron distributed checkpoint, streamed tensor by tensor in one process.

    klong-convert hf-to-dist HF_DIR SAVE_DIR [--tp 2] [--dtype auto] [--set KEY=VALUE ...]
    klong-convert dist-to-hf CKPT OUT_DIR [--config HF_DIR_OR_MODEL_YAML] [--max-shard-gb 5] [--set KEY=VALUE ...]

``hf-to-dist`` writes ``SAVE_DIR/iter_0000000`` + ``latest`` (model weights only), which ``klong-rl
init_from_checkpoint=SAVE_DIR`` (or ``load_checkpoint``) loads at any TP / PP / EP; the HF folder's config and
tokenizer files are kept in ``SAVE_DIR/hf_config``. The model config comes from ``HF_DIR/config.json``;
``--set`` overrides ModelConfig fields (``--set transformer_impl=te``); the vocabulary is padded as training
pads it (``make_vocab_size_divisible_by`` x ``--tp``, the training run's TP). ``dist-to-hf`` writes
safetensors files (sharded at ``--max-shard-gb`` with an index, as ``save_pretrained`` does), config.json and
the tokenizer files of ``--config`` (default ``SAVE_DIR/hf_config``; a model preset YAML works too, then
config.json is generated and ``--tokenizer`` names the tokenizer folder). Memory: see
``klong_megatron/megatron/convert.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import time
from pathlib import Path

from klong_megatron.cli._errors import one_line_errors
from klong_megatron.config.model import ModelConfig

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_WEIGHTS = (".safetensors", ".safetensors.index.json", ".bin", ".pt")


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (``ru_maxrss`` keeps a forking parent's peak), else ru_maxrss."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else ():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="klong-convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-dist", help="HF folder -> Megatron dist checkpoint (save_dir)")
    a.add_argument("hf_dir")
    a.add_argument("save_dir")
    a.add_argument("--tp", type=int, default=1, help="the training run's tensor parallel size (vocab padding)")
    a.add_argument("--dtype", choices=_DTYPES, default="auto", help="auto: config.json's torch_dtype")
    b = sub.add_parser("dist-to-hf", help="Megatron dist checkpoint -> HF folder")
    b.add_argument("checkpoint", help="a save_dir (its latest step) or one iter_* directory")
    b.add_argument("out_dir")
    b.add_argument("--config", help="HF folder with config.json, or a model preset YAML (default: SAVE_DIR/hf_config)")
    b.add_argument("--tokenizer", help="folder whose tokenizer files are copied (default: the --config folder)")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--batch-mb", type=float, default=512.0, help="parameters read per checkpoint access")
    for q in (a, b):
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field")
    return p.parse_args(argv)


def _with_overrides(cfg: ModelConfig, sets: list[str]) -> ModelConfig:
    """``cfg`` with ``KEY=VALUE`` overrides, checked by ModelConfig (a bad key or value names itself)."""
    from omegaconf import OmegaConf

    bad = [s for s in sets if "=" not in s]
    if bad:
        raise ValueError(f"--set {bad[0]!r}: expected KEY=VALUE")
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(sets))
    return OmegaConf.to_object(merged)


def _model_config(source: Path, sets: list[str]) -> ModelConfig:
    """ModelConfig from an HF folder's config.json or from a model preset YAML (hydra_configs/model/*.yaml)."""
    from omegaconf import OmegaConf

    from klong_megatron.megatron.hf import model_config_from_hf

    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(2, "No such file or directory", str(source / "config.json"))
        return _with_overrides(model_config_from_hf(source), sets)
    preset = OmegaConf.load(source)
    preset.pop("defaults", None)
    return _with_overrides(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), preset)), sets)


def _copy_side_files(src: Path, dst: Path, skip_config: bool = False) -> None:
    """Config and tokenizer files of an HF folder (everything but weights)."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHTS) and not (skip_config and f.name == "config.json"):
            shutil.copy2(f, dst / f.name)


def _hf_to_dist(args: argparse.Namespace) -> dict:
    import torch

    from klong_megatron.megatron.convert import ckpt_partial, hf_to_dist

    hf_dir, save_dir = Path(args.hf_dir), Path(args.save_dir)
    if not any(hf_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
    if (save_dir / "latest").exists():
        raise FileExistsError(f"{save_dir} already holds a checkpoint (latest); choose a new directory")
    multiple = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "make_vocab_size_divisible_by")
    cfg = _model_config(hf_dir, [f"make_vocab_size_divisible_by={multiple * args.tp}", *args.set])
    name = args.dtype
    if name == "auto":
        c = json.loads((hf_dir / "config.json").read_text())
        name = c.get("torch_dtype") or c.get("dtype") or "float32"
        name = name if name in _DTYPES else "float32"
    created = not save_dir.exists()
    save_dir.mkdir(parents=True, exist_ok=True)
    try:
        stats = hf_to_dist(hf_dir, save_dir, cfg, getattr(torch, name))
    except BaseException:
        shutil.rmtree(save_dir if created else ckpt_partial(save_dir), ignore_errors=True)
        raise
    (save_dir / "hf_config").mkdir(exist_ok=True)
    _copy_side_files(hf_dir, save_dir / "hf_config")
    return {**stats, "out": str(save_dir), "dtype": name, "padded_vocab": cfg.padded_vocab_size()}


def _dist_to_hf(args: argparse.Namespace) -> dict:
    from klong_megatron.megatron.convert import checkpoint_dir, dist_to_hf
    from klong_megatron.megatron.hf import hf_config

    path = checkpoint_dir(args.checkpoint)
    save_dir = path.parent if path.name.startswith("iter_") else path
    source = Path(args.config) if args.config else save_dir / "hf_config"
    if not source.exists():
        raise FileNotFoundError(f"no model config: {source} does not exist (pass --config HF_DIR or MODEL.yaml)")
    cfg = _model_config(source, args.set)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    stats = dist_to_hf(path, tmp, cfg, max_shard_bytes=int(args.max_shard_gb * 2**30),
                       batch_bytes=int(args.batch_mb * 2**20))  # fmt: skip
    if source.is_dir():
        _copy_side_files(source, tmp)
    else:
        (tmp / "config.json").write_text(json.dumps({**hf_config(cfg), "torch_dtype": stats["dtype"]}, indent=2))
    if args.tokenizer:
        _copy_side_files(Path(args.tokenizer), tmp, skip_config=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return {**stats, "out": str(out)}


@one_line_errors("klong-convert")
def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    for p in (getattr(args, "hf_dir", None), getattr(args, "checkpoint", None)):
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(2, "No such file or directory", p)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("klong-convert runs in one process (the checkpoint reshards on load); not under torchrun")
    from klong_megatron.config.trainer import ParallelConfig
    from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

    start = time.perf_counter()
    init_distributed(ParallelConfig(), seed=0)
    try:
        stats = (_hf_to_dist if args.command == "hf-to-dist" else _dist_to_hf)(args)
    finally:
        destroy_distributed()
    rss = peak_rss_bytes() / 2**30
    print(f"klong-convert {args.command}: {stats['tensors']} tensors, {stats['bytes'] / 2**30:.3f} GiB -> "
          f"{stats['out']} in {time.perf_counter() - start:.1f} s (peak RSS {rss:.2f} GiB)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
