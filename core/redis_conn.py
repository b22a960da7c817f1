"""One way to reach Redis for every role, with timeouts that turn an outage into a quick error.

Interface: ``url(settings) -> str`` (the configured ``redis_url``, else the embedded server's unix
socket under ``var_dir``), ``connect(settings, node=None) -> redis.Redis`` (the deployment that
holds a node's queues, by default this node's: its shard group's, core.groups, else the main one),
``connect_shared(settings)`` (the cluster's main deployment: node registry, rate limits, AUTH
throttles, autoresponder memory).

Failures: a Redis that is down, slow or gone raises ``redis.RedisError`` within the socket
timeouts below, which every caller treats as temporary (4xx, exit 75, retry later); nothing
waits forever on Redis.

Settings: ``redis_url``, ``var_dir``, ``node``, ``redis_group``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from core.config import Settings
from core.groups import group_url

CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0


def text(raw: Any) -> str:
    """A Redis reply as text: redis-py types replies loosely (bytes here, str under decode_responses)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def embedded_socket(settings: Settings) -> Path:
    return Path(settings.var_dir).resolve() / "redis" / "redis.sock"


def url(settings: Settings) -> str:
    return settings.redis_url or f"unix://{embedded_socket(settings)}"


def connect(settings: Settings, max_connections: int | None = None, node: str | None = None) -> redis.Redis:
    grouped = group_url(settings, node or settings.node)
    if grouped is not None:
        return _client(grouped, max_connections)
    return connect_shared(settings, max_connections)


def connect_shared(settings: Settings, max_connections: int | None = None) -> redis.Redis:
    return _client(url(settings), max_connections)


def _client(address: str, max_connections: int | None) -> redis.Redis:
    return redis.Redis.from_url(
        address,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=COMMAND_TIMEOUT,
        max_connections=max_connections,
        health_check_interval=30,
    )
