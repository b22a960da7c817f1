"""One way to reach Redis for every role, with timeouts that turn an outage into a quick error.

Interface: ``url(settings) -> str`` (the configured ``redis_url``, else the embedded server's unix
socket under ``var_dir``), ``connect(settings, max_connections=None, node=None) -> redis.Redis``
(the deployment that holds a node's queues, by default this node's: its shard group's,
core.groups, else the main one), ``connect_shared(settings)`` (the cluster's main deployment: node
registry, rate limits, AUTH throttles, autoresponder memory), ``connect_async(settings)`` (the same
main deployment for asyncio code), ``private_client(conn)`` (a one-connection client to wherever
``conn`` goes, for blocking pops), ``describe(settings)`` (where the main deployment is, for logs).

With ``redis_sentinels`` the main deployment is found through redis-py's Sentinel support: every
new connection asks the sentinels for the current primary of ``redis_master``, so a process follows
a failover by itself; a connection that still points at a demoted primary fails (READONLY, reset),
the caller treats that as temporary like any other outage, and its next connection goes to the new
primary.

Failures: a Redis that is down, slow or gone (or sentinels that name no primary) raises
``redis.RedisError`` within the socket timeouts below, which every caller treats as temporary (4xx,
exit 75, retry later); nothing waits forever on Redis.

Settings: ``redis_url``, ``redis_sentinels``, ``redis_master``, ``redis_password``,
``redis_sentinel_password``, ``redis_tls``, ``redis_tlscafile``, ``var_dir``, ``node``, ``redis_group``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

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


def describe(settings: Settings) -> str:
    """The main deployment in words, for start-up logs and error messages."""
    if settings.redis_sentinels:
        return f"primary {settings.redis_master!r} of sentinels {', '.join(settings.redis_sentinels)}"
    return url(settings) + ("" if settings.redis_url else " (embedded)")


def connect(settings: Settings, max_connections: int | None = None, node: str | None = None,
            connect_timeout: float = CONNECT_TIMEOUT, timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    grouped = group_url(settings, node or settings.node)
    if grouped is not None:
        return redis.Redis.from_url(grouped, **_options(max_connections, connect_timeout, timeout))
    return connect_shared(settings, max_connections, connect_timeout, timeout)


def connect_shared(settings: Settings, max_connections: int | None = None,
                   connect_timeout: float = CONNECT_TIMEOUT, timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    options = _options(max_connections, connect_timeout, timeout)
    if not settings.redis_sentinels:
        return redis.Redis.from_url(url(settings), **options)
    timeouts = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout}
    sentinel = redis.sentinel.Sentinel(_sentinel_addresses(settings),
                                       sentinel_kwargs={**timeouts, **_sentinel_options(settings)},
                                       socket_connect_timeout=connect_timeout, socket_timeout=timeout)
    return sentinel.master_for(settings.redis_master, **options, **_auth_tls(settings))


def connect_async(settings: Settings, connect_timeout: float = CONNECT_TIMEOUT,
                  timeout: float = COMMAND_TIMEOUT) -> redis.asyncio.Redis:
    """The main deployment for asyncio code (ingress's rate limiter)."""
    options: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout}
    if not settings.redis_sentinels:
        return redis.asyncio.Redis.from_url(url(settings), **options)
    sentinel = redis.asyncio.sentinel.Sentinel(_sentinel_addresses(settings),
                                                sentinel_kwargs={**options, **_sentinel_options(settings)}, **options)
    return sentinel.master_for(settings.redis_master, **options, **_auth_tls(settings))


def private_client(conn: redis.Redis) -> redis.Redis:
    """A client of one connection to where ``conn`` goes (the same server, or the same sentinels'
    primary), with its settings: a blocking pop must not hold a connection others share."""
    pool = conn.connection_pool
    kwargs = dict(pool.connection_kwargs)
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        kwargs.pop("connection_pool", None)
        return redis.Redis(connection_pool=redis.sentinel.SentinelConnectionPool(
            pool.service_name, pool.sentinel_manager, max_connections=1, **kwargs))
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=1, **kwargs))


def socket_timeout(conn: redis.Redis) -> float | None:
    """The command timeout of ``conn``'s connections (None: none)."""
    value = conn.connection_pool.connection_kwargs.get("socket_timeout")
    return float(value) if value else None


def _options(max_connections: int | None, connect_timeout: float, timeout: float) -> dict[str, Any]:
    return {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout,
            "max_connections": max_connections, "health_check_interval": 30}


def _sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    addresses = []
    for entry in settings.redis_sentinels:
        host, _, port = entry.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def _auth_tls(settings: Settings) -> dict[str, Any]:
    """Password and TLS for the primary's connections."""
    options: dict[str, Any] = {}
    if settings.redis_password:
        options["password"] = settings.redis_password
    if settings.redis_tls:
        options["ssl"] = True
        if settings.redis_tlscafile:
            options["ssl_ca_certs"] = settings.redis_tlscafile
    return options


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    """Password and TLS for the connections to the sentinels themselves."""
    options = {key: value for key, value in _auth_tls(settings).items() if key != "password"}
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    return options
