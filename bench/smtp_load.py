"""A small SMTP load generator for benchmarks that need many recipients (smtp-source has one).

Interface: ``run_load(port, messages, sessions, size, recipients) -> (seconds, failed)``;
``run_spread([(port, messages, sessions), ...], size, recipients)`` (several listeners at once);
``python -m bench.smtp_load --port P --messages N``; ``--smoke`` (for CI) sends 300 messages to an
in-process aiosmtpd sink on a free port instead. One connection per message, like smtp-source's
default; recipients taken in turn from the list; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time


def message(size: int, number: int, recipient: str) -> bytes:
    head = f"From: <bench@example.net>\r\nTo: <{recipient}>\r\nSubject: load {number}\r\n\r\n"
    line = ("x" * 76 + "\r\n").encode()
    body = line * max(1, (size - len(head)) // len(line))
    return head.encode() + body


class _Session(asyncio.Protocol):
    """One SMTP transaction as a protocol (no stream objects, no coroutine per reply): the
    generator runs on the measured machine for both sides, so its own CPU per message is kept
    small. Replies are awaited one by one, as without PIPELINING; QUIT is sent without waiting
    for its reply, then the connection is closed."""

    def __init__(self, commands: list[tuple[bytes, bytes | None]], done: asyncio.Future[None]) -> None:
        self.commands = commands
        self.done = done
        self.step = 0
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.done.done():
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            if line[3:4] == b"-":
                continue  # a multi-line reply goes on
            expect, _ = self.commands[self.step]
            if not line.startswith(expect):
                self._finish(RuntimeError(f"unexpected reply {line!r}"))
                return
            self.step += 1
            if self.step == len(self.commands):
                assert self.transport is not None
                self.transport.write(b"QUIT\r\n")
                self._finish(None)
                return
            command = self.commands[self.step][1]
            assert self.transport is not None and command is not None
            self.transport.write(command)

    def _finish(self, error: Exception | None) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection closed ({exc})"))


async def _one(port: int, recipient: str, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    commands: list[tuple[bytes, bytes | None]] = [
        (b"220", None), (b"250", b"EHLO bench.example\r\n"), (b"250", b"MAIL FROM:<bench@example.net>\r\n"),
        (b"250", f"RCPT TO:<{recipient}>\r\n".encode()), (b"354", b"DATA\r\n"), (b"250", data + b".\r\n")]
    await loop.create_connection(lambda: _Session(commands, done), "127.0.0.1", port)
    await done


async def _load(port: int, messages: int, sessions: int, size: int, recipients: list[str]) -> int:
    numbers = iter(range(messages))
    cycle = itertools.cycle(recipients)
    failures = 0

    async def session() -> None:
        nonlocal failures
        for number in numbers:
            recipient = next(cycle)
            try:
                await _one(port, recipient, message(size, number, recipient))
            except (OSError, RuntimeError, ConnectionError):
                failures += 1

    await asyncio.gather(*(session() for _ in range(sessions)))
    return failures


def run_load(port: int, messages: int, sessions: int, size: int, recipients: list[str]) -> tuple[float, int]:
    """(seconds, failed messages)."""
    return run_spread([(port, messages, sessions)], size, recipients)


async def _spread(targets: list[tuple[int, int, int]], size: int, recipients: list[str]) -> int:
    return sum(await asyncio.gather(*(_load(port, messages, sessions, size, recipients)
                                      for port, messages, sessions in targets)))


def run_spread(targets: list[tuple[int, int, int]], size: int, recipients: list[str]) -> tuple[float, int]:
    """Several listeners loaded at once from one event loop, ``(port, messages, sessions)`` each
    (the nodes of a cluster); (seconds until the last is done, failed messages)."""
    started = time.perf_counter()
    try:
        import uvloop

        failures = uvloop.run(_spread(targets, size, recipients))
    except ImportError:
        failures = asyncio.run(_spread(targets, size, recipients))
    return time.perf_counter() - started, failures


class _Sink:
    """aiosmtpd handler for --smoke: every message is accepted and dropped."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 2.0.0 dropped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, help="where to send (required unless --smoke)")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="300 messages to an in-process sink, seconds")
    args = parser.parse_args()
    sink = None
    if args.smoke:
        from aiosmtpd.controller import Controller

        from bench.ingress import free_port

        args.messages, args.sessions, args.port = 300, 10, free_port()
        sink = Controller(_Sink(), hostname="127.0.0.1", port=args.port)
        sink.start()
    elif args.port is None:
        parser.error("--port is required (or --smoke)")
    try:
        seconds, failed = run_load(args.port, args.messages, args.sessions, args.size,
                                   [f"user{i:03d}@test.example" for i in range(args.users)])
    finally:
        if sink is not None:
            sink.stop()
    print(f"{args.messages} messages in {seconds:.1f} s: {args.messages / seconds:.0f} msg/s, {failed} failed")


if __name__ == "__main__":
    main()
