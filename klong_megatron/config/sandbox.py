"""Schemas for the agent sandboxes and their tools (``sandbox=`` group: ``docker`` or ``bwrap``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from hydra.core.config_store import ConfigStore

BACKENDS = ("docker", "bwrap")
_HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")


def parse_allow_entry(spec: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``*.domain[:port]`` or ``[v6]:port`` -> (lower-case host, port or None).

    A missing port means the web ports (80 and 443). Raises ValueError saying what is wrong.
    """
    host, port = spec.strip(), None
    if "://" in host or "/" in host:
        raise ValueError(f"expected host or host:port (no scheme, no path), got {spec!r}")
    if host.count(":") == 1 or (host.startswith("[") and "]:" in host):
        host, _, port_text = host.rpartition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"port must be an integer in 1..65535, got {spec!r}")
        port = int(port_text)
    if not _HOST_RE.match(host):
        raise ValueError(f"not a host name or IP address: {spec!r}")
    return host.strip("[]").lower(), port


def pip_index_host(url: str) -> str:
    """``host:port`` of a pip index URL (the port implied by the scheme when absent)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{parts.hostname}]:{port}" if ":" in parts.hostname else f"{parts.hostname}:{port}"


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


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class DockerHostConfig:
    """One Docker engine that takes sandboxes (``sandbox.docker_hosts``); sandbox/docker_hosts.py places them."""

    url: str = "unix:///var/run/docker.sock"
    """DOCKER_HOST form: ``unix:///path``, ``tcp://host:port`` (TLS unless loopback) or ``ssh://[user@]host``."""
    capacity: int = 64
    """At most this many sandboxes of this process on the engine at once."""
    tls_dir: str | None = None
    """tcp://: directory with ``ca.pem``, ``cert.pem``, ``key.pem`` (Docker's DOCKER_CERT_PATH layout); the
    engine's certificate is verified against ``ca.pem`` and this client authenticates with cert/key."""

    def __post_init__(self) -> None:
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme not in ("unix", "tcp", "ssh") or not rest:
            raise ValueError(f"url must be unix:///path, tcp://host:port or ssh://[user@]host, got {self.url!r}")
        if scheme == "unix" and not rest.startswith("/"):
            raise ValueError(f"url: a unix socket path must be absolute, got {self.url!r}")
        if scheme == "tcp":
            parts = urlsplit(self.url)
            if not parts.hostname or parts.port is None:
                raise ValueError(f"url: tcp:// needs host:port, got {self.url!r}")
            if self.tls_dir is None and parts.hostname not in _LOOPBACK:
                raise ValueError(
                    f"tls_dir is required for a non-loopback tcp:// engine ({self.url}): plain TCP to dockerd "
                    "gives root on that host to anyone on the network"
                )
        elif self.tls_dir is not None:
            raise ValueError(f"tls_dir applies to tcp:// engines only, got url {self.url!r}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")

    @property
    def local(self) -> bool:
        """The engine runs on this machine (unix socket or loopback tcp): host paths can be bind-mounted."""
        return self.url.startswith("unix://") or urlsplit(self.url).hostname in _LOOPBACK


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
    """none (loopback only); allowlist (loopback only, plus HTTP(S) through the run's egress proxy to the
    ``allow`` hosts; sandbox/egress.py); host; Docker also takes a network name. bwrap: none, allowlist or host."""
    allow: list[str] = field(default_factory=list)
    """network=allowlist: the reachable ``host[:port]`` entries (package mirrors). No port: 80 and 443;
    ``*.example.org`` matches subdomains. Everything else is refused with 403 and recorded."""
    pip_index_url: str | None = None
    """network=allowlist: a PyPI mirror; exported as PIP_INDEX_URL and its host:port is allowed."""
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
    uid: int = 1000
    """Commands run as this uid/gid (never 0 unless ``run_as_root``); the work dir is owned by it. bwrap: the
    ids seen inside its user namespace (run as root, each sandbox is a distinct unprivileged host uid)."""
    gid: int = 1000
    run_as_root: bool = False
    """Opt-in for tasks that must be root (e.g. ``apt-get install``; also set read_only_root=false). RISK:
    Docker adds back ROOT_CAPS (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETUID, SETGID, KILL), so the command can
    read/write any file of the container and a kernel or runtime bug would put host root one step away;
    no-new-privileges and the default seccomp profile stay. bwrap: uid 0 only inside its user namespace."""
    cap_add: list[str] = field(default_factory=list)
    """Docker: capabilities added back to the empty set (e.g. NET_RAW for ping). bwrap: must be empty."""
    runtime: str | None = None
    """Docker: OCI runtime registered with the engine, e.g. ``runsc`` (gVisor; tools/docker_engine.sh
    registers it when installed). None: the engine's default (runc). bwrap: must be None."""
    workdir_mb: int | None = 10240
    """Work dir size: a sparse ext4 image loop-mounted (nosuid, nodev) on the host, so a full disk fails with
    "No space left on device" and the host disk grows by at most this much. Needs root on the host (and a
    local Docker engine). None: no limit (Docker: a named volume; bwrap: a plain host directory)."""
    nofile: int = 8192
    """Open file descriptors per process (nofile rlimit)."""
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    """The agent's tools running in this sandbox."""
    docker_hosts: list[DockerHostConfig] = field(default_factory=list)
    """Docker: the engines sandboxes are placed on (least loaded relative to ``capacity``; see
    sandbox/docker_hosts.py). Empty: the one engine of DOCKER_HOST / the local socket, without a cap."""
    host_cooldown_s: float = 300.0
    """Docker: an engine that stops answering takes no new sandboxes for this long, then is tried again."""

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
            if self.network not in ("none", "allowlist", "host"):
                raise ValueError(f"network must be none, allowlist or host for bwrap, got {self.network!r}")
            if self.gpus != 0:
                raise ValueError(f"gpus must be 0 for bwrap (no device isolation), got {self.gpus}")
            if self.runtime or self.cap_add:
                raise ValueError("runtime and cap_add are Docker options; bwrap takes neither")
        self._check_privileges()
        self._check_allowlist()
        self._check_hosts()
        for i, spec in enumerate(self.ro_binds):
            host, sep, inside = spec.partition(":")
            if not sep or not host.startswith("/") or not inside.startswith("/"):
                raise ValueError(f"ro_binds[{i}] must be /host/path:/sandbox/path, got {spec!r}")

    def _check_privileges(self) -> None:
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if not 0 < value < 2**31:
                raise ValueError(f"{name} must be in 1..2^31-1 (for uid 0 set run_as_root=true), got {value}")
        if self.workdir_mb is not None and self.workdir_mb < 8:
            raise ValueError(f"workdir_mb must be >= 8 or null, got {self.workdir_mb}")
        if self.runtime == "runsc" and self.pids < 512:
            raise ValueError(
                f"pids must be >= 512 with runtime=runsc (gVisor's own host threads count against it; "
                f"below that its sentry dies on the first commands), got {self.pids}"
            )
        if self.nofile < 64:
            raise ValueError(f"nofile must be >= 64, got {self.nofile}")
        for i, cap in enumerate(self.cap_add):
            name = cap.upper().removeprefix("CAP_")
            if not re.fullmatch(r"[A-Z_]+", name) or name == "ALL":
                raise ValueError(f"cap_add[{i}] must name one capability (e.g. NET_RAW), got {cap!r}")

    def _check_allowlist(self) -> None:
        if self.network != "allowlist":
            for name in ("allow", "pip_index_url"):
                if getattr(self, name):
                    raise ValueError(f"{name} needs network=allowlist, got network={self.network!r}")
            return
        if not self.allow and not self.pip_index_url:
            raise ValueError("allow must list at least one host[:port] (or set pip_index_url) when network=allowlist")
        for i, spec in enumerate(self.allow):
            try:
                parse_allow_entry(spec)
            except ValueError as e:
                raise ValueError(f"allow[{i}]: {e}") from None
        if self.pip_index_url:
            try:
                pip_index_host(self.pip_index_url)
            except ValueError as e:
                raise ValueError(f"pip_index_url: {e}") from None

    def _check_hosts(self) -> None:
        if self.host_cooldown_s < 0:
            raise ValueError(f"host_cooldown_s must be >= 0, got {self.host_cooldown_s}")
        if self.docker_hosts and self.backend != "docker":
            raise ValueError(f"docker_hosts needs backend=docker, got backend={self.backend!r}")
        urls = [h.url for h in self.docker_hosts]
        for i, h in enumerate(self.docker_hosts):
            if urls.index(h.url) != i:
                raise ValueError(f"docker_hosts[{i}]: {h.url} is listed twice")
            if h.local:
                continue
            for name in ("workdir_mb", "ro_binds"):  # host paths of this machine, not of the engine's
                if getattr(self, name):
                    raise ValueError(f"docker_hosts[{i}] ({h.url}) is remote: set {name} to null/[] (host paths)")
            if self.network == "allowlist":
                raise ValueError(f"docker_hosts[{i}] ({h.url}) is remote: network=allowlist needs a local engine")

    @property
    def allow_rules(self) -> list[str]:
        """``allow`` plus the pip mirror's host:port: what the egress proxy lets through."""
        return [*self.allow, *([pip_index_host(self.pip_index_url)] if self.pip_index_url else [])]


def register(cs: ConfigStore) -> None:
    cs.store(group="sandbox", name="sandbox_schema", node=SandboxConfig)
