"""A few file system calls that keep the interpreter lock while they run.

Interface: ``rename(src, dst)``, ``open_file(path, flags, mode=0o600) -> fd``, ``write(fd, data)
-> int``, ``ftruncate(fd, length)``, ``close(fd)``: the ``os`` functions' behaviour (an OSError
with errno and file name on failure), through libc.

Why: CPython's ``os`` functions release the lock around every system call, and a thread that gives
it up while the event loop is busy waits about a millisecond to get it back (measured with strace
in an SMTP process: a storm of futex calls after each rename, open and write of the group-commit
thread, which made a ten-message commit take 8 ms while its two syncs took 1). These calls finish in
microseconds on the page cache, so holding the lock costs the loop less than fighting for it. The
slow calls (fsync, syncfs) still release it.

Failures: OSError as from ``os``; without a usable libc (not Linux) the ``os`` functions are used.
"""

from __future__ import annotations

import ctypes
import os

try:
    _libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the interpreter lock stays held
    _rename, _open, _write, _ftruncate, _close = (_libc.rename, _libc.open, _libc.write, _libc.ftruncate,
                                                   _libc.close)
    _write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    _write.restype = ctypes.c_ssize_t
    _ftruncate.argtypes = [ctypes.c_int, ctypes.c_long]
    _open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    _rename.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    _close.argtypes = [ctypes.c_int]
    AVAILABLE = True
except (OSError, AttributeError):  # pragma: no cover - no libc to load
    AVAILABLE = False


def _error(path: str | None = None, other: str | None = None) -> OSError:
    number = ctypes.get_errno()
    return OSError(number, os.strerror(number), path, None, other)


def rename(src: str, dst: str) -> None:
    if not AVAILABLE:
        os.rename(src, dst)
    elif _rename(os.fsencode(src), os.fsencode(dst)) != 0:
        raise _error(src, dst)


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    if not AVAILABLE:
        return os.open(path, flags, mode)
    fd = _open(os.fsencode(path), flags | os.O_CLOEXEC, mode)
    if fd < 0:
        raise _error(path)
    return fd


def write(fd: int, data: bytes) -> int:
    if not AVAILABLE:
        return os.write(fd, data)
    written = _write(fd, data, len(data))
    if written < 0:
        raise _error()
    return written


def ftruncate(fd: int, length: int) -> None:
    if not AVAILABLE:
        os.ftruncate(fd, length)
    elif _ftruncate(fd, length) != 0:
        raise _error()


def close(fd: int) -> None:
    if not AVAILABLE:
        os.close(fd)
    elif _close(fd) != 0:
        raise _error()
