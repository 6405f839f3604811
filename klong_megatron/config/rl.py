"""Top-level schema of ``klong-rl`` (``hydra_configs/rl.yaml``): progressive RL in stages.

``model``/``data``/``trainer``/``logger``/``cluster`` mean what they mean for ``klong-sft`` (``trainer``
is the policy optimizer: lr, clipping, parallelism, checkpoints; its ``global_batch_size`` is the
packed sequences per optimizer step, i.e. the PPO mini-batch). ``algo``, ``rollout``, ``sandbox`` and
``judge`` are the RL components; ``stages`` the progressive schedule; ``rl`` the loop itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from klong_megatron.config.cluster import ClusterConfig
from klong_megatron.config.data import DataConfig
from klong_megatron.config.grpo import GRPOConfig
from klong_megatron.config.judge import JudgeConfig
from klong_megatron.config.logger import LoggerConfig
from klong_megatron.config.model import ModelConfig
from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.config.rollout import RolloutConfig
from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.config.trainer import TrainerConfig
from klong_megatron.data.demo_tasks import NUM_FORMS

TASK_SOURCES = ("demo", "dir")
WEIGHT_SYNC = ("disk", "distributed")


@dataclass
class StageConfig:
    """One progressive-RL stage: rollouts get ``timeout_s`` of wall-clock time (the paper: 2h, 4h, 6h)."""

    timeout_s: float = MISSING
    iterations: int = 1
    rollouts_per_task: int = 4
    """n: rollouts per task (the GRPO group)."""
    tasks_per_iteration: int = 4
    max_turns: int | None = None
    """Overrides rollout.max_turns in this stage."""

    def __post_init__(self) -> None:
        if self.timeout_s is not MISSING and self.timeout_s <= 0:
            raise ValueError(f"stages[].timeout_s must be > 0, got {self.timeout_s}")
        for name in ("iterations", "rollouts_per_task", "tasks_per_iteration"):
            if getattr(self, name) < 1:
                raise ValueError(f"stages[].{name} must be >= 1, got {getattr(self, name)}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"stages[].max_turns must be >= 1, got {self.max_turns}")


@dataclass
class TasksConfig:
    """Where RL tasks come from."""

    source: str = "demo"
    """demo (generated integer-transform papers with check rubrics) or dir (PaperBench-style tasks)."""
    dir: str | None = None
    """source=dir: one folder per task with paper.md and rubric.json (optional addendum.md, blacklist.txt)."""
    eval_dir: str | None = None
    """source=dir: held-out tasks; None holds out ``num_eval`` tasks of ``dir``."""
    num_train: int = 64
    """source=demo: training tasks."""
    num_eval: int = 8
    """Held-out tasks scored by every evaluation."""
    demo_functions: int = 1
    """source=demo: functions per generated paper."""
    demo_forms: int = 5
    """source=demo: formula templates drawn from (1 = only ``a * x + b`` ... 5 = all)."""
    demo_skip_rate: float = 0.0
    """source=demo: share of scripted-expert (SFT warm-up) trajectories that submit without writing and
    running reproduce.sh (a step the rubric rewards): a mistake SFT imitates and RL can remove."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in TASK_SOURCES:
            raise ValueError(f"tasks.source must be one of {TASK_SOURCES}, got {self.source!r}")
        if self.source == "dir" and not self.dir:
            raise ValueError("tasks.dir must be set when tasks.source=dir")
        for name in ("num_train", "num_eval", "demo_functions", "demo_forms"):
            if getattr(self, name) < 1:
                raise ValueError(f"tasks.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.demo_skip_rate <= 1.0:
            raise ValueError(f"tasks.demo_skip_rate must be in [0, 1], got {self.demo_skip_rate}")
        if self.demo_forms > NUM_FORMS:
            raise ValueError(f"tasks.demo_forms must be <= {NUM_FORMS} (the formula templates), got {self.demo_forms}")


HEALTH_ACTIONS = ("warn", "rollback", "stop")


@dataclass
class HealthConfig:
    """Collapse / stall detection (``klong_megatron.rl.health``); a null threshold disables its signal."""

    action: str = "warn"
    """warn (log loudly, go on), rollback (best checkpoint, learning rate x lr_factor) or stop (exit, naming why)."""
    stall_iterations: int | None = 3
    """Consecutive iterations without a trainable window (all groups zero-variance) that count as a stall."""
    max_kl: float | None = 0.2
    """An update's approx_kl (old vs new policy, per trained token) above this is a KL spike."""
    max_entropy_ratio: float | None = 3.0
    """An update's entropy above this x the first update's entropy is an entropy spike."""
    reward_drop: float | None = 0.5
    """An iteration's mean reward below (1 - reward_drop) x the stage's best so far is a collapse."""
    min_best_reward: float = 0.05
    """The reward-drop test waits until the stage's best mean reward reaches this."""
    eval_drop: float | None = 0.5
    """A stage's held-out score below (1 - eval_drop) x the best held-out score so far (after SFT included)
    is a collapse (catches one that ends a stage, which the per-stage reward reference cannot see)."""
    lr_factor: float = 0.5
    """rollback: the learning rate is multiplied by this."""
    max_rollbacks: int = 2
    """rollback: after this many rollbacks the next trip stops the run."""

    def __post_init__(self) -> None:
        if self.action not in HEALTH_ACTIONS:
            raise ValueError(f"rl.health.action must be one of {HEALTH_ACTIONS}, got {self.action!r}")
        if self.stall_iterations is not None and self.stall_iterations < 1:
            raise ValueError(f"rl.health.stall_iterations must be >= 1 or null, got {self.stall_iterations}")
        for name in ("max_kl", "max_entropy_ratio"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"rl.health.{name} must be > 0 or null, got {getattr(self, name)}")
        for name in ("reward_drop", "eval_drop"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= 1:
                raise ValueError(f"rl.health.{name} must be in (0, 1] or null, got {getattr(self, name)}")
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"rl.health.lr_factor must be in (0, 1], got {self.lr_factor}")
        if self.max_rollbacks < 0:
            raise ValueError(f"rl.health.max_rollbacks must be >= 0, got {self.max_rollbacks}")


STAGE_SWITCH = ("finish", "cancel")


@dataclass
class RefillConfig:
    """Continuous refill (``rollout/service.py``, ``rl/batches.py``): ``rollout.concurrency`` rollouts always
    run; an update takes the first complete groups of the service's group log."""

    enabled: bool = False
    """On: the rollout service refills slots at once and updates take complete groups (groups stay whole);
    off: one batch of rollouts per iteration (the next one overlapping training with ``rl.partial_rollouts``)."""
    stage_switch: str = "finish"
    """At a stage switch, groups already started finish under their own stage's timeout and later updates
    train on them (finish), or their running rollouts are cancelled and their groups skipped (cancel)."""
    max_ahead: int = 0
    """Groups the service may hold beyond what the trainer took (complete + in progress); 0: enough to keep
    every slot busy plus two iterations' worth."""
    service_url: str | None = None
    """URL of a ``klong-rollout-service`` on the same output_dir (its own process / Slurm step); None: the
    service runs inside trainer rank 0."""
    port: int = 0
    """``klong-rollout-service``: the HTTP port to listen on (0: a free one, printed)."""
    poll_s: float = 1.0
    """How often the trainer reads the group log while it waits for complete groups."""

    def __post_init__(self) -> None:
        if self.stage_switch not in STAGE_SWITCH:
            raise ValueError(f"rl.refill.stage_switch must be one of {STAGE_SWITCH}, got {self.stage_switch!r}")
        if self.max_ahead < 0 or self.port < 0 or self.poll_s <= 0:
            raise ValueError(f"rl.refill.max_ahead and port must be >= 0 and poll_s > 0, got {self.max_ahead}, "
                             f"{self.port}, {self.poll_s}")  # fmt: skip


@dataclass
class RLLoopConfig:
    """The iteration loop: epochs over each batch, off-policy bounds, evaluation, weight sync."""

    epochs: int = 1
    """Passes over an iteration's windows (each pass: ceil(rows / trainer.global_batch_size) optimizer steps)."""
    max_staleness: int = 1
    """Windows generated with weights more than this many policy versions old are dropped."""
    partial_rollouts: bool = True
    """Start the next iteration's rollouts while the current batch is judged and trained."""
    oversample: float = 1.0
    """Sample ceil(tasks_per_iteration * oversample) tasks; zero-variance groups are filtered first."""
    eval_every: int = 0
    """Evaluate on the held-out tasks every this many iterations (and always at the end of a stage); 0: stage ends."""
    eval_samples: int = 1
    """Rollouts per held-out task in an evaluation."""
    eval_temperature: float | None = None
    """Sampling temperature of evaluations; None means rollout.sampling.temperature."""
    eval_initial: bool = True
    """Score the policy before any training (label ``initial``); the demo skips it (its random model scores 0)."""
    max_invalid_frac: float = 0.1
    """A rollout whose judge could not grade more than this share of its rubric (invalid leaves) is left
    out of the update and of evaluation means (counted in ``judge/excluded``), never scored as 0."""
    weight_sync: str = "disk"
    """disk: export HF weights and call /update_weights_from_disk (servers must see output_dir);
    distributed: broadcast from trainer rank 0 to the servers (NCCL on GPUs, gloo on CPU)."""
    weight_sync_address: str | None = None
    """distributed: an address of trainer rank 0 the servers can reach; None: this host's name."""
    weight_sync_port: int = 0
    """distributed: the group's port on trainer rank 0 (not MASTER_PORT); 0: a free port."""
    sft_warmup: TrainerConfig | None = None
    """Run trajectory-splitting SFT on ``data`` first (the paper's cold start); None starts RL directly."""
    sft_expert_trajectories: int = 0
    """tasks.source=demo: write this many scripted-expert trajectories as the warm-up data (0: use data)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Collapse and stall detection and what to do about it."""
    refill: RefillConfig = field(default_factory=RefillConfig)
    """Continuous refill and the rollout service (in-process or its own process)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_staleness", "eval_every", "sft_expert_trajectories"):
            if getattr(self, name) < 0:
                raise ValueError(f"rl.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_invalid_frac <= 1.0:
            raise ValueError(f"rl.max_invalid_frac must be in [0, 1], got {self.max_invalid_frac}")
        if self.oversample < 1.0:
            raise ValueError(f"rl.oversample must be >= 1, got {self.oversample}")
        if self.weight_sync not in WEIGHT_SYNC:
            raise ValueError(f"rl.weight_sync must be one of {WEIGHT_SYNC}, got {self.weight_sync!r}")


@dataclass
class RLConfig:
    """Policy (model + trainer) + RL components + stages. ``dry_run`` validates and exits."""

    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = MISSING
    algo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    """tasks.source=dir: the reproduction step before the judge (reproduce.sh in a fresh sandbox)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    rl: RLLoopConfig = field(default_factory=RLLoopConfig)
    stages: list[StageConfig] = field(default_factory=list)
    name: str = "rl"
    output_dir: str | None = None
    """Checkpoints, rollouts, grades and logs; None means Hydra's run directory."""
    dry_run: bool = False
    init_from_hf: str | None = None
    """Local Hugging Face checkpoint to start the policy from."""
    init_from_checkpoint: str | None = None
    """A klong-sft checkpoint directory (dist_checkpointing) to start the policy from."""

    def __post_init__(self) -> None:
        if self.model is MISSING or self.trainer is MISSING:
            return
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        timeouts = [s.timeout_s for s in self.stages]
        if any(b < a for a, b in zip(timeouts, timeouts[1:], strict=False)):
            raise ValueError(f"stages[].timeout_s must not decrease (progressive RL), got {timeouts}")
        reserve, new = self.data.policy.gen_reserve, self.rollout.sampling.max_new_tokens
        if reserve < new:
            raise ValueError(f"data.policy.gen_reserve ({reserve}) must hold a whole assistant turn: at least "
                             f"rollout.sampling.max_new_tokens ({new}) + the turn's header and end tokens")  # fmt: skip
        refill = self.rl.refill
        if refill.service_url and not refill.enabled:
            raise ValueError("rl.refill.service_url needs rl.refill.enabled=true")
        if refill.service_url and (self.rollout.engine != "sglang" or self.rollout.weight_pause_mode == "abort"):
            raise ValueError("rl.refill.service_url: the service's rollouts must survive the trainer's weight "
                             "pushes on shared servers: use rollout.engine=sglang with rollout.servers and "
                             "rollout.weight_pause_mode=retract or in_place (abort would end their turns)")  # fmt: skip
        seq = self.data.policy.max_len
        if seq > self.model.seq_length:
            raise ValueError(f"data.policy.max_len ({seq}) exceeds model.seq_length ({self.model.seq_length})")
        self._check_sharded_policy()

    def _check_sharded_policy(self) -> None:
        """A policy sharded with TP / PP / EP pushes its weights from every rank (``megatron/hf_sharded.py``);
        what that stream and the servers cannot take is refused here by name."""
        p, r = self.trainer.parallel, self.rollout
        if max(p.tp, p.pp, p.ep) > 1 and self.model.moe_grouped_gemm:
            raise ValueError(f"model.moe_grouped_gemm=true with trainer.parallel tp={p.tp} pp={p.pp} "
                             f"ep={p.ep}: the sharded weight push gathers SequentialMLP experts; "
                             "set model.moe_grouped_gemm=false")  # fmt: skip
        if self.rl.weight_sync == "distributed" and (r.server_pp > 1 or r.server_dp > 1):
            raise ValueError(f"rl.weight_sync=distributed needs rollout servers with rollout.server_pp = "
                             f"rollout.server_dp = 1, got {r.server_pp} / {r.server_dp} (SGLang joins the weight group "
                             "as rank_offset + tp_rank and asserts dp_size == 1): run one server per replica "
                             "or use rl.weight_sync=disk")  # fmt: skip


def register(cs: ConfigStore) -> None:
    cs.store(name="rl_schema", node=RLConfig)
