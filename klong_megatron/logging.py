"""Step metrics to the console (rich) and, optionally, to Weights & Biases.

Only global rank 0 logs. ``wandb`` is imported lazily, only for ``logger.backend=wandb``; its mode
comes from ``logger.mode``, else the ``WANDB_MODE`` environment variable, else "online" (offline
in tests and on machines without network). The run records the resolved config, the git commit of
the code, and the Hydra-derived name/group. The run id is kept in ``<run_dir>/wandb_run_id``: a job
preempted and resumed (or rerun) with the same output directory continues the same W&B run
(``resume="allow"``), its steps continuing from the checkpoint's; each Hydra multirun job has its own
output directory and so its own run. Limits: no W&B server is started; offline runs are synced later
with ``wandb sync``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console

from klong_megatron.config.logger import LoggerConfig

RUN_ID_FILE = "wandb_run_id"
_ORDER = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "windows", "trained_tokens")


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit hash of the repository holding ``path`` (default: this package), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_id(run_dir: str | Path) -> str:
    """The W&B run id kept in ``<run_dir>/wandb_run_id``; a new one is made and kept on first use."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file() and (kept := path.read_text().strip()):
        return kept
    new = uuid.uuid4().hex[:12]  # W&B run ids: lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


def _fmt(key: str, value: float) -> str:
    if key == "lr":
        return f"{key} {value:.3e}"
    if key in ("windows", "trained_tokens", "tokens_per_s"):
        return f"{key} {value:,.0f}"
    if key == "mfu":
        return f"{key} {100 * value:.2f}%"
    return f"{key} {value:.4f}"


class MetricsLogger:
    """``log(step, metrics)`` prints one line and (W&B) records the metrics; ``finish()`` closes the run."""

    def __init__(
        self,
        cfg: LoggerConfig,
        *,
        enabled: bool,
        run_dir: str | Path,
        config: dict[str, Any] | None = None,
        default_name: str | None = None,
        default_group: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        self.run = None
        if not enabled or cfg.backend != "wandb":
            return
        import wandb

        mode = cfg.mode or os.environ.get("WANDB_MODE") or "online"
        wandb_dir = Path(cfg.dir or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            id=cfg.id or run_id(run_dir),
            resume="allow",
            project=cfg.project,
            entity=cfg.entity,
            mode=mode,
            dir=str(wandb_dir),
            name=cfg.name or default_name,
            group=cfg.group or default_group,
            tags=list(cfg.tags) or None,
            config={**(config or {}), "git_commit": git_commit()},
        )

    @property
    def wandb_run_dir(self) -> Path | None:
        """Directory of the W&B run (``.../wandb/offline-run-*`` offline), or None without W&B."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        keys = [k for k in _ORDER if k in metrics] + sorted(k for k in metrics if k not in _ORDER)
        body = "  ".join(_fmt(k, float(metrics[k])) for k in keys)
        self.console.print(f"[bold]{prefix}[/bold] step {step:>6}  {body}")
        if self.run is not None:
            self.run.log({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, step=step)

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A W&B table under ``key`` (e.g. sample trajectories); nothing on the console."""
        if self.enabled and self.run is not None and rows:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_files(self, name: str, paths: list[Path], kind: str) -> None:
        """Files (e.g. viewer pages) as one W&B artifact ``name`` of type ``kind``; nothing without W&B."""
        if self.enabled and self.run is not None and paths:
            import wandb

            art = wandb.Artifact(name, type=kind)
            for p in paths:
                art.add_file(str(p))
            self.run.log_artifact(art)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
