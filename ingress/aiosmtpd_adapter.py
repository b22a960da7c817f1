"""Every use of aiosmtpd's internals, in one place: the ``Server`` protocol class ingress runs.

Interface: ``Server`` (an aiosmtpd ``SMTP`` subclass); ``CHECKED`` (the aiosmtpd versions this
module was read against); ``DEPENDS`` (each private name of aiosmtpd.smtp that shardmail's ingress
overrides or uses, and why), which tests/test_aiosmtpd_adapter.py checks against the installed
aiosmtpd so that an upgrade breaking an assumption fails loudly rather than quietly.

Checked against aiosmtpd 1.4.6 (the pin in pyproject.toml is >=1.4.6,<1.5). Each override and why:
- ``inspect`` and ``dir`` inside aiosmtpd.smtp (``_CachedInspect``) and the constructor's method
  tables (``_Wiring``, ``_Bound``, ``_Auth``, ``_ehlo_version``): the constructor runs per
  connection and introspected the classes each time, most of a short session's CPU.
- ``sanitized_log``: it formats every command line even when the logger drops it.
- ``push``: every reply gets an enhanced status code (RFC 2034), aiosmtpd's wordings are mapped to
  ingress.replies, the lines of a multi-line reply go out in one write.
- ``_reset_timeout`` / ``_timeout_cb`` / ``data_received``: one armed timer whose deadline moves,
  and any bytes (not only a whole command) count as activity.
- ``_strip_command_keyword`` / ``_getaddr``: paths by RFC 5321's grammar only
  (core.address.parse_path), never aiosmtpd's RFC 5322 fallback, with 501 5.1.7 / 5.1.3; MAIL's
  ``XVERP`` parameter is taken out there (aiosmtpd knows only SIZE, BODY and SMTPUTF8) and left in
  ``Server.verp_request`` for the handler.
- ``smtp_DATA``: the data read in chunks up to CRLF.CRLF rather than line by line (40 % of a
  session's CPU), with the size and line limits answered after the end (RFC 5321 4.2.5).
- ``connection_lost`` / ``_unlink``: a finished session's reference cycles are cut.
ingress.guard's ``SessionGuard`` mixin also relies on ``_handle_client`` (the session task),
``eof_received``, ``_original_transport`` and ``_tls_protocol`` (STARTTLS state), and
ingress.smtp_auth on ``MISSING`` and ``AuthResult``: they are in ``DEPENDS`` too.

Failures: none of its own; replies come from ingress.replies. Settings: none (the handler's).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, syntax

from core import faults
from core.address import parse_path
from ingress import replies

CHECKED = ("1.4.6",)
# name in aiosmtpd.smtp (module attribute, or SMTP attribute after "SMTP.") -> why shardmail needs it
DEPENDS = {
    "inspect": "replaced by _CachedInspect: the constructor's per-connection introspection",
    "sanitized_log": "replaced by _quiet_sanitized_log: no formatting of dropped log lines",
    "_AuthMechAttr": "the AUTH mechanism record _Auth builds lazily",
    "MISSING": "ingress.smtp_auth: an AUTH exchange the client aborted",
    "AuthResult": "ingress.smtp_auth: the result of an auth_* method",
    "SMTP._getaddr": "replaced: RFC 5321 paths only",
    "SMTP._strip_command_keyword": "wrapped: tells _getaddr whether MAIL or RCPT is parsing",
    "SMTP._reset_timeout": "replaced: one timer, a moving deadline",
    "SMTP._timeout_cb": "wrapped: re-arms until the deadline has passed",
    "SMTP._timeout_handle": "the timer _reset_timeout arms",
    "SMTP._set_post_data_state": "called by the replaced smtp_DATA, as aiosmtpd's own does",
    "SMTP._call_handler_hook": "called by the replaced smtp_DATA to run handle_DATA",
    "SMTP.check_helo_needed": "called by the replaced smtp_DATA",
    "SMTP.check_auth_needed": "called by the replaced smtp_DATA",
    "SMTP._handle_client": "ingress.guard: a refused connection hears 421 instead of the greeting",
    "SMTP.eof_received": "ingress.guard: closes a half-open connection",
    "SMTP._original_transport": "ingress.guard: tells the first connection_made from STARTTLS's",
    "SMTP._tls_protocol": "ingress.guard: STARTTLS inside TLS is refused",
    "SMTP.smtp_STARTTLS": "ingress.guard: wrapped to refuse a second STARTTLS",
}

_MALFORMED = "553 5.1.3 Error: malformed address"  # aiosmtpd's reply when _getaddr returns None
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
# Enhanced codes for aiosmtpd's built-in replies, by basic code (RFC 3463).
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "250": "2.0.0", "252": "2.0.0",
    "421": "4.3.0", "451": "4.3.0", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "552": "5.3.4", "554": "5.5.0", "555": "5.5.4",
}  # fmt: skip
_REWRITE = {
    _MALFORMED: replies.BAD_ADDRESS.line,
    "501 Syntax: MAIL FROM: <address>": replies.MAIL_SYNTAX.line,
    "501 Syntax: RCPT TO: <address>": replies.RCPT_SYNTAX.line,
}
_NO_ENHANCED = ("220", "354", "334")
AIOSMTPD_LINES = tuple(_REWRITE)  # aiosmtpd's own lines recognised here (its source must still have them)


class _CachedInspect:
    """Stands in for the ``inspect`` module inside aiosmtpd.smtp.

    aiosmtpd's constructor, which runs for every connection, introspects the server and handler
    classes (``inspect.getmembers`` for ``auth_*`` methods, ``inspect.signature`` of the EHLO
    hook, ``dir()`` for command and hook methods): about 40 % of the CPU an SMTP session cost
    here. The answers depend only on the classes, so they are computed once per class and
    re-bound to each new instance.
    """

    def __init__(self) -> None:
        self._auth_names: dict[type, list[str]] = {}
        self._signatures: dict[object, inspect.Signature] = {}
        self._dir: dict[type, list[str]] = {}
        self._methods: dict[tuple[type, str], dict[str, str]] = {}

    def auth_names(self, obj: object) -> list[str]:
        names = self._auth_names.get(type(obj))
        if names is None:
            names = self._auth_names[type(obj)] = [n for n, _ in inspect.getmembers(obj) if n.startswith("auth_")]
        return names

    def getmembers(self, obj: object) -> list[tuple[str, Any]]:
        if _wiring.skips(obj):
            return []
        return [(name, getattr(obj, name)) for name in self.auth_names(obj)]

    def signature(self, func: Any) -> inspect.Signature:
        key = getattr(func, "__func__", func)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = inspect.signature(func)
        return sig

    def dir(self, obj: object) -> list[str]:
        """aiosmtpd scans dir() of the server and the handler for smtp_*/handle_* methods (its only
        use of dir()): the names it keeps, without the 200 others it would test each time."""
        if _wiring.skips(obj):
            return []
        names = self._dir.get(type(obj))
        if names is None:
            names = self._dir[type(obj)] = [n for n in dir(obj) if n.startswith(("smtp_", "handle_"))]
        return names

    def methods(self, obj: object, prefix: str) -> dict[str, str]:
        """aiosmtpd's key (the name without ``prefix``) -> attribute name, once per class."""
        key = (type(obj), prefix)
        names = self._methods.get(key)
        if names is None:
            names = self._methods[key] = {n.replace(prefix, ""): n for n in self.dir(obj) if n.startswith(prefix)}
        return names

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


