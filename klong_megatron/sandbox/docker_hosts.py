"""Placing Docker sandboxes on several engines: least loaded with a per-engine cap, dead engines cooled down.

Dataflow: ``DockerSandbox.start()`` asks ``hosts_for(cfg).place()`` for an engine -> the engine with the lowest
``load / capacity`` among those not cooling down (ties: listed order) gets the sandbox and its load goes up ->
``close()`` gives the slot back (``release``). When a call to an engine fails with a connection error
(``is_engine_down``) the sandbox calls ``mark_down``: the engine takes nothing new for ``host_cooldown_s``; its
sandboxes fail, their rollouts are retried from scratch (rollout/manager.py) and the pool's replacements land
on the other engines. After the cool-down the engine is tried again by the next placement (a failed start
cools it down again).

Engines are named by DOCKER_HOST URLs (``DockerHostConfig``): ``unix://`` sockets, ``tcp://`` with mutual TLS
(``tls_dir`` holding ``ca.pem``, ``cert.pem``, ``key.pem``; plain TCP only on loopback) and ``ssh://`` (the
``ssh`` binary, as ``docker -H ssh://`` does: keys and known_hosts come from the user's ssh configuration;
the remote user must be allowed to use dockerd's socket). An empty ``docker_hosts`` means one engine from
DOCKER_HOST (``docker.from_env``) without a cap. One ``DockerHosts`` per distinct host list per process
(``hosts_for``), shared by every sandbox of that config, thread-safe.

Limits: the load counted is this process's sandboxes only (engines shared between processes each count their
own); a remote engine cannot bind-mount this machine's paths (config/sandbox.py refuses ``workdir_mb``,
``ro_binds`` and ``network=allowlist`` with one).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import docker
import requests
from docker.errors import DockerException
from docker.tls import TLSConfig

from klong_megatron.config.sandbox import DockerHostConfig, SandboxConfig
from klong_megatron.sandbox._common import SandboxError

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 120  # engine API calls (a container start under load can take tens of seconds)


class EngineDown(SandboxError):
    """The Docker engine of a sandbox stopped answering; the engine is cooling down, retry elsewhere."""


def is_engine_down(e: BaseException) -> bool:
    """True for errors that mean the engine itself is unreachable (not a failed API call)."""
    return isinstance(e, EngineDown | requests.exceptions.ConnectionError | ConnectionError | FileNotFoundError)


def make_client(host: DockerHostConfig | None, version: str | None = None) -> docker.DockerClient:
    """A Docker client for one engine (None: DOCKER_HOST / the local socket).

    ``version``: the engine API version; None asks the engine (one request), so an engine that does not
    answer raises ``EngineDown`` here. A bad ``tls_dir`` raises SandboxError.
    """
    try:
        if host is None:
            return docker.from_env(timeout=CLIENT_TIMEOUT_S, version=version)
        if host.url.startswith("ssh://"):  # shell out to ssh (no paramiko), like the docker CLI
            return docker.DockerClient(
                base_url=host.url, timeout=CLIENT_TIMEOUT_S, use_ssh_client=True, version=version
            )
        tls: TLSConfig | bool = False
        if host.tls_dir is not None:
            d = host.tls_dir
            for name in ("ca.pem", "cert.pem", "key.pem"):
                if not os.path.isfile(os.path.join(d, name)):
                    raise SandboxError(f"docker_hosts {host.url}: tls_dir {d} has no {name}")
            tls = TLSConfig(
                client_cert=(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")),
                ca_cert=os.path.join(d, "ca.pem"),
                verify=True,
            )
        if not tls:
            return docker.DockerClient(base_url=host.url, timeout=CLIENT_TIMEOUT_S, version=version)
        client = docker.DockerClient(base_url=host.url.replace("tcp://", "https://", 1), version="1.41", tls=tls)
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the session's CA (the engine's ca.pem), and
        # the system bundle cannot verify the engine: read no settings from the environment for this client.
        client.api.trust_env = False
        client.api.timeout = CLIENT_TIMEOUT_S
        if version is None:  # what APIClient(version=None) does in its constructor, now with the right CA
            client.api._version = client.api._retrieve_server_version()
        return client
    except DockerException as e:
        where = host.url if host else "DOCKER_HOST"
        raise EngineDown(f"cannot reach the Docker engine {where} ({e}); run `tools/docker_engine.sh start`") from e


@dataclass
class Engine:
    """One engine's state: its client, how many of our sandboxes it holds, until when it is cooling down."""

    cfg: DockerHostConfig | None
    load: int = 0
    down_until: float = 0.0
    failures: int = 0
    orphans: list[str] = field(default_factory=list)
    """Containers whose removal failed while the engine was down; removed when it is next used."""
    _client: docker.DockerClient | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.cfg.url if self.cfg else os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")

    @property
    def capacity(self) -> int:
        return self.cfg.capacity if self.cfg else 1 << 30

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = make_client(self.cfg)
        return self._client

    def sweep_orphans(self) -> None:
        """Remove containers (and work volumes) left here while the engine was down (best effort)."""
        while self.orphans:
            name = self.orphans.pop()
            try:
                self.client.api.remove_container(name, force=True, v=True)
                self.client.api.remove_volume(f"{name}-work", force=True)
            except DockerException:
                pass
            except OSError:  # still down: keep it for the next time
                self.orphans.append(name)
                raise


class DockerHosts:
    """The engines of one config; ``place``/``release``/``mark_down`` are thread-safe."""

    def __init__(self, hosts: list[DockerHostConfig], cooldown_s: float) -> None:
        self.engines = [Engine(h) for h in hosts] or [Engine(None)]
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()

    def place(self) -> Engine:
        """The least-loaded engine (load / capacity) not cooling down; its load is counted up.

        Raises SandboxError naming every engine's state when all are full or cooling down.
        """
        now = time.monotonic()
        with self._lock:
            free = [e for e in self.engines if e.down_until <= now and e.load < e.capacity]
            if not free:
                raise SandboxError("no Docker engine can take a sandbox: " + self.describe(now))
            best = min(free, key=lambda e: e.load / e.capacity)
            best.load += 1
            return best

    def release(self, engine: Engine) -> None:
        with self._lock:
            engine.load = max(0, engine.load - 1)

    def mark_down(self, engine: Engine, why: object) -> None:
        """Cool the engine down (idempotent while it is down) and drop its client."""
        with self._lock:
            now = time.monotonic()
            if engine.down_until > now:
                return
            engine.down_until, engine.failures = now + self.cooldown_s, engine.failures + 1
            engine._client = None
        log.warning(
            "Docker engine %s is down (%s); no new sandboxes there for %.0f s", engine.url, why, self.cooldown_s
        )

    def describe(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        return "; ".join(
            f"{e.url} {e.load}/{e.capacity}"
            + (f" cooling down {e.down_until - now:.0f}s" if e.down_until > now else "")
            for e in self.engines
        )


_registry: dict[tuple, DockerHosts] = {}
_registry_lock = threading.Lock()


def hosts_for(cfg: SandboxConfig) -> DockerHosts:
    """The process-wide ``DockerHosts`` of this config's engine list (one per distinct list)."""
    key = (tuple((h.url, h.capacity, h.tls_dir) for h in cfg.docker_hosts), cfg.host_cooldown_s)
    with _registry_lock:
        if key not in _registry:
            _registry[key] = DockerHosts(list(cfg.docker_hosts), cfg.host_cooldown_s)
        return _registry[key]
