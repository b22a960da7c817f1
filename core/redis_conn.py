"""One way to reach Redis for every role, with timeouts that turn an outage into a quick error.

Interface: ``url(settings) -> str`` (the configured ``redis_url``, else the embedded server's unix
socket under ``var_dir``), ``connect(settings) -> redis.Redis``.

Failures: a Redis that is down, slow or gone raises ``redis.RedisError`` within the socket
timeouts below, which every caller treats as temporary (4xx, exit 75, retry later); nothing
waits forever on Redis.

Settings: ``redis_url``, ``var_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from core.config import Settings

CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0


def text(raw: Any) -> str:
    """A Redis reply as text: redis-py types replies loosely (bytes here, str under decode_responses)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def embedded_socket(settings: Settings) -> Path:
    return Path(settings.var_dir).resolve() / "redis" / "redis.sock"


def url(settings: Settings) -> str:
    return settings.redis_url or f"unix://{embedded_socket(settings)}"


def connect(settings: Settings, max_connections: int | None = None) -> redis.Redis:
    return redis.Redis.from_url(
        url(settings),
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=COMMAND_TIMEOUT,
        max_connections=max_connections,
        health_check_interval=30,
    )
