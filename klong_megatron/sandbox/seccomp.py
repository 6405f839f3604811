"""A tiny seccomp filter for the bubblewrap backend: no ptrace, no cross-process memory access.

Inside a bwrap sandbox every process (its PID 1, bwrap's own init, included) runs under the same uid, so
without this filter a command could ptrace PID 1 (the host has no Yama LSM to stop it). The filter is a
classic-BPF program (``struct sock_filter`` array, the format ``bwrap --seccomp FD`` reads; see
linux/filter.h and linux/seccomp.h) that answers EPERM to ``ptrace``, ``process_vm_readv`` and
``process_vm_writev``, and to every syscall made through a non-native ABI (i386, x32), which could
otherwise reach ptrace under another number. Everything else is allowed. Docker keeps its own default
profile; there PID 1 runs as another uid, so ptrace of it fails on permissions.

Limits: x86_64 and aarch64 only (other machines get no filter, logged); debuggers (gdb, strace) cannot run
inside a bwrap sandbox.
"""

from __future__ import annotations

import logging
import os
import platform
import struct

log = logging.getLogger(__name__)

# machine -> (AUDIT_ARCH_*, [ptrace, process_vm_readv, process_vm_writev] syscall numbers, x32 bit or 0)
_ARCHES = {
    "x86_64": (0xC000003E, [101, 310, 311], 0x40000000),
    "aarch64": (0xC00000B7, [117, 270, 271], 0),
}
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_ALLOW, _ERRNO_EPERM = 0x7FFF0000, 0x00050000 | 1
_OFF_NR, _OFF_ARCH = 0, 4  # struct seccomp_data: int nr; __u32 arch; ...


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def no_ptrace_filter(machine: str | None = None) -> bytes | None:
    """The BPF program for ``machine`` (default: this host's), or None where no syscall table is known."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        return None
    arch, denied, x32 = _ARCHES[machine]
    prog = [_insn(_LD_W_ABS, 0, 0, _OFF_ARCH), None, _insn(_LD_W_ABS, 0, 0, _OFF_NR)]
    if x32:
        prog.append(None)  # nr >= x32 bit -> deny
    prog += [None] * len(denied)
    prog += [_insn(_RET_K, 0, 0, _ALLOW), _insn(_RET_K, 0, 0, _ERRNO_EPERM)]
    deny = len(prog) - 1

    def jump_to_deny(i: int, code: int, k: int) -> bytes:  # jt: to the deny return, jf: fall through
        return _insn(code, deny - i - 1, 0, k)

    prog[1] = _insn(_JEQ_K, 0, deny - 2, arch)  # native ABI: go on; otherwise deny
    i = 3
    if x32:
        prog[i] = jump_to_deny(i, _JGE_K, x32)
        i += 1
    for nr in denied:
        prog[i] = jump_to_deny(i, _JEQ_K, nr)
        i += 1
    return b"".join(p for p in prog if p is not None)


_PROGRAM = no_ptrace_filter()
if _PROGRAM is None:
    log.warning("no seccomp filter for %s: bwrap sandboxes may ptrace their PID 1", platform.machine())


def filter_fd() -> int | None:
    """A pipe's read end holding this host's program (the caller passes it to bwrap and closes it)."""
    if _PROGRAM is None:
        return None
    r, w = os.pipe()
    os.write(w, _PROGRAM)  # a few dozen bytes: fits in the pipe buffer
    os.close(w)
    return r
