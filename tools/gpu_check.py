"""One command that validates the GPU path on one H100/H200 and writes a JSON report (``tools/gpu_check.sh``).

    tools/gpu_check.sh [--out gpu_check.json] [--only NAME ...]

Each check runs in its own subprocess under a time limit (a crash or hang fails that check only; the whole
run is sized to finish in ~8 minutes) and reports ``pass`` / ``fail`` (with the error) or ``skipped`` with the
reason when what it needs is not installed (no CUDA device, no Transformer Engine). Checks:

  versions          torch / CUDA / cuDNN / NCCL / TE / Apex / flash-attn / megatron-core / transformers / sglang
  te_thd_vs_mask    TE + packed THD (micro-batch of 2, one segment of exactly S tokens) vs the local spec with
                    a block-diagonal mask on the same weights
  sft_te_fp32       SFT steps with TE in fp32 vs the CPU (gloo) reference losses of the same run, |diff| < 1e-3
  sft_te_bf16       the same in bf16: finite and within 5e-2 of the reference
  distopt_resume    distributed optimizer: 4 steps == 2 steps + stop + resume 2 steps
  bf16_reload       bf16 weights -> HF safetensors -> a fresh model: identical logits; config.json says bf16
  moe_te_alltoall   a tiny MoE with TE and the alltoall dispatcher: equal to allgather, finite gradients
  moe_grouped_gemm  TE grouped-GEMM experts (HF names mapped) vs SequentialMLP experts on the same HF weights,
                    packed THD with a padding mask (padding out of the routing statistics)
  rl_loss_te_thd    the RL loss (PPO clip, KL, TIS, per-token temperatures) and log-probs with TE on packed THD
                    vs the local spec's block mask: equal loss sum, token count and log-probs (fp32)
  thd_cp2           2 GPUs: SFT with TE, THD and context parallelism 2 (torchrun, NCCL) vs CP 1 losses
  logprobs_32k      chunked log-probs at T = 32k, V = 152k, H = 4096 (bf16): peak extra memory and time
  sft_1b_mfu        tokens/s and MFU (datasheet and measured peak) of a ~1B model at 8k and 16k packed tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration"), str(ROOT / "benchmarks")]
CHECKS: dict[str, tuple[Callable[[], dict], tuple[str, ...], int]] = {}


def check(name: str, needs: tuple[str, ...] = ("cuda",), timeout_s: int = 90):
    def register(fn: Callable[[], dict]) -> Callable[[], dict]:
        CHECKS[name] = (fn, needs, timeout_s)
        return fn

    return register


def missing(needs: tuple[str, ...]) -> str | None:
    """Why a check cannot run here (None when everything it needs is present)."""
    import torch

    if "cuda" in needs and not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    if "2gpus" in needs and torch.cuda.device_count() < 2:
        return f"needs 2 GPUs (CP 2 over NCCL), found {torch.cuda.device_count()}"
    if "te" in needs:
        from klong_megatron.megatron import model

        if not model.HAVE_TE:
            return "transformer_engine is not importable (use tools/images/train.Dockerfile or the train-gpu extra)"
    return None


# ----- the checks (each runs in a child process) ---------------------------------------------------------------
@check("versions", needs=(), timeout_s=60)
def versions() -> dict:
    import importlib.metadata as md

    import torch

    from klong_megatron.sft.metrics import datasheet_peak_tflops

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for dist in ("megatron-core", "transformer-engine", "transformer_engine_torch", "apex", "flash-attn",
                 "transformers", "sglang"):  # fmt: skip
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        out.update(device=name, devices=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version(), nccl=nccl,
                   datasheet_bf16_tflops=datasheet_peak_tflops(name))  # fmt: skip
    return {"status": "pass", **out}


def _tiny(**kw):
    from klong_megatron.config.model import ModelConfig

    base = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                vocab_size=256, make_vocab_size_divisible_by=128, seq_length=256, transformer_impl="te")  # fmt: skip
    return ModelConfig(**{**base, **kw})


def _init():
    from klong_megatron.config.trainer import ParallelConfig
    from klong_megatron.megatron.parallel import init_distributed

    init_distributed(ParallelConfig(), seed=0)


def _packed_micro_batch(seq: int = 128) -> dict:
    """Micro-batch of 2 rows: segments [50, 78] and one segment of exactly ``seq`` tokens."""
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, seq), generator=g)
    pos = torch.cat([torch.arange(50), torch.arange(seq - 50), torch.arange(seq)]).reshape(2, seq)
    cu = torch.tensor([0, 50, seq, 2 * seq], dtype=torch.int32)
    padding = torch.zeros(2, seq, dtype=torch.bool)
    padding[0, -8:] = True  # a row's fill (for MoE routing statistics; dense models ignore it)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, seq), "position_ids": pos,
            "cu_seqlens": cu, "trajectory_ids": [["a", "b"], ["c"]], "padding_mask": padding}  # fmt: skip


def _on_gpu(batch: dict) -> dict:
    import torch

    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@check("te_thd_vs_mask", needs=("cuda", "te"))
def te_thd_vs_mask() -> dict:
    import torch

    from klong_megatron.data.dataset import block_causal_mask
    from klong_megatron.megatron.hf import load_hf_weights, save_hf_weights
    from klong_megatron.megatron.model import build_gpt
    from klong_megatron.megatron.step import packed_seq_params
    from klong_megatron.sft.batches import thd_batch_for_cp_rank

    _init()
    te_cfg, local_cfg = _tiny(), _tiny(transformer_impl="local")
    te, local = build_gpt(te_cfg, bf16=True).eval(), build_gpt(local_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_hf_weights(te, te_cfg, d)
        load_hf_weights(local, d, local_cfg)
    b = _on_gpu(thd_batch_for_cp_rank(_packed_micro_batch(), 1, 0))
    with torch.no_grad():
        ours = te(b["tokens"], b["position_ids"], None, packed_seq_params=packed_seq_params(b)).float()
        mask = block_causal_mask(b["cu_seqlens_padded"].cpu(), b["tokens"].shape[1])[None].cuda()
        ref = local(b["tokens"], b["position_ids"], mask).float()
    rel = float((ours - ref).abs().max() / ref.abs().max())
    return {"status": "pass" if rel < 3e-2 else "fail", "max_rel_diff_bf16_vs_fp32": rel, "tolerance": 3e-2}


def _sft_losses(out: Path, overrides: list[str], cpu: bool = False, nproc: int = 1) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    out.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(nproc)]  # fmt: skip
    cmd = [*launch, str(ROOT / "tests" / "integration" / "sft_driver.py"), str(out), "trainer.train_steps=4",
           "trainer.layout_independent_init=true", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(overrides)}: {(proc.stdout + proc.stderr)[-1500:]}")
    return json.loads((out / "summary.json").read_text())["losses"]


def _sft_vs_cpu(bf16: bool, tolerance: float) -> dict:
    import math

    with tempfile.TemporaryDirectory() as d:
        ref = _sft_losses(Path(d) / "cpu", ["trainer.bf16=false", "model.transformer_impl=local"], cpu=True)
        gpu = _sft_losses(Path(d) / "gpu", [f"trainer.bf16={str(bf16).lower()}", "model.transformer_impl=te"])
    diff = max(abs(a - b) for a, b in zip(ref, gpu, strict=True))
    ok = all(math.isfinite(x) for x in gpu) and diff < tolerance
    return {"status": "pass" if ok else "fail", "cpu_losses": ref, "te_losses": gpu, "max_abs_diff": diff,
            "tolerance": tolerance}  # fmt: skip


@check("sft_te_fp32", needs=("cuda", "te"), timeout_s=240)
def sft_te_fp32() -> dict:
    return _sft_vs_cpu(bf16=False, tolerance=1e-3)


@check("sft_te_bf16", needs=("cuda", "te"), timeout_s=240)
def sft_te_bf16() -> dict:
    return _sft_vs_cpu(bf16=True, tolerance=5e-2)


@check("distopt_resume", needs=("cuda", "te"), timeout_s=200)
def distopt_resume() -> dict:
    # the GPU presets' settings: overlapped reduce and param gather, async + fully parallel saves every step
    common = ["trainer.parallel.use_distributed_optimizer=true", "model.transformer_impl=te", "trainer.save_every=1",
              "trainer.parallel.overlap_param_gather=true", "trainer.parallel.overlap_grad_reduce=true",
              "trainer.async_save=true", "trainer.fully_parallel_save=true"]  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        whole = _sft_losses(Path(d) / "whole", common)
        save = f"trainer.save_dir={Path(d) / 'ckpt'}"
        first = _sft_losses(Path(d) / "first", [*common, save, "trainer.exit_after_steps=2"])
        rest = _sft_losses(Path(d) / "rest", [*common, save])
    diff = max(abs(a - b) for a, b in zip(whole, first + rest, strict=True))
    return {"status": "pass" if diff < 1e-6 else "fail", "uninterrupted": whole, "resumed": first + rest,
            "max_abs_diff": diff}  # fmt: skip


@check("bf16_reload", needs=("cuda", "te"))
def bf16_reload() -> dict:
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    from klong_megatron.megatron.hf import export_hf, load_hf_weights
    from klong_megatron.megatron.model import build_gpt

    _init()
    cfg = _tiny()
    a, b = build_gpt(cfg, bf16=True).eval(), build_gpt(cfg, bf16=True).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")))
    tokens = torch.randint(0, 256, (1, 64), device="cuda")
    pos = torch.arange(64, device="cuda")[None]
    with tempfile.TemporaryDirectory() as d:
        export_hf(a, cfg, d, tok)
        dtype = json.loads((Path(d) / "config.json").read_text())["torch_dtype"]
        load_hf_weights(b, d, cfg)
    with torch.no_grad():
        same = torch.equal(a(tokens, pos, None), b(tokens, pos, None))
    return {"status": "pass" if same and dtype == "bfloat16" else "fail", "identical_logits": same,
            "config_torch_dtype": dtype}  # fmt: skip


@check("moe_te_alltoall", needs=("cuda", "te"))
def moe_te_alltoall() -> dict:
    import torch

    from klong_megatron.megatron.model import build_gpt
    from klong_megatron.megatron.step import packed_seq_params
    from klong_megatron.sft.batches import thd_batch_for_cp_rank

    _init()
    moe = _tiny(num_experts=4, moe_ffn_hidden_size=64, moe_router_topk=2, moe_token_dispatcher="alltoall")
    a2a = build_gpt(moe, bf16=True)
    ag = build_gpt(replace(moe, moe_token_dispatcher="allgather"), bf16=True)
    ag.load_state_dict(a2a.state_dict())
    b = _on_gpu(thd_batch_for_cp_rank(_packed_micro_batch(), 1, 0))
    outs = []
    for m in (a2a, ag):
        loss = m(b["tokens"], b["position_ids"], None, labels=b["labels"], packed_seq_params=packed_seq_params(b))
        loss.float().mean().backward()
        outs.append(loss.detach().float())
    grads_finite = all(torch.isfinite(p.grad).all() for p in a2a.parameters() if p.grad is not None)
    diff = float((outs[0] - outs[1]).abs().max())
    return {"status": "pass" if grads_finite and diff < 5e-2 else "fail", "alltoall_vs_allgather_max_diff": diff,
            "grads_finite": bool(grads_finite)}  # fmt: skip


@check("moe_grouped_gemm", needs=("cuda", "te"))
def moe_grouped_gemm() -> dict:
    import torch

    from klong_megatron.megatron.hf import load_hf_weights, save_hf_weights
    from klong_megatron.megatron.model import build_gpt
    from klong_megatron.megatron.step import packed_seq_params
    from klong_megatron.sft.batches import thd_batch_for_cp_rank

    _init()
    moe = _tiny(num_experts=4, moe_ffn_hidden_size=64, moe_router_topk=2, moe_token_dispatcher="allgather",
                moe_aux_loss_coeff=0.01, moe_grouped_gemm=True)  # fmt: skip
    grouped, sequential = build_gpt(moe), build_gpt(replace(moe, moe_grouped_gemm=False))
    names = {n for n, _ in grouped.named_parameters() if ".experts." in n}
    with tempfile.TemporaryDirectory() as d:
        save_hf_weights(grouped, moe, d)
        load_hf_weights(sequential, d, replace(moe, moe_grouped_gemm=False))
    b = _on_gpu(thd_batch_for_cp_rank(_packed_micro_batch(), 1, 0))
    outs = []
    for m in (grouped, sequential):
        loss = m(b["tokens"], b["position_ids"], None, labels=b["labels"], packed_seq_params=packed_seq_params(b),
                 padding_mask=b["padding_mask"])  # fmt: skip
        loss.float().mean().backward()
        outs.append(loss.detach().float())
    grads_finite = all(torch.isfinite(p.grad).all() for p in grouped.parameters() if p.grad is not None)
    rel = float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())
    return {"status": "pass" if grads_finite and rel < 1e-3 else "fail", "grouped_vs_sequential_max_rel_diff": rel,
            "grads_finite": bool(grads_finite), "grouped_expert_names": sorted(names)[:4]}  # fmt: skip


@check("rl_loss_te_thd", needs=("cuda", "te"))
def rl_loss_te_thd() -> dict:
    import torch

    from klong_megatron.config.grpo import GRPOConfig
    from klong_megatron.megatron.hf import load_hf_weights, save_hf_weights
    from klong_megatron.megatron.model import build_gpt
    from klong_megatron.megatron.rl_loss import make_logprob_forward_step, make_rl_forward_step
    from klong_megatron.rl.policy import gather_thd_tokens, thd_rl_micro_batch

    _init()
    te_cfg, local_cfg = _tiny(), _tiny(transformer_impl="local")
    te, local = build_gpt(te_cfg), build_gpt(local_cfg)
    with tempfile.TemporaryDirectory() as d:
        save_hf_weights(te, te_cfg, d)
        load_hf_weights(local, d, local_cfg)
    g = torch.Generator().manual_seed(1)
    batch = _packed_micro_batch()
    old = -5.0 + 0.5 * torch.randn(2, 128, generator=g)
    batch |= {"advantages": torch.randn(2, 128, generator=g), "old_logprobs": old, "ref_logprobs": old + 0.1,
              "rollout_logprobs": old - 0.1, "temperatures": torch.full((2, 128), 0.8)}  # fmt: skip
    algo = GRPOConfig(kl_coef=0.05, tis_cap=2.0)
    got = {}
    for name, model, block_mask in (("te", te, False), ("local", local, True)):
        model.config.calculate_per_token_loss = True
        mb = _on_gpu(thd_rl_micro_batch(batch, 1, 0, block_mask=block_mask))
        hidden, loss_func = make_rl_forward_step(algo)(iter([mb]), model)
        loss_sum, n, _ = loss_func(hidden)
        loss_sum.backward()
        with torch.no_grad():
            hidden, report = make_logprob_forward_step(chunk_size=64)(iter([mb]), model)
            logprobs = gather_thd_tokens(report(hidden)[2]["logprobs"], mb, None)
        got[name] = (float(loss_sum), int(n), logprobs.float())
    loss_rel = abs(got["te"][0] - got["local"][0]) / abs(got["local"][0])
    lp_diff = float((got["te"][2] - got["local"][2]).abs().max())
    ok = loss_rel < 1e-3 and lp_diff < 1e-3 and got["te"][1] == got["local"][1]
    return {"status": "pass" if ok else "fail", "loss_sum_rel_diff": loss_rel, "logprobs_max_abs_diff": lp_diff,
            "tokens": got["te"][1]}  # fmt: skip


@check("thd_cp2", needs=("cuda", "te", "2gpus"), timeout_s=240)
def thd_cp2() -> dict:
    common = ["model.transformer_impl=te", "trainer.packed_format=thd", "trainer.bf16=false"]
    with tempfile.TemporaryDirectory() as d:
        cp1 = _sft_losses(Path(d) / "cp1", common)
        cp2 = _sft_losses(Path(d) / "cp2", [*common, "trainer.parallel.cp=2"], nproc=2)
    diff = max(abs(a - b) for a, b in zip(cp1, cp2, strict=True))
    return {"status": "pass" if diff < 1e-3 else "fail", "cp1_losses": cp1, "cp2_losses": cp2, "max_abs_diff": diff}


@check("logprobs_32k", needs=("cuda",), timeout_s=120)
def logprobs_32k() -> dict:
    from logprobs_memory import measure

    r = measure("chunked", 32768, 151936, 4096, "bfloat16", "cuda", 4096)
    return {"status": "pass", "T": 32768, "V": 151936, "H": 4096, "peak_extra_gib": r["peak_extra"] / 2**30,
            "seconds": r["seconds"]}  # fmt: skip


@check("sft_1b_mfu", needs=("cuda", "te"), timeout_s=240)
def sft_1b_mfu() -> dict:
    import sft_gpu

    peak = sft_gpu.measured_bf16_peak_tflops()
    rows = [sft_gpu.run_seq(seq, 6, peak, recompute=False) for seq in (8192, 16384)]
    return {"status": "pass", "measured_bf16_peak_tflops": peak, "rows": rows}


# ----- the runner --------------------------------------------------------------------------------------------
def run_one(name: str) -> dict:
    fn, needs, _ = CHECKS[name]
    reason = missing(needs)
    if reason:
        return {"status": "skipped", "reason": reason}
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # the report names what failed; the other checks still run
        result = {
            "status": "fail",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:],
        }
    return {**result, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--only", nargs="+", choices=sorted(CHECKS))
    ap.add_argument("--one", choices=sorted(CHECKS), help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args()
    if a.one:
        print("GPU_CHECK_RESULT " + json.dumps(run_one(a.one)))
        return
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checks": {}}
    for name in a.only or list(CHECKS):
        report["checks"][name] = _child(name, CHECKS[name][2])
        print(f"{name:16s} {report['checks'][name]['status']:8s} {_summary(report['checks'][name])}", flush=True)
    statuses = [c["status"] for c in report["checks"].values()]
    report["ok"] = "fail" not in statuses
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"report: {a.out} ({statuses.count('pass')} pass, {statuses.count('fail')} fail, "
          f"{statuses.count('skipped')} skipped)")  # fmt: skip
    sys.exit(0 if report["ok"] else 1)


def _child(name: str, timeout_s: int) -> dict:
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              timeout=timeout_s, cwd=ROOT)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "fail", "error": f"timed out after {timeout_s} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("GPU_CHECK_RESULT "):
            return json.loads(line.removeprefix("GPU_CHECK_RESULT "))
    return {"status": "fail", "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}


def _summary(result: dict) -> str:
    if result["status"] == "skipped":
        return result["reason"]
    if "error" in result:
        return result["error"].splitlines()[0][:100]
    keys = [k for k in result if k not in ("status", "traceback", "rows", "cpu_losses", "te_losses", "uninterrupted",
                                           "resumed", "cp1_losses", "cp2_losses", "grouped_expert_names")]  # fmt: skip
    return ", ".join(f"{k}={result[k]}" for k in keys)[:160]


if __name__ == "__main__":
    main()
