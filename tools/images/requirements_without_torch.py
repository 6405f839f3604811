"""Print this package's runtime dependencies minus torch and megatron-core, one per line (for GPU images).

The images keep the base image's torch (NVIDIA's build, with its CUDA/NCCL) and install megatron-core with
``--no-deps``; every other requirement comes from ``pyproject.toml`` so the list has one source.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch", "megatron-core"}


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        if re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower() not in SKIP:
            sys.stdout.write(dep + "\n")


if __name__ == "__main__":
    main()
