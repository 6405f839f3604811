"""``klong-devserver``: serve a local model over SGLang's native HTTP API (development server).

    klong-devserver --model tiny --port 30000            # random tiny Llama over the byte tokenizer
    klong-devserver --model path/to/hf_model --tokenizer path/to/hf_model --port 0

Prints ``klong-devserver listening on http://HOST:PORT`` once it accepts requests (``--port 0``
picks a free port). Flags mirror ``DevServerConfig`` (rollout.devserver in the Hydra configs).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

import torch

from klong_megatron.cli._errors import one_line_errors
from klong_megatron.config.rollout import DevServerConfig
from klong_megatron.rollout.devmodel import build_dev_model
from klong_megatron.rollout.devserver import DevServer


def _parse(argv: list[str] | None) -> DevServerConfig:
    p = argparse.ArgumentParser(prog="klong-devserver", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(DevServerConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.INFO)
    try:
        return DevServerConfig(**args)
    except ValueError as e:
        p.error(str(e))
        raise


def _exit_with_parent() -> None:
    """Started by an RL run (``KLONG_PARENT_PID``, rl/servers.py): SIGTERM to itself once that process is gone,
    however it ended, so a killed or crashed run leaves no server behind. A watcher thread polls the parent id
    (``PR_SET_PDEATHSIG`` would fire when the *thread* that started the server ends, e.g. a thread pool's)."""
    parent = os.environ.get("KLONG_PARENT_PID")
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@one_line_errors("klong-devserver")
def main(argv: list[str] | None = None) -> None:
    _exit_with_parent()
    cfg = _parse(argv)
    # Requests are served from handler threads; torch's intra-op pool then competes with itself
    # (measured: a tiny model generates 2x slower in a non-main thread with 2 threads than with 1).
    torch.set_num_threads(cfg.threads or (1 if cfg.model == "tiny" else torch.get_num_threads()))
    model, tokenizer = build_dev_model(cfg)
    server = DevServer(model, tokenizer=tokenizer, host=cfg.host, port=cfg.port, model_path=cfg.model)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"klong-devserver listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
