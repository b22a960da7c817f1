"""Asking the cluster's nodes what only their disks know: a small request/reply over Redis.

Interface: ``Request``, ``Reply`` and their codec (``encode_request``/``decode_request``,
``encode_reply``/``decode_reply``; ``BadRequest``); ``request_key(space, node)``; ``ask(conn,
space, nodes, what, args, timeout) -> dict[node, Reply | None]`` (the asker: None for a node that
did not answer in time); ``Answerer(conn, space, handlers)`` with ``handle(raw)`` (the reply key
and the reply, or None), ``once()`` and ``serve(stop)``; ``start_answerer(...) -> Thread`` (the
daemon thread a node's scheduler runs).

Why Redis: every node already reaches the cluster's main deployment (core.redis_conn
``connect_shared``), so asking needs no new listener, port or firewall rule. The asker pushes one
JSON request ``{id, node, what, args, reply_key, deadline}`` onto each node's list
``<prefix>:ask:<node>`` (and gives the list an expiry, so that a dead node's unanswered requests do
not pile up), then BLPOPs its own reply key ``<prefix>:ask:reply:<id>`` until every node answered
or its one overall deadline passed. The answerer BLPOPs its node's list (half a second at a
time, so that it stops promptly), runs the handler named by ``what`` and LPUSHes the JSON reply ``{id,
node, ok, data, error}`` to the reply key with a short expiry (nobody may read it: the asker gave
up). A node that does not answer in time is the asker's to report (never silently left out).

Bounds and safety: a request is at most ``MAX_REQUEST`` bytes and a reply at most ``MAX_REPLY``
(the handlers trim their answers to fit: ops.cluster_spool); a request that is not what it should
be gets an error reply when it names a reply key, and is dropped (logged) when it does not; a
reply key outside ``<prefix>:ask:reply:`` is never written (an answerer cannot be made to push
into a queue); a request addressed to another node, or past its deadline (its asker is gone: a
scheduler that was stopped finds them on waking), is dropped unanswered. A handler's exception
becomes an error reply: nothing here can end the scheduler that hosts the answerer.

Failures: the asker raises ``redis.RedisError`` (the CLI says Redis is unavailable); the
answerer logs Redis errors and tries again with a growing pause. Clocks: deadlines are wall-clock
times compared across nodes, as heartbeats already are (the cluster's clocks are kept in step).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from core.shards import Namespace

log = logging.getLogger("shardmail.ask")
MAX_REQUEST = 16 * 1024  # bytes of one encoded request
MAX_REPLY = 4 * 1024 * 1024  # bytes of one encoded reply (handlers trim their data to fit)
POLL = 1.0  # s per BLPOP of the asker: well under the client's socket timeout
ANSWER_WAIT = 0.5  # s per BLPOP of the answerer: it sees its stop within this (a scheduler stops promptly)
REPLY_TTL = 30  # s a reply nobody read stays in Redis
REQUEST_TTL = 60  # s beyond its deadline a node's request list lives without new requests
MAX_BACKOFF = 5.0

Handler = Callable[[dict[str, Any]], Any]


class BadRequest(ValueError):
    """A request that is not what it should be (the text says what)."""


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    node: str
    what: str
    args: dict[str, Any]
    reply_key: str
    deadline: float


@dataclass(frozen=True, slots=True)
class Reply:
    id: str
    node: str
    ok: bool
    data: Any = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Partial:
    """What ``decode_request`` could tell of a request it refused: where to send the error."""

    id: str = ""
    reply_key: str = ""
    node: str = ""


def request_key(space: Namespace, node: str) -> str:
    return space.shared(f"ask:{node}")


def reply_prefix(space: Namespace) -> str:
    return space.shared("ask:reply:")


def encode_request(request: Request) -> bytes:
    raw = json.dumps({"id": request.id, "node": request.node, "what": request.what, "args": request.args,
                      "reply_key": request.reply_key, "deadline": request.deadline}).encode()
    if len(raw) > MAX_REQUEST:
        raise BadRequest(f"request of {len(raw)} bytes (at most {MAX_REQUEST})")
    return raw


def decode_request(raw: bytes | str, space: Namespace) -> Request:
    """The request, or BadRequest; ``exc.args[1]`` is a Partial saying where its error may go."""
    partial = Partial()
    try:
        if len(raw) > MAX_REQUEST:
            raise BadRequest(f"request of {len(raw)} bytes (at most {MAX_REQUEST})")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("not JSON") from None
        if not isinstance(doc, dict):
            raise BadRequest("not a JSON object")
        reply_key, request_id = doc.get("reply_key"), doc.get("id")
        if isinstance(reply_key, str) and reply_key.startswith(reply_prefix(space)) and isinstance(request_id, str):
            named = doc.get("node")
            partial = Partial(request_id, reply_key, named if isinstance(named, str) else "")
        elif isinstance(reply_key, str):
            raise BadRequest(f"reply key {reply_key[:80]!r} is not under {reply_prefix(space)!r}")
        else:
            raise BadRequest("no reply_key")
        node, what, args, deadline = doc.get("node"), doc.get("what"), doc.get("args", {}), doc.get("deadline")
        if not isinstance(node, str) or not isinstance(what, str):
            raise BadRequest("node and what must be strings")
        if not isinstance(args, dict):
            raise BadRequest("args must be an object")
        if isinstance(deadline, bool) or not isinstance(deadline, int | float):
            raise BadRequest("deadline must be a number")
        return Request(request_id, node, what, args, reply_key, float(deadline))
    except BadRequest as exc:
        raise BadRequest(str(exc), partial) from None


def encode_reply(reply: Reply) -> bytes:
    return json.dumps({"id": reply.id, "node": reply.node, "ok": reply.ok, "data": reply.data,
                       "error": reply.error}).encode()


def decode_reply(raw: bytes | str) -> Reply:
    """The reply, or ValueError (a reply the asker cannot read counts as no answer from that node)."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not isinstance(doc.get("node"), str):
        raise ValueError("not a reply")
    return Reply(doc["id"], doc["node"], bool(doc.get("ok")), doc.get("data"), str(doc.get("error") or ""))


