"""Runs ``klong-sft`` or the tiny SFT driver with slowed checkpoint writes (test helper).

    python tests/integration/slow_save_driver.py SECONDS cli [klong-sft overrides ...]
    python tests/integration/slow_save_driver.py SECONDS tiny OUT_DIR [key=value ...]

Every dist_checkpointing writer process (forked by ``FileSystemWriterAsync`` during a save) writes its
shard files, prints ``checkpoint writer <pid> wrote its files`` and then sleeps SECONDS before reporting
back. So a test can signal the process group while a save is half written (shards on disk, no metadata),
which on a real cluster is a narrow window. Nothing else of the run is changed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

_write = FileSystemWriterAsync.write_preloaded_data
_DELAY_S = [0.0]  # read from argv in main(): the runs below replace sys.argv before any writer starts


def _slow_write(*args, **kwargs):
    result = _write(*args, **kwargs)
    print(f"checkpoint writer {os.getpid()} wrote its files", flush=True)
    time.sleep(_DELAY_S[0])
    return result


def main() -> None:
    FileSystemWriterAsync.write_preloaded_data = staticmethod(_slow_write)
    _DELAY_S[0] = float(sys.argv[1])
    mode, rest = sys.argv[2], sys.argv[3:]
    if mode == "cli":
        from klong_megatron.cli.sft import main as cli_main

        sys.argv = ["klong-sft", *rest]
        cli_main()
    elif mode == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import sft_driver

        sys.argv = ["sft_driver.py", *rest]
        sft_driver.main()
    else:
        raise SystemExit(f"unknown mode {mode!r}: expected cli or tiny")


if __name__ == "__main__":
    main()
