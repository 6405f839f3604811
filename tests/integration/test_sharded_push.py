"""Sharded weight push under torchrun (2 ranks, gloo): TP 2, PP 2 and EP 2 (a GLM-shaped MoE).

Each layout streams its shards to rank 0 (``hf_sharded.hf_tensor_stream``), which pushes them to a
``klong-devserver`` with SGLang's protocol. The server must end with weights identical to the
unsharded export of the same model (every tensor's checksum equal under its HF name) and generate
the same greedy tokens as a dev model loaded from that export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.data.render import load_tokenizer
from klong_megatron.megatron.hf import export_hf, hf_tensors
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed
from klong_megatron.rollout.devmodel import DevModel, HFCausalLM
from klong_megatron.rollout.devserver import DevServer
from klong_megatron.rollout.engine import SamplingParams
from klong_megatron.rollout.weight_group import tensor_checksum

sys.path.insert(0, str(Path(__file__).parent))
from sharded_push_worker import build, tiny  # noqa: E402

WORKER = Path(__file__).parent / "sharded_push_worker.py"
PROMPT = [72, 101, 108, 108, 111]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


def _export(layout: str, seed: int, out: Path) -> tuple[Path, dict[str, str]]:
    """The unsharded model (one process, same layout-independent init) as an HF dir + its checksums."""
    init_distributed(ParallelConfig(), seed=seed)
    try:
        cfg = tiny(layout)
        model = build(cfg, ParallelConfig(), seed)
        sums = {k: tensor_checksum(v) for k, v in hf_tensors(model, cfg).items()}
        return export_hf(model, cfg, out, load_tokenizer("byte")), sums
    finally:
        destroy_distributed()


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2"])
def test_sharded_push_equals_the_unsharded_export(layout, tmp_path):
    start, _ = _export(layout, seed=2, out=tmp_path / "start")
    expected, sums = _export(layout, seed=1, out=tmp_path / "expected")
    server = DevServer(DevModel(HFCausalLM.from_dir(start)), model_path=str(start)).start()
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               layout, str(tmp_path / "out.json"), server.url]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        got = json.loads((tmp_path / "out.json").read_text())
        served = server.model.generate(PROMPT, GREEDY)
    finally:
        server.close()
    assert got["checksums"] == sums  # the stream == the unsharded export, name by name, bit for bit
    assert got["stats"]["buckets"] > 3
    reference = DevModel(HFCausalLM.from_dir(expected)).generate(PROMPT, GREEDY)
    before = DevModel(HFCausalLM.from_dir(start)).generate(PROMPT, GREEDY)
    assert served.output_ids == reference.output_ids and served.weight_version == f"{layout}-v1"
    assert served.output_logprobs == pytest.approx(reference.output_logprobs, abs=1e-5)
    assert before.output_logprobs != pytest.approx(reference.output_logprobs, abs=1e-3)