def ask(conn: redis.Redis, space: Namespace, nodes: Iterable[str], what: str, args: dict[str, Any],
        timeout: float) -> dict[str, Reply | None]:
    """Ask every node at once; their replies as they come, until all answered or ``timeout``
    seconds passed (one deadline for all). None for a node that did not answer in time."""
    nodes = list(dict.fromkeys(nodes))
    answers: dict[str, Reply | None] = dict.fromkeys(nodes)
    if not nodes:
        return answers
    request_id = uuid.uuid4().hex
    reply_key = reply_prefix(space) + request_id
    ends = time.monotonic() + timeout  # here; the requests carry it as the cluster's (wall) clock says
    deadline = time.time() + timeout
    with conn.pipeline(transaction=False) as pipe:
        for node in nodes:
            key = request_key(space, node)
            pipe.rpush(key, encode_request(Request(request_id, node, what, args, reply_key, deadline)))
            pipe.expire(key, int(timeout) + REQUEST_TTL)
        pipe.execute()
    waiting = set(nodes)
    try:
        while waiting:
            left = ends - time.monotonic()
            if left <= 0:
                break
            got = conn.blpop([reply_key], timeout=min(POLL, max(left, 0.01)))
            if got is None:
                continue
            try:
                reply = decode_reply(got[1])
            except ValueError:
                log.warning("an unreadable reply on %s: ignored", reply_key)
                continue
            if reply.id == request_id and reply.node in waiting:
                answers[reply.node] = reply
                waiting.discard(reply.node)
    finally:
        conn.delete(reply_key)
    return answers


class Answerer:
    """One node's side: answers the requests on its own list with its handlers."""

    def __init__(self, conn: redis.Redis, space: Namespace, handlers: dict[str, Handler]) -> None:
        self.conn = conn
        self.space = space
        self.handlers = handlers
        self.key = request_key(space, space.node)

    def handle(self, raw: bytes | str, now: float | None = None) -> tuple[str, Reply] | None:
        """The reply to one request and the key it goes to, or None when it gets none (see the
        module's doc)."""
        now = time.time() if now is None else now
        try:
            request = decode_request(raw, self.space)
        except BadRequest as exc:
            partial: Partial = exc.args[1]
            log.warning("a malformed request on %s: %s", self.key, exc.args[0])
            if not partial.reply_key or partial.node not in ("", self.space.node):
                return None  # nowhere to say so, or not ours to answer
            return partial.reply_key, Reply(partial.id, self.space.node, False,
                                            error=f"malformed request: {exc.args[0]}")
        if request.node != self.space.node:
            log.warning("a request for node %r on %s: dropped", request.node[:80], self.key)
            return None
        if request.deadline < now:
            log.info("a %s request past its deadline (by %.1f s): dropped", request.what[:40], now - request.deadline)
            return None
        handler = self.handlers.get(request.what)
        if handler is None:
            return request.reply_key, Reply(request.id, self.space.node, False,
                                            error=f"unknown request {request.what[:40]!r} (known: "
                                                  f"{', '.join(sorted(self.handlers))})")
        try:
            return request.reply_key, Reply(request.id, self.space.node, True, handler(request.args))
        except Exception as exc:  # a handler's bug or a disk error: an error reply, the scheduler goes on
            log.exception("answering %s", request.what)
            return request.reply_key, Reply(request.id, self.space.node, False, error=f"{type(exc).__name__}: {exc}")

    def reply(self, reply: Reply, reply_key: str) -> None:
        raw = encode_reply(reply)
        if len(raw) > MAX_REPLY:
            raw = encode_reply(Reply(reply.id, reply.node, False,
                                     error=f"reply of {len(raw)} bytes (at most {MAX_REPLY})"))
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.lpush(reply_key, raw)
            pipe.expire(reply_key, REPLY_TTL)
            pipe.execute()

    def once(self, wait: float = ANSWER_WAIT) -> bool:
        """Take one request (waiting up to ``wait`` s) and answer it; False if none came."""
        got = self.conn.blpop([self.key], timeout=wait)
        if got is None:
            return False
        answer = self.handle(got[1])
        if answer is not None:
            self.reply(answer[1], answer[0])
        return True

    def serve(self, stop: threading.Event) -> None:
        """Answer until ``stop`` is set (seen within ``ANSWER_WAIT`` seconds)."""
        backoff = 0.2
        while not stop.is_set():
            try:
                self.once()
                backoff = 0.2
            except redis.RedisError as exc:
                log.warning("answering for node %s: Redis unavailable (%s); retrying in %.1f s", self.space.node,
                            exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except Exception:  # never the end of the thread while its scheduler runs
                log.exception("answering for node %s", self.space.node)
                stop.wait(backoff)


def start_answerer(conn: redis.Redis, space: Namespace, handlers: dict[str, Handler],
                   stop: threading.Event) -> threading.Thread:
    """The answerer in a daemon thread, until ``stop`` is set."""
    thread = threading.Thread(target=Answerer(conn, space, handlers).serve, args=(stop,),
                              name=f"ask-answerer-{space.node}", daemon=True)
    thread.start()
    return thread
