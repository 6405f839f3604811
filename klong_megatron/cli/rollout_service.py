"""``klong-rollout-service``: the RL run's rollouts in their own process (continuous refill).

    klong-rollout-service experiment=rl_qwen3_8b output_dir=OUT rollout.engine=sglang \\
        rollout.servers=[http://n3:30000] rollout.weight_pause_mode=retract rl.refill.enabled=true rl.refill.port=32000
    klong-rl experiment=rl_qwen3_8b output_dir=OUT ... rl.refill.service_url=http://n3:32000   # the trainer

Same Hydra config as ``klong-rl`` (same overrides: tasks, stages, rollout, sandbox, judge). It starts the
judge, the sandbox pool and a client of the rollout servers, then the rollout service
(``rollout/service.py``) over ``output_dir/refill`` and its HTTP control (``rollout/service_http.py``),
and prints ``klong-rollout-service listening on http://HOST:PORT``. The trainer reads the judged groups
from the shared ``output_dir`` and pushes new weights to the same servers itself; rollouts in flight
continue across those pushes (paused server-side, every token tagged with its policy version).

Exit: SIGTERM / Ctrl-C stop it (exit 128 + N; running rollouts are dropped, a restart resumes their
groups). Killed any way and restarted on the same output_dir, it continues: nothing stored is run again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from klong_megatron.cli._errors import INPUT_ERRORS, check_hydra_overrides, one_line_errors
from klong_megatron.cli.sft import _run_names
from klong_megatron.config import CONFIG_DIR, register_configs
from klong_megatron.config.rl import RLConfig
from klong_megatron.errors import UserError

READY = "klong-rollout-service listening on "


async def serve_rollouts(cfg: RLConfig, out: Path) -> int:
    """Run the service until SIGTERM / SIGINT; returns the signal number."""
    from klong_megatron.data.context import ContextPolicy
    from klong_megatron.data.dataset import load_tokenizer
    from klong_megatron.data.render import Renderer
    from klong_megatron.logging import MetricsLogger
    from klong_megatron.rl.batches import build_rl_service
    from klong_megatron.rl.rollouts import RLRollouts
    from klong_megatron.rl.services import RLServices
    from klong_megatron.rl.tasks import build_task_sets
    from klong_megatron.rl.trainer import prepare_rubrics
    from klong_megatron.rollout.service_http import serve

    renderer = Renderer(load_tokenizer(cfg.data.tokenizer))
    ctx = ContextPolicy.from_renderer(cfg.data.policy, renderer)
    train, held = build_task_sets(cfg.tasks)
    prepare_rubrics(train + held, cfg.judge)
    logger = MetricsLogger(cfg.logger, enabled=False, run_dir=out)
    services = RLServices(cfg, out, None, renderer.tokenizer)
    stopped = asyncio.Event()
    got: list[int] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (got.append(s), stopped.set()))
    try:
        await services.start_rollouts()
        service = build_rl_service(cfg, out, RLRollouts(cfg, out, renderer, ctx, train, services, logger), train)
        await service.start()
        server = serve(service, loop, "0.0.0.0", cfg.rl.refill.port)
        print(f"{READY}http://{socket.gethostname()}:{server.server_address[1]}", flush=True)
        await stopped.wait()
        server.shutdown()
        await service.close()
    finally:
        await services.stop()
    return got[0] if got else 0


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="rl")
@one_line_errors("klong-rollout-service", INPUT_ERRORS)
def _main(dcfg: DictConfig) -> None:
    cfg: RLConfig = OmegaConf.to_object(dcfg)
    if not cfg.rl.refill.enabled or cfg.rl.refill.service_url:
        raise UserError("set rl.refill.enabled=true (and no rl.refill.service_url: that is "
                         "the trainer's setting pointing at this service)")  # fmt: skip
    if cfg.rollout.engine != "sglang" or cfg.rollout.weight_pause_mode == "abort":
        raise UserError("the trainer pushes weights to the servers while rollouts run: "
                         "use rollout.engine=sglang with rollout.servers and rollout.weight_pause_mode=retract "
                         "or in_place")  # fmt: skip
    if cfg.dry_run:
        print(f"dry run OK: rollout service over {len(cfg.stages)} stage(s), {cfg.rollout.concurrency} concurrent "
              f"rollouts, servers {list(cfg.rollout.servers)}, port {cfg.rl.refill.port}")  # fmt: skip
        return
    logging.getLogger("httpx").setLevel(logging.WARNING)
    output_dir, _ = _run_names()
    sig = asyncio.run(serve_rollouts(cfg, Path(cfg.output_dir or output_dir)))
    if sig:
        raise SystemExit(128 + sig)


@one_line_errors("klong-rollout-service")
def main() -> None:
    register_configs()
    check_hydra_overrides("klong-rollout-service", CONFIG_DIR, "rl")
    _main()


if __name__ == "__main__":
    sys.exit(main())