class _Wiring(threading.local):
    """The server and handler a ``Server`` is constructing in this thread: aiosmtpd's constructor
    sees no methods on them (it would build three dicts of bound methods, about 60 % of its
    cost per connection, and a reference cycle through every bound method), and ``Server`` sets
    mappings that bind on access instead."""

    server: object = None
    handler: object = None

    def skips(self, obj: object) -> bool:
        return obj is not None and (obj is self.server or obj is self.handler)


class _Bound(Mapping[str, Any]):
    """aiosmtpd's ``{"MAIL": server.smtp_MAIL, ...}`` (or hooks, or AUTH mechanisms), with each
    method looked up when it is used rather than bound up front for every connection."""

    __slots__ = ("_names", "_obj")

    def __init__(self, obj: object, names: dict[str, str]) -> None:
        self._obj = obj
        self._names = names

    def __getitem__(self, key: str) -> Any:
        return getattr(self._obj, self._names[key])

    def get(self, key: str, default: Any = None) -> Any:
        name = self._names.get(key)
        return default if name is None else getattr(self._obj, name)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _Auth(Mapping[str, Any]):
    """aiosmtpd's AUTH mechanisms of a server and its handler, built only when a client asks (EHLO
    offering AUTH, or an AUTH command), as aiosmtpd's constructor builds them."""

    __slots__ = ("_built", "_exclude", "_handler", "_server")

    def __init__(self, server: SMTP, handler: object, exclude: Iterable[str]) -> None:
        self._server, self._handler, self._exclude = server, handler, tuple(exclude)
        self._built: dict[str, Any] | None = None

    def _table(self) -> dict[str, Any]:
        if self._built is None:
            table = {}
            for obj in (self._server, self._handler):
                for name in _cached.auth_names(obj):
                    method = getattr(obj, name)
                    mechanism = getattr(method, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-"))
                    table[mechanism] = aiosmtpd.smtp._AuthMechAttr(method, obj is self._server)
            for mechanism in self._exclude:
                table.pop(mechanism, None)
            self._built = table
        return self._built

    def __getitem__(self, key: str) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


_EHLO_VERSIONS: dict[type, str | None] = {}


def _ehlo_version(handler: object) -> str | None:
    """aiosmtpd's check of the handler's EHLO hook (4 or 5 parameters), once per handler class."""
    cls = type(handler)
    if cls not in _EHLO_VERSIONS:
        hook = getattr(handler, "handle_EHLO", None)
        if hook is None:
            _EHLO_VERSIONS[cls] = None
        else:
            count = len(inspect.signature(hook).parameters)
            if count not in (4, 5):
                raise RuntimeError("Unsupported EHLO Hook")
            _EHLO_VERSIONS[cls] = "old" if count == 4 else "new"
    return _EHLO_VERSIONS[cls]


_wiring = _Wiring()
_cached = _CachedInspect()
aiosmtpd.smtp.inspect = _cached  # type: ignore[assignment]
aiosmtpd.smtp.dir = _cached.dir  # type: ignore[attr-defined]  # shadows the builtin in that module only
_sanitized_log = aiosmtpd.smtp.sanitized_log


def _quiet_sanitized_log(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd logs every command line (debug and info) and sanitizes the arguments first, even
    when its logger drops them (serve sets it to WARNING): two calls per command for nothing."""
    if aiosmtpd.smtp.log.isEnabledFor(logging.DEBUG if func == aiosmtpd.smtp.log.debug else logging.INFO):
        _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _quiet_sanitized_log


class Server(SMTP):
    """aiosmtpd's protocol with shardmail's reply discipline."""

    _raw_replies = False
    _held: list[bytes] | None = None

    def __init__(self, handler: Any, *, auth_exclude_mechanism: Iterable[str] | None = None, **kwargs: Any) -> None:
        """aiosmtpd's constructor, with the tables of command, hook and AUTH methods set up once
        per class and bound on use (see ``_Wiring``)."""
        _wiring.server, _wiring.handler = self, handler
        try:
            super().__init__(handler, **kwargs)
        finally:
            _wiring.server = _wiring.handler = None
        self._smtp_methods = _Bound(self, _cached.methods(self, "smtp_"))  # type: ignore[assignment]
        self._handle_hooks = _Bound(handler, _cached.methods(handler, "handle_"))  # type: ignore[assignment]
        self._auth_methods = _Auth(self, handler, auth_exclude_mechanism or ())  # type: ignore[assignment]
        self._ehlo_hook_ver = _ehlo_version(handler)

    async def push(self, status: Any) -> None:
        """aiosmtpd's push (encode, write, drain), with enhanced codes; lines of a multi-line reply
        are held and go out in one write (one segment instead of one per EHLO line)."""
        if isinstance(status, str):
            if status == _MALFORMED and self._path_refusal:
                status, self._path_refusal = self._path_refusal, ""
            elif not self._raw_replies:
                status = _enhance(status)
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        if self._held is not None:
            self._held.append(status + b"\r\n")
            return
        self._writer.write(status + b"\r\n")
        await self._writer.drain()

    async def _verbatim(self, command: Awaitable[None]) -> None:
        """Run a command whose replies go out as they are (EHLO/HELO carry no enhanced codes), in
        one write."""
        self._raw_replies = True
        self._held = held = list[bytes]()
        try:
            await command
        finally:
            self._raw_replies = False
            self._held = None
            if held:
                self._writer.write(b"".join(held))
        if held:
            await self._writer.drain()

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._verbatim(super().smtp_EHLO(hostname))

    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels and re-arms a timer for every command; here the timer stays armed and
        only the deadline moves: when it fires early, it re-arms for what is left."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def data_received(self, data: bytes) -> None:
        """Any bytes from the client push the idle deadline on: silence, not the length of a
        command or of DATA, is what times out (the whole session is bounded by ingress.guard)."""
        self._deadline = self.loop.time() + self._timeout_duration
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        super()._timeout_cb()

    _path_keyword = ""
    _path_refusal = ""

    def _strip_command_keyword(self, keyword: str, arg: str) -> str | None:
        """aiosmtpd strips ``FROM:`` (MAIL) or ``TO:`` (RCPT) just before it parses the path: the
        keyword tells ``_getaddr`` which grammar and which refusal apply."""
        self._path_keyword = keyword
        return super()._strip_command_keyword(keyword, arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The path by RFC 5321's grammar only (``core.address.parse_path``, never aiosmtpd's lenient
        RFC 5322 parser): a reverse-path may be ``<>`` (returned as ``"<>"``, aiosmtpd's truthy
        spelling), a forward-path ``<Postmaster>`` (this host's postmaster, ``postmaster@me``). A
        path off the grammar is refused, 501 5.1.7 (sender) or 501 5.1.3 (recipient), via ``push``."""
        keyword, self._path_keyword = self._path_keyword, ""
        sender = keyword == "FROM:"
        utf8 = None if sender else bool(self.envelope is not None and self.envelope.smtp_utf8)
        path = parse_path(arg, smtputf8=utf8, null=sender, postmaster=keyword == "TO:")
        if isinstance(path, str):
            self._path_refusal = (replies.BAD_SENDER if sender else replies.BAD_RECIPIENT).format(why=path)
            return None, None
        params = path.params
        if sender:
            self.verp_request = None
            session = self.session  # after HELO the parameter stays, for aiosmtpd's refusal
            if params and "XVERP" in params.upper() and session is not None and session.extended_smtp:
                params = self._take_verp(params)
        if not path.mailbox:
            return "<>", params
        if "@" not in path.mailbox:
            return f"postmaster@{self.event_handler.settings.me}", params  # the bare <Postmaster>
        return path.mailbox, params

    verp_request: str | None = None  # MAIL's XVERP parameter: "" (bare) or its delimiters; None: absent

    def _take_verp(self, params: str) -> str:
        """MAIL's parameters without ``XVERP``/``XVERP=xy`` (aiosmtpd would refuse it as unknown),
        which goes to ``verp_request`` for the handler's ``handle_MAIL`` to judge."""
        kept = []
        for param in params.split():
            keyword, equals, value = param.partition("=")
            if keyword.upper() == "XVERP":
                self.verp_request = value if equals else ""
            else:
                kept.append(param)
        return " ".join(kept)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in chunks rather than line by line (aiosmtpd's way cost 40 % of a session's CPU).

        Only CRLF.CRLF ends the data (a lone "." at the very start too); the size limit keeps
        memory bounded (past it only the last bytes are kept, to find the end); over-long lines
        and oversize messages are answered only after the end, as RFC 5321 4.2.5 wants.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT.line)
            return
        if arg:
            await self.push(replies.DATA_SYNTAX.line)
            return
        await self.push(replies.GO_AHEAD)
        limit = self.data_size_limit
        data = bytearray()
        total = 0
        while True:
            try:
                try:
                    chunk = await self._reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as exc:
                    chunk = await self._reader.read(exc.consumed)
                    final = False
                else:
                    final = True
            except asyncio.CancelledError:
                self._writer.close()
                raise
            total += len(chunk)
            data += chunk
            end = len(data) - 3
            if final and (end == 0 or (end >= 2 and data[end - 2 : end] == b"\r\n")):
                del data[end:]
                break
            if limit and total > limit + 5:
                del data[:-5]  # too big: keep only what may hold the start of the end marker
        total -= 3
        if limit and total > limit:
            self._set_post_data_state()
            await self.push(replies.TOO_BIG.line)
            return
        if len(data) > self.line_length_limit - 2 and max(map(len, data.split(b"\r\n"))) > self.line_length_limit - 2:
            self._set_post_data_state()
            await self.push(replies.LINE_TOO_LONG.line)
            return
        if data.startswith(b"."):
            del data[0]
        content = bytes(data.replace(b"\r\n.", b"\r\n"))  # undo the transparency dots
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)
        faults.crash_point("after_250")

    async def smtp_HELO(self, hostname: str) -> None:
        await self._verbatim(super().smtp_HELO(hostname))

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        task = self._handler_coroutine
        if task is not None:
            task.add_done_callback(self._unlink)

    def _unlink(self, _task: object) -> None:
        """Once the session is over (connection lost, its task ended), drop the references that
        lead back to this object (method tables, task, timer, streams, callback): then a session's
        objects go with their last reference instead of waiting as cyclic garbage for the
        collector (about 5 % of an SMTP process's CPU here)."""
        for name in _SESSION_LINKS:
            setattr(self, name, None)


_SESSION_LINKS = ("_smtp_methods", "_handle_hooks", "_auth_methods", "_handler_coroutine", "_timeout_handle",
                  "_reader", "_writer", "_client_connected_cb", "session", "envelope")
_enhanced: dict[str, str] = {}


def _enhance(status: str) -> str:
    """Give a reply line an enhanced status code if it lacks one (RFC 2034); the fixed lines are
    remembered (the one per message, "queued as <id>", already carries its code)."""
    known = _enhanced.get(status)
    if known is not None:
        return known
    enhanced = _enhance_line(status)
    if enhanced is not status and len(_enhanced) < 512:
        _enhanced[status] = enhanced
    return enhanced


def _enhance_line(status: str) -> str:
    status = _REWRITE.get(status, status)
    code = status[:3]
    if code in _NO_ENHANCED or _HAS_ENHANCED.match(status):
        return status
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    return f"{code}{status[3:4] or ' '}{enhanced} {status[4:]}".rstrip()
