"""A small SMTP load generator for benchmarks that need many recipients (smtp-source has one).

Interface: ``run_load(port, messages, sessions, size, recipients) -> float`` (seconds taken);
``python -m bench.smtp_load --port P --messages N``. One connection per message, like
smtp-source's default; recipients taken in turn from the list; loopback only.
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


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def _one(port: int, recipient: str, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for expect, command in ((b"220", None), (b"250", b"EHLO bench.example\r\n"),
                                (b"250", b"MAIL FROM:<bench@example.net>\r\n"),
                                (b"250", f"RCPT TO:<{recipient}>\r\n".encode()), (b"354", b"DATA\r\n"),
                                (b"250", data + b".\r\n")):
            if command:
                writer.write(command)
            reply = await _reply(reader)
            if not reply.startswith(expect):
                raise RuntimeError(f"unexpected reply {reply!r}")
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


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
    started = time.perf_counter()
    try:
        import uvloop

        failures = uvloop.run(_load(port, messages, sessions, size, recipients))
    except ImportError:
        failures = asyncio.run(_load(port, messages, sessions, size, recipients))
    return time.perf_counter() - started, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    parser.add_argument("--users", type=int, default=100)
    args = parser.parse_args()
    seconds, failed = run_load(args.port, args.messages, args.sessions, args.size,
                               [f"user{i:03d}@test.example" for i in range(args.users)])
    print(f"{args.messages} messages in {seconds:.1f} s: {args.messages / seconds:.0f} msg/s, {failed} failed")


if __name__ == "__main__":
    main()
