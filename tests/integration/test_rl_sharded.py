"""``klong-rl`` with a sharded policy under torchrun (2 ranks, gloo): TP 2 (tiny dense), PP 2 (tiny
GLM-shaped MoE, the windows through Megatron's pipeline schedule) and EP 2 (the same MoE, experts split over
the two data-parallel ranks).

One RL iteration against a ``klong-devserver`` started here (rollouts, judge and weight pushes on
rank 0, at TP 2 through the continuous-refill rollout service; every rank trains and streams its shards
into the broadcast push, ``rl.weight_sync=distributed`` with per-tensor checksum verification). Afterwards
the server must hold exactly the weights of the run's final checkpoint exported without sharding (loaded at
TP = PP = 1), which differ from the ones it started with, under policy version 1, and the update's loss and
gradient norm must be finite (an entropy bonus makes the gradient non-zero: the random tiny policy scores 0,
so advantages are 0).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.data.render import load_tokenizer
from klong_megatron.megatron import checkpoint as ckpt
from klong_megatron.megatron.hf import export_hf, hf_tensors
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed
from klong_megatron.rollout.devmodel import DevModel, HFCausalLM
from klong_megatron.rollout.devserver import DevServer
from klong_megatron.rollout.weight_group import tensor_checksum

pytestmark = [pytest.mark.bwrap, pytest.mark.usefixtures("hydra_configs")]

RUN = [
    "experiment=rl_demo",
    "rl.sft_warmup=null",
    "rl.eval_initial=false",
    "stages=[{timeout_s:15,iterations:1,rollouts_per_task:2,tasks_per_iteration:1}]",
    "rollout.max_turns=2",
    "rollout.sampling.max_new_tokens=24",
    "rollout.concurrency=2",
    "tasks.num_eval=1",
    "rl.eval_samples=1",
    "algo.filter_zero_variance=false",
    "algo.entropy_coef=0.01",
    "trainer.global_batch_size=2",
    "rl.weight_sync=distributed",
    "rollout.weight_verify=checksum",
    "rollout.weight_bucket_mb=1",
]
MOE = [  # GLM-4.5-shaped: dense first layer, shared expert, sigmoid router with expert bias, partial RoPE
    "model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_router_topk=2",
    "model.moe_shared_expert_ffn_hidden_size=64", "model.moe_first_dense_layers=1", "model.moe_router_score=sigmoid",
    "model.moe_router_expert_bias=true", "model.moe_token_dispatcher=allgather", "model.rotary_percent=0.5",
    "model.qkv_bias=true",
]  # fmt: skip
REFILL = ["rl.refill.enabled=true", "rl.refill.poll_s=0.2"]  # the TP 2 run goes through the rollout service
LAYOUTS = {
    "tp2": (["trainer.parallel.tp=2", *REFILL], []),
    "pp2_moe": (["trainer.parallel.pp=2"], MOE),
    "ep2_moe": (["trainer.parallel.ep=2"], MOE),  # DP 2: each rank trains its own rows and holds 2 of the 4 experts
}
"""layout -> (trainer overrides, model overrides)"""
TOKENIZER = "demo_bpe"  # rl_demo's


def _model_cfg(extra: list[str]):
    return OmegaConf.to_object(compose(config_name="rl", overrides=["experiment=rl_demo", *extra])).model


def _unsharded_checksums(cfg, checkpoint: Path) -> dict[str, str]:
    """HF tensor checksums of a (sharded) checkpoint loaded into one process at TP = PP = EP = 1."""
    init_distributed(ParallelConfig(), seed=0)
    try:
        model = build_gpt(cfg, parallel=ParallelConfig())
        ckpt.load_model_weights(checkpoint, model)
        return {k: tensor_checksum(v) for k, v in hf_tensors(model, cfg).items()}
    finally:
        destroy_distributed()


def _first_error(log: str) -> str:
    """The first traceback in the ranks' interleaved output (the rank that failed first) and the tail."""
    i = log.find("Traceback")
    return (log[i : i + 5000] if i >= 0 else "") + "\n[...]\n" + log[-2500:]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_rl_iteration_leaves_the_server_on_the_trained_weights(layout: str, tmp_path: Path) -> None:
    trainer, model = LAYOUTS[layout]
    cfg = _model_cfg(model)
    init_distributed(ParallelConfig(), seed=5)
    try:
        start = export_hf(build_gpt(cfg, parallel=ParallelConfig()), cfg, tmp_path / "start", load_tokenizer(TOKENIZER))
    finally:
        destroy_distributed()
    server = DevServer(DevModel(HFCausalLM.from_dir(start)), model_path=str(start)).start()
    out = tmp_path / "run"
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "klong_megatron.cli.rl", *RUN, *trainer, *model, "rollout.engine=sglang",
               f"rollout.servers=[{server.url}]", f"output_dir={out}", f"hydra.run.dir={out}/hydra"]  # fmt: skip
        # megatron-core wraps small MoE router/expert helpers in torch.compile (its jit_fuser); on the loaded CPU one
        # run in four died inside that compile on the MoE stage. Eager mode computes the same; the test is the run.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
        log = proc.stdout + proc.stderr
        (tmp_path / "run.log").write_text(log)
        assert proc.returncode == 0, _first_error(log)
        served = {k: tensor_checksum(v) for k, v in server.model.named_tensors().items()}
        version = server.model.weight_version
    finally:
        server.close()
    state = json.loads((out / "rl_state.json").read_text())
    assert state["version"] == 1 and version == "1"
    step = re.search(r"rl/stage0 step\s+1 .*", log)
    assert step, log[-4000:]
    metrics = dict(re.findall(r"(pg_loss|grad_norm) (\S+)", step.group(0)))
    assert math.isfinite(float(metrics["pg_loss"])) and float(metrics["grad_norm"]) > 0, metrics
    want = _unsharded_checksums(cfg, out / "checkpoints")
    first = {k: tensor_checksum(v) for k, v in HFCausalLM.from_dir(start).checkpoint_tensors().items()}
    assert {k: served.get(k) for k in want} == want  # the server == the unsharded export, tensor by tensor
    assert sum(first[k] != want[k] for k in want) > len(want) // 2  # and the update changed the weights
    if REFILL[0] in trainer:  # the update trained a whole group the rollout service logged
        groups = [json.loads(line) for line in (out / "refill" / "groups.jsonl").read_text().splitlines()]
        assert groups[0]["status"] == "complete" and len(groups[0]["ids"]) == 2 and state["groups_taken"] >= 1
