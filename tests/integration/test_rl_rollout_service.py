"""Continuous refill with the rollout service in its own process (``klong-rollout-service``) beside
``klong-rl``: a dev server over HTTP (SGLang's API), bubblewrap sandboxes, the demo tasks' check judge,
a tiny model. Each side is SIGKILLed mid-run and restarted; the run completes, no rollout or group is
stored twice, and the trainer takes every group at most once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_rl_trainer import TINY
from test_slurm_rl import SMALL_RL, _env, _read, _submit_and_wait, tiny_hf_policy

from klong_megatron.rl.servers import DevServerProcess
from klong_megatron.rl.weight_sync import free_port

ITERATIONS = 2


def _config(out: Path, server: str) -> list[str]:
    stage = f"stages=[{{timeout_s:15,iterations:{ITERATIONS},rollouts_per_task:2,tasks_per_iteration:2}}]"
    return [*TINY, stage, "rl.eval_initial=false", "rl.refill.enabled=true", "rl.refill.poll_s=0.2",
            "rollout.engine=sglang", f"rollout.servers=[{server}]", "rollout.weight_pause_mode=retract",
            f"output_dir={out}"]  # fmt: skip


def _start(module: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)  # fmt: skip


def _wait(cond, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
            pytest.fail(f"waiting for {what}: {'a process exited' if dead else 'timeout'}\n{tails}")
        time.sleep(0.3)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _state(out: Path) -> dict:
    path = out / "rl_state.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.bwrap
def test_service_and_trainer_each_survive_a_sigkill_of_the_other(tmp_path: Path) -> None:
    dev = DevServerProcess(tiny_hf_policy(tmp_path / "hf"), threads=1)
    out, port = tmp_path / "run", free_port()
    svc_log, trainer_log = tmp_path / "service.log", tmp_path / "trainer.log"
    svc_args = [*_config(out, dev.url), f"rl.refill.port={port}", f"hydra.run.dir={tmp_path}/hydra_svc"]
    trainer_args = [*_config(out, dev.url), f"rl.refill.service_url=http://127.0.0.1:{port}",
                    f"hydra.run.dir={tmp_path}/hydra_rl"]  # fmt: skip
    groups = out / "refill" / "groups.jsonl"
    procs: list[subprocess.Popen] = []
    try:
        service = _start("klong_megatron.cli.rollout_service", svc_args, svc_log)
        trainer = _start("klong_megatron.cli.rl", trainer_args, trainer_log)
        procs = [service, trainer]
        logs = [svc_log, trainer_log]
        _wait(lambda: len(_lines(groups)) >= 1, "a first complete group", procs, logs)

        # 1. SIGKILL the service mid-run (rollouts in flight), restart it: the trainer waits it out.
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()
        stored_before = {r["id"] for r in _lines(out / "refill" / "rollouts.jsonl")}
        service = _start("klong_megatron.cli.rollout_service", svc_args, svc_log)
        procs = [service, trainer]
        _wait(lambda: _state(out).get("iteration", 0) >= 1, "the first update", procs, logs)

        # 2. SIGKILL the trainer after an update; the service goes on filling the buffer; restart the trainer.
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
        taken = _state(out)["groups_taken"]
        _wait(lambda: len(_lines(groups)) >= taken + 2, "groups finished while the trainer is down", [service], logs)
        trainer = _start("klong_megatron.cli.rl", trainer_args, trainer_log)
        procs = [service, trainer]
        assert trainer.wait(timeout=300) == 0, trainer_log.read_text()[-4000:]
        assert service.poll() is None, "the service survived the trainer's SIGKILL and restart"
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        dev.close()

    state = _state(out)
    assert (state["stage"], state["version"]) == (1, ITERATIONS), state
    log = _lines(groups)
    names = [e["group"] for e in log]
    assert len(names) == len(set(names)), "a group logged twice"
    records = _lines(out / "refill" / "rollouts.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a rollout stored twice"
    assert stored_before <= set(ids)
    assert all(e["status"] == "complete" and len(e["ids"]) + len(e["failed"]) == 2 for e in log)
    assert state["groups_taken"] >= 2 * ITERATIONS  # every update took 2 whole groups, none twice
    text = svc_log.read_text()
    assert text.count("klong-rollout-service listening on") == 2, text[-3000:]
    # the service's rollouts ran under the versions the trainer pushed meanwhile (per-turn weight_version)
    versions = {step["weight_version"] for r in records for step in r["meta"]["steps"]}
    assert len(versions) >= 2, versions


def test_sbatch_dry_run_plans_the_rollout_service_step(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "run"), "DRY_RUN": "1",
           "NODELIST": "n1,n2", "TRAIN_NODES": "1", "GPUS_PER_NODE": "2", "INIT_FROM_HF": "/models/policy",
           "ROLLOUT_SERVICE": "1", "SERVICE_PORT": "32100"}  # fmt: skip
    proc = subprocess.run(["bash", str(root / "slurm" / "rl.sbatch"), "experiment=rl_demo"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rollout service: http://n2:32100" in out
    assert "rl.refill.service_url=http://n2:32100" in out and "rollout.weight_pause_mode=retract" in out
    line = next(x for x in out.splitlines() if "rollout service command:" in x)
    assert "klong_megatron.cli.rollout_service" in line and f"output_dir={tmp_path / 'run'}" in line
    assert "rl.refill.port=32100" in line and "service_url" not in line  # the service is not its own client
    assert "config validated" in out


@pytest.mark.bwrap
def test_in_process_refill_resumes_after_sigkill_and_trains_whole_groups(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "trainer.log"
    stage = f"stages=[{{timeout_s:15,iterations:{ITERATIONS},rollouts_per_task:2,tasks_per_iteration:2}}]"
    args = [*TINY, stage, "rl.eval_initial=false", "rl.refill.enabled=true", "rl.refill.poll_s=0.2",
            f"output_dir={out}", f"hydra.run.dir={tmp_path}/hydra"]  # fmt: skip
    trainer = _start("klong_megatron.cli.rl", args, log)
    try:
        _wait(lambda: _state(out).get("iteration", 0) >= 1, "the first update", [trainer], [log])
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
        trainer = _start("klong_megatron.cli.rl", args, log)
        assert trainer.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
    state = _state(out)
    assert (state["stage"], state["version"]) == (1, ITERATIONS), state
    entries = _lines(out / "refill" / "groups.jsonl")
    assert len({e["group"] for e in entries}) == len(entries) >= state["groups_taken"] >= 2 * ITERATIONS
    records = _lines(out / "refill" / "rollouts.jsonl")
    assert len({r["id"] for r in records}) == len(records)
    taken = entries[: state["groups_taken"]]
    assert all(len(e["ids"]) + len(e["failed"]) == 2 for e in taken)  # groups stay whole
    versions = {step["weight_version"] for r in records for step in r["meta"]["steps"]}
    assert len(versions) >= 2, versions  # rollouts kept running across weight updates


@pytest.mark.slurm
@pytest.mark.bwrap
def test_sbatch_runs_the_rollout_service_as_its_own_step(tmp_path: Path) -> None:
    hf = tiny_hf_policy(tmp_path / "tiny_hf")
    port, service_port = free_port(), free_port()
    env = _env(tmp_path, SERVER="dev", GPUS_PER_NODE="1", GPUS_PER_SERVER="1", INIT_FROM_HF=str(hf),
               ROLLOUT_PORT=str(port), HEALTH_POLL_S="1", HEALTH_TIMEOUT_S="180", SERVER_ARGS="--threads 1",
               ROLLOUT_SERVICE="1", SERVICE_PORT=str(service_port))  # fmt: skip
    state, log = _submit_and_wait(tmp_path, env, [*SMALL_RL, "rl.refill.poll_s=0.2"], timeout_s=420)
    run = tmp_path / "run"
    service_log = "".join(_read(f) for f in (run / "logs").glob(f"server-*-{service_port}.log"))
    context = f"\n--- job log ---\n{log[-6000:]}\n--- service log ---\n{service_log[-3000:]}"
    assert state == "COMPLETED", f"JobState={state}{context}"
    assert "rollout service: http://" in log and f":{service_port} healthy" in log, context
    assert "klong-rollout-service listening on" in service_log, context
    assert _state(run)["groups_taken"] >= 2, context  # the one update took its groups from the service's log
    assert _lines(run / "refill" / "groups.jsonl") and not list(run.glob("rollouts/stage0_iter*.jsonl"))
    assert "stopping 2 server(s)" in log and "still running after" not in log, context
