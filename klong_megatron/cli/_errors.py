"""One-line errors and atomic outputs for every ``klong-*`` command.

A user who gives a missing file, a wrong flag or malformed input gets ONE line on stderr naming what
is wrong and where, exit status 2, and no partial output file. Tracebacks are for bugs: set
``KLONG_TRACEBACK=1`` to see one for a user error too.

    @one_line_errors("klong-data")
    def main(argv=None) -> None: ...

Outputs are written through :func:`klong_megatron.atomic.atomic_output` (temp name, renamed on success).

Hydra apps also call :func:`check_hydra_overrides` before ``hydra.main`` runs, so a bad override or a
field that fails its dataclass check is one line and exit 2 instead of Hydra's exit 1.

Limits: "user error" means the exception types in :data:`USER_ERRORS` (the project raises
``ValueError``/``TypeError`` for bad input, see STYLE.md); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from klong_megatron.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError)
"""Exception types that are the user's input (files, fields, flags), reported in one line."""

INPUT_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
"""The narrower set caught around a whole training run, where a bare ValueError may be a bug."""

EXIT_USAGE = 2


def one_line(e: BaseException) -> str:
    """``e`` as one line: ``FileNotFoundError: [Errno 2] No such file ...: 'x'`` -> ``no such file: 'x'``."""
    if isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"no such file or directory: {str(e.filename)!r}"
    if isinstance(e, IsADirectoryError) and e.filename is not None:
        return f"is a directory, not a file: {str(e.filename)!r}"
    if isinstance(e, PermissionError) and e.filename is not None:
        return f"permission denied: {str(e.filename)!r}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if e.__cause__ is not None and str(e.__cause__) not in text:  # Hydra: "Error merging override x=y"
        text = f"{text}: {one_line(e.__cause__)}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    msg = " | ".join(lines) if len(lines) <= 3 else " | ".join(lines[:3]) + " ..."
    return msg or type(e).__name__


def report(prog: str, e: BaseException) -> int:
    """Print ``prog: error: <one line>`` on stderr; return the usage exit status (2)."""
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _show_traceback() -> bool:
    return os.environ.get("KLONG_TRACEBACK", "") not in ("", "0")


def one_line_errors(prog: str, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Callable[[F], F]:
    """Decorate a CLI ``main``: ``errors`` (default :data:`USER_ERRORS`) become one line and ``SystemExit(2)``.

    Under ``@hydra.main`` decorate the task function with ``errors=INPUT_ERRORS``: Hydra lets
    ``SystemExit`` through, so the one line replaces its traceback and exit status 1.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except errors as e:
                if _show_traceback():
                    raise
                raise SystemExit(report(prog, e)) from None

        return inner  # type: ignore[return-value]

    return wrap


def check_hydra_overrides(prog: str, config_dir: str | Path, config_name: str) -> None:
    """Compose ``config_name`` with this process's overrides and convert it to its dataclass before Hydra runs.

    A bad override (unknown key, wrong type, a field's ``__post_init__`` ``ValueError``) exits 2 with one
    line naming it. Skipped for multirun sweeps and Hydra's own flags (``--help``, ``--cfg`` ...), whose
    overrides are not one config; Hydra reports those itself.
    """
    argv = sys.argv[1:]
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=argv)
        OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException, *USER_ERRORS) as e:
        if _show_traceback():
            raise
        raise SystemExit(report(prog, e)) from None
