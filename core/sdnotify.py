"""Tell systemd that a role is ready: sd_notify(3)'s ``READY=1``, for units of ``Type=notify``.

Interface: ``ready(status="") -> bool`` sends ``READY=1`` (and ``STATUS=<status>``) to the datagram
socket ``$NOTIFY_SOCKET`` names, then removes that variable from this process's environment, so the
children it starts afterwards do not speak for it (sd_notify's ``unset_environment``).
``notify(*assignments) -> bool`` sends other assignments (``STATUS=...``, ``STOPPING=1``) and keeps
the variable. Both return whether a datagram was sent; without ``$NOTIFY_SOCKET`` (not under systemd,
or a unit of another type) they do nothing.

Failures: a socket that cannot be reached, or an address that is neither a path nor ``@abstract``
(vsock), is logged at warning and otherwise ignored: the role runs on, and systemd, which then never
hears ``READY=1``, fails the start at ``TimeoutStartSec``.

Settings: none; systemd sets ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("shardmail.sdnotify")
ENV = "NOTIFY_SOCKET"


def _address(name: str) -> str | None:
    if name.startswith("@"):
        return "\0" + name[1:]  # the abstract namespace
    return name if name.startswith("/") else None


def notify(*assignments: str, unset: bool = False) -> bool:
    """Send ``assignments`` (``KEY=value`` lines) in one datagram to the service manager."""
    name = os.environ.get(ENV, "")
    if unset:
        os.environ.pop(ENV, None)
    if not name:
        return False
    address = _address(name)
    if address is None:
        log.warning("%s=%s: not a unix socket path; not notifying", ENV, name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", name, exc)
        return False
    return True


def ready(status: str = "") -> bool:
    """``READY=1``: this role does its work now (and its future children are not the service)."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []), unset=True)
