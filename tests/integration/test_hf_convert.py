"""HF <-> Megatron at scale: ``init_from_hf`` at TP 2 / PP 2 / EP 2 and ``klong-convert`` both ways, against
the unsharded path (the HF export of the same model in one process), bit for bit.

One torchrun launch (``hf_convert_worker.py``, 2 ranks, gloo) covers the three layouts; the conversions run
in this process through the CLI's ``main``. Tiny models: Qwen3-shaped dense, GLM-4.5-shaped MoE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from klong_megatron.cli.convert import main as convert
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.data.render import load_tokenizer
from klong_megatron.megatron.hf import export_hf, hf_tensors
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed
from klong_megatron.megatron.safetensors_io import SafetensorsDir
from klong_megatron.rollout.weight_group import tensor_checksum

sys.path.insert(0, str(Path(__file__).parent))
from sharded_push_worker import build, tiny  # noqa: E402

WORKER = Path(__file__).parent / "hf_convert_worker.py"
KIND = {"tp2": "dense", "pp2": "dense", "ep2": "moe"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(work dir, {kind: unsharded HF checksums}, the worker's result)."""
    work = tmp_path_factory.mktemp("hf_convert")
    sums = {}
    for kind, layout in (("dense", "tp2"), ("moe", "ep2")):
        init_distributed(ParallelConfig(), seed=1)
        try:
            cfg = tiny(layout)
            model = build(cfg, ParallelConfig(), seed=1)
            sums[kind] = {k: tensor_checksum(v) for k, v in hf_tensors(model, cfg).items()}
            export_hf(model, cfg, work / f"{kind}_hf", load_tokenizer("byte"))
        finally:
            destroy_distributed()
        convert(["hf-to-dist", str(work / f"{kind}_hf"), str(work / f"{kind}_dist"), "--tp", "2"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, str(WORKER), str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, sums, json.loads((work / "result.json").read_text())


def _sums(hf_dir: Path) -> dict[str, str]:
    hf = SafetensorsDir(hf_dir)
    return {k: tensor_checksum(hf[k]) for k in hf}


def _transformers_load(hf_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True)
    return {k: v for k, v in info.items() if v and k != "error_msgs"}


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2"])
def test_init_from_hf_and_converted_checkpoint_equal_the_unsharded_model(run, layout):
    _, sums, result = run
    assert result[layout]["hf"] == sums[KIND[layout]]  # each rank read its shards of the HF folder
    assert result[layout]["dist"] == sums[KIND[layout]]  # hf-to-dist, then loaded (resharded) at this layout


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2"])
def test_dist_to_hf_of_a_sharded_checkpoint_equals_the_unsharded_export(run, layout):
    work, sums, _ = run
    out = work / f"back_{layout}"
    convert(["dist-to-hf", str(work / f"saved_{layout}"), str(out), "--config", str(work / f"{KIND[layout]}_hf")])
    assert _sums(out) == sums[KIND[layout]]
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_hf_dist_hf_round_trip_in_shards_loads_in_transformers(run, kind):
    """Default config (the save_dir's hf_config), safetensors cut into several files with an index."""
    work, sums, _ = run
    out = work / f"round_{kind}"
    convert(["dist-to-hf", str(work / f"{kind}_dist"), str(out), "--max-shard-gb", str(40_000 / 2**30)])
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sums[kind])
    assert _sums(out) == sums[kind]
    assert _transformers_load(out) == {}  # no missing / unexpected / mismatched keys
