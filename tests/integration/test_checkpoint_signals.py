"""``checkpoint.deferred_signals``: a SIGTERM / SIGINT inside the block acts only after the block.

Each case runs in a fresh process (signal handlers are process-wide): the process signals itself inside
the block, the block writes a marker when it finished, and what happens after the block is checked.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

CASE = """
import os, signal, sys, time
from pathlib import Path
from klong_megatron.megatron.checkpoint import deferred_signals

marker = Path(sys.argv[1])
caught = []
if {handler}:
    signal.signal(signal.{sig}, lambda s, f: caught.append(s))
try:
    with deferred_signals():
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.3)  # a default SIGTERM would have ended the process here
        marker.write_text("block finished")
except KeyboardInterrupt:
    print("KeyboardInterrupt after the block")
    sys.exit(3)
print("handler saw", caught)
"""


def _run(tmp: Path, sig: str, handler: bool) -> tuple[subprocess.CompletedProcess, str]:
    marker = tmp / "marker"
    code = textwrap.dedent(CASE.format(sig=sig, handler=handler))
    proc = subprocess.run([sys.executable, "-c", code, str(marker)], capture_output=True, text=True, timeout=120)
    return proc, marker.read_text() if marker.exists() else ""


def test_default_sigterm_inside_the_block_terminates_the_process_only_after_the_block(tmp_path: Path) -> None:
    proc, marker = _run(tmp_path, "SIGTERM", handler=False)
    assert marker == "block finished", proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGTERM
    assert "handler saw" not in proc.stdout


def test_ctrl_c_inside_the_block_raises_keyboard_interrupt_after_the_block(tmp_path: Path) -> None:
    proc, marker = _run(tmp_path, "SIGINT", handler=False)
    assert marker == "block finished", proc.stderr[-2000:]
    assert proc.returncode == 3 and "KeyboardInterrupt after the block" in proc.stdout


def test_signal_reaches_the_handler_installed_before_the_block_once(tmp_path: Path) -> None:
    proc, marker = _run(tmp_path, "SIGTERM", handler=True)
    assert marker == "block finished" and proc.returncode == 0, proc.stderr[-2000:]
    assert f"handler saw [{int(signal.SIGTERM)}]" in proc.stdout
