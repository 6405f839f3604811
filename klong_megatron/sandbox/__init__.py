"""Sandboxes for the agent's tools: the contract (base.py), Docker and bubblewrap backends, a pool, tools."""

from __future__ import annotations

from typing import Any

from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.sandbox._common import SandboxError
from klong_megatron.sandbox.base import ExecResult, Sandbox

__all__ = ["ExecResult", "Sandbox", "SandboxConfig", "SandboxError", "make_sandbox"]


def make_sandbox(cfg: SandboxConfig | Any) -> Sandbox:
    """Build an unstarted sandbox from a ``SandboxConfig`` or a composed ``sandbox=`` Hydra node.

    The caller starts it (``with make_sandbox(cfg) as sb:``) so that start failures surface there.
    """
    if not isinstance(cfg, SandboxConfig):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SandboxConfig), cfg))
    if cfg.backend == "docker":
        from klong_megatron.sandbox.docker import DockerSandbox

        return DockerSandbox(cfg)
    from klong_megatron.sandbox.bwrap import BwrapSandbox

    return BwrapSandbox(cfg)
