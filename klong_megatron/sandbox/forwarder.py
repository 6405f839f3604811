"""In-sandbox half of the egress allow-list: relays ``127.0.0.1:PORT`` to the host proxy's unix socket.

Runs inside the sandbox under the sandbox's own python3 (standard library only, Python >= 3.8; threads,
no asyncio, so that it starts fast), copied next to the socket in the read-only network directory. It
relays bytes and decides nothing: the host proxy (egress.py) checks every request.

    python3 -I -S forwarder.py PORT SOCKET --init       Docker: the container's PID 1; reaps orphans,
                                                        exits 0 on SIGTERM, prints "ready" once listening
    python3 -I -S forwarder.py PORT SOCKET -- CMD ...   bubblewrap: listens, runs CMD (inherited stdio)
                                                        and exits with CMD's status (128 + signal if killed)
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading


def _relay(client: socket.socket, socket_path: str) -> None:
    """Copy bytes both ways; client EOF half-closes the upstream side, upstream EOF ends the connection."""
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(socket_path)
        peer = {client: up, up: client}
        reading = [client, up]
        while reading:
            ready, _, _ = select.select(reading, [], [])
            for s in ready:
                data = s.recv(1 << 16)
                if data:
                    peer[s].sendall(data)
                elif s is up:
                    return
                else:
                    reading.remove(client)
                    up.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        up.close()
        client.close()


def _serve(listener: socket.socket, socket_path: str) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_relay, args=(conn, socket_path), daemon=True).start()


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _run(cmd: list[str], listener: socket.socket, socket_path: str) -> int:
    pid = os.fork()
    if pid == 0:
        listener.close()
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; the command must not
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            os.write(2, f"forwarder: cannot run {cmd[0]}: {e}\n".encode())
        os._exit(127)
    threading.Thread(target=_serve, args=(listener, socket_path), daemon=True).start()
    _, status = os.waitpid(pid, 0)
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or argv[2] not in ("--init", "--") or argv[2:] == ["--"]:
        print("usage: forwarder.py PORT SOCKET (--init | -- CMD ...)", file=sys.stderr)
        return 2
    port, socket_path, cmd = int(argv[0]), argv[1], argv[3:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    if cmd:
        return _run(cmd, listener, socket_path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGCHLD, _reap)
    print("ready", flush=True)
    _serve(listener, socket_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
