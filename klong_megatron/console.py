"""A quiet console: known-harmless third-party warnings hidden, one line saying which implementation runs.

A CPU run of megatron-core 0.16.1 prints ~20 ``UserWarning`` blocks (each fallback per imported module,
again in every process dist_checkpointing spawns). They say one thing: Transformer Engine and Apex are
absent, so torch implementations run. :func:`quiet_third_party_warnings` (called when any ``klong-*``
CLI is imported) hides exactly the messages in :data:`KNOWN_HARMLESS`, in this process and, through
``PYTHONWARNINGS``, in the processes it starts; :func:`implementation_line` says the same in one line.
Every other warning, the project's own included, still shows, as one line: ``warning: <message> [<Category>
at <file>:<line>]``. ``KLONG_VERBOSE=1`` shows everything as Python prints it.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

KNOWN_HARMLESS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        "Transformer Engine and Apex are not installed",
        UserWarning,
        "megatron-core's optimizer, grad clipping and FSDP fall back to torch implementations",
    ),
    ("Apex is not installed", UserWarning, "megatron-core falls back to torch norms"),
    (
        "full scope is deprecated",
        UserWarning,
        "megatron-core 0.16.1's own TransformerConfig default for cuda_graph_scope; no CUDA graphs are used",
    ),
)
"""(message prefix, category, why it is harmless): hidden unless KLONG_VERBOSE=1."""


def verbose() -> bool:
    """True when ``KLONG_VERBOSE`` is set to anything but "" or "0"."""
    return os.environ.get("KLONG_VERBOSE", "") not in ("", "0")


def _one_line(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 (warnings' signature)
    return f"warning: {message} [{category.__name__} at {Path(filename).name}:{lineno}]\n"


def quiet_third_party_warnings() -> None:
    """Hide :data:`KNOWN_HARMLESS` here and in child processes; print other warnings in one line.

    Idempotent. No-op with ``KLONG_VERBOSE=1``.
    """
    if verbose():
        return
    warnings.formatwarning = _one_line
    env = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    for prefix, category, _why in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)
        entry = f"ignore:{prefix}:{category.__name__}"  # PYTHONWARNINGS matches a message prefix
        if entry not in env:
            env.append(entry)
    os.environ["PYTHONWARNINGS"] = ",".join(env)


def implementation_line(transformer_impl: str, have_te: bool, have_apex: bool, cuda: bool) -> str:
    """One line: which layer, norm and optimizer implementations run, and why.

    ``transformer_impl`` is the resolved ``"te"`` or ``"local"`` (``megatron.model.resolve_impl``).
    """
    if transformer_impl == "te":
        layers = "Transformer Engine layers (fused attention, packed THD sequences)"
    else:
        why = "transformer_engine not importable" if not have_te else "model.transformer_impl=local"
        layers = f"Megatron local (torch) layers, dense causal mask ({why})"
    opt = "Apex/TE fused optimizer" if (have_apex or have_te) else "torch optimizer (no Apex or TE)"
    device = "CUDA" if cuda else "CPU (gloo, compatibility layer)"
    return f"implementation: {layers}; {opt}; {device}"
