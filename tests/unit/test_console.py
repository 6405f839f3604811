"""Quiet console: megatron-core's known-harmless fallback warnings hidden (here and in child processes),
the project's own warnings still shown in one line, everything back with KLONG_VERBOSE=1."""

from __future__ import annotations

import os
import subprocess
import sys

from klong_megatron.console import implementation_line

PROBE = """
import subprocess, sys, warnings
import klong_megatron.cli  # quiets known-harmless warnings
import megatron.core.optimizer  # warns: Transformer Engine and Apex are not installed
warnings.warn("the project's own warning")
subprocess.run([sys.executable, "-c", "import megatron.core.optimizer"], check=True)  # a spawned child
"""


def _stderr(**env: str) -> str:
    run_env = {k: v for k, v in os.environ.items() if k not in ("KLONG_VERBOSE", "PYTHONWARNINGS")} | env
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=run_env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_known_harmless_warnings_are_hidden_and_the_projects_own_shown_in_one_line() -> None:
    err = _stderr()
    assert "Transformer Engine and Apex are not installed" not in err  # neither here nor in the child
    own = [line for line in err.splitlines() if "the project's own warning" in line]
    assert own == ["warning: the project's own warning [UserWarning at <string>:5]"], err
    assert len(err.strip().splitlines()) == 1, err


def test_klong_verbose_shows_every_warning_again() -> None:
    err = _stderr(KLONG_VERBOSE="1")
    assert err.count("Transformer Engine and Apex are not installed") >= 2  # this process and the child


def test_implementation_line_names_what_runs_and_why() -> None:
    cpu = implementation_line("local", have_te=False, have_apex=False, cuda=False)
    assert "local (torch) layers" in cpu and "transformer_engine not importable" in cpu and "CPU" in cpu
    gpu = implementation_line("te", have_te=True, have_apex=False, cuda=True)
    assert "Transformer Engine layers" in gpu and "CUDA" in gpu
