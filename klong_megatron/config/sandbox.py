"""Schemas for the agent sandboxes and their tools (``sandbox=`` group: ``docker`` or ``bwrap``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

BACKENDS = ("docker", "bwrap")


@dataclass
class ToolsConfig:
    """The agent's tool set (klong_megatron/sandbox/tools.py). Units: seconds and bytes."""

    command_timeout_s: float = 600.0
    """Default wall-clock limit of one bash/python call; the model may ask for less, never more."""
    max_observation_bytes: int = 16_384
    """Tool output beyond this is cut to head + tail with a marker."""
    time_budget_s: float = 7200.0
    """The task's wall-clock budget, used by submit and the time reminder."""
    submit_min_fraction: float = 0.0
    """submit is refused (with an explanation) before this fraction of the budget has passed."""
    reminder_every: int = 0
    """Append "X of Y elapsed" to every k-th observation; 0 disables it."""
    blacklist_file: str | None = None
    """Task blacklist.txt (one URL per line); commands that would fetch one are refused and recorded."""

    def __post_init__(self) -> None:
        for name in ("command_timeout_s", "time_budget_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_observation_bytes < 256:
            raise ValueError(f"max_observation_bytes must be >= 256, got {self.max_observation_bytes}")
        if not 0.0 <= self.submit_min_fraction <= 1.0:
            raise ValueError(f"submit_min_fraction must be in [0, 1], got {self.submit_min_fraction}")
        if self.reminder_every < 0:
            raise ValueError(f"reminder_every must be >= 0, got {self.reminder_every}")


@dataclass
class SandboxConfig:
    """One isolated place for an agent's tools. Both backends honour every field unless noted."""

    backend: str = "docker"
    """docker (a container per sandbox) or bwrap (bubblewrap; no daemon)."""
    image: str = "klong-sandbox:bookworm"
    """Docker image (tools/docker_engine.sh builds this one locally). Ignored by bwrap (host /usr)."""
    workdir: str = "/workspace"
    """Writable work directory inside the sandbox; export() copies it for the judge."""
    memory_mb: int = 4096
    """Docker: cgroup memory limit (OOM kill, no swap). bwrap: address-space rlimit."""
    cpus: float = 2.0
    """Docker: CPU quota in cores. bwrap: not enforced (use cpu_time_s)."""
    cpu_time_s: int | None = None
    """CPU-seconds rlimit per command (both backends); None means unlimited."""
    pids: int = 512
    """Docker: pids cgroup limit. bwrap: nproc rlimit under a per-sandbox uid (only when run as root)."""
    max_file_mb: int = 4096
    """Largest file a command may write (fsize rlimit)."""
    tmp_mb: int = 512
    """Size of the /tmp tmpfs (HOME points there)."""
    network: str = "none"
    """Docker network mode (none, host or a network name); bwrap: none or host."""
    read_only_root: bool = True
    """Only workdir and /tmp are writable."""
    gpus: int = 0
    """Docker: GPUs requested from the NVIDIA runtime (-1: all). bwrap: must be 0."""
    max_output_bytes: int = 1_000_000
    """Per stream, ExecResult keeps this much (head + tail); the rest is counted and dropped."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every command."""
    ro_binds: list[str] = field(default_factory=list)
    """host_path:sandbox_path pairs mounted read-only (e.g. the paper the agent reproduces). bwrap as
    root runs under an unprivileged uid: the host path must be world-readable (and its parents searchable)."""
    run_id: str = ""
    """Label of this run's containers/work dirs (reaped at start and exit); empty: host + pid."""
    host_dir: str | None = None
    """Where bwrap work dirs live on the host; None: the system temp dir."""
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    """The agent's tools running in this sandbox."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.workdir.startswith("/") or self.workdir.rstrip("/") in ("", "/tmp", "/usr", "/proc", "/dev"):
            raise ValueError(f"workdir must be an absolute path outside system dirs, got {self.workdir!r}")
        for name in ("memory_mb", "pids", "max_file_mb", "tmp_mb", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cpus <= 0:
            raise ValueError(f"cpus must be > 0, got {self.cpus}")
        if self.cpu_time_s is not None and self.cpu_time_s <= 0:
            raise ValueError(f"cpu_time_s must be > 0 or null, got {self.cpu_time_s}")
        if self.gpus < -1:
            raise ValueError(f"gpus must be >= -1, got {self.gpus}")
        if self.backend == "bwrap":
            if self.network not in ("none", "host"):
                raise ValueError(f"network must be none or host for bwrap, got {self.network!r}")
            if self.gpus != 0:
                raise ValueError(f"gpus must be 0 for bwrap (no device isolation), got {self.gpus}")
        for i, spec in enumerate(self.ro_binds):
            host, sep, inside = spec.partition(":")
            if not sep or not host.startswith("/") or not inside.startswith("/"):
                raise ValueError(f"ro_binds[{i}] must be /host/path:/sandbox/path, got {spec!r}")


def register(cs: ConfigStore) -> None:
    cs.store(group="sandbox", name="sandbox_schema", node=SandboxConfig)
