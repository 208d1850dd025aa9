"""asyncio transports to Yate: stdin/stdout pipes, or a TCP / UNIX socket client.

The read side is an :class:`asyncio.Protocol`, so data is drained as soon as it arrives (Yate's
writes to a script block a Yate thread) and lines have no length limit (no ``readline``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


#: Bytes asked for per read. asyncio's transports ask for 256 KiB, a size glibc's malloc
#: serves with mmap: every read then costs mmap + mremap + munmap and fresh pages (measured
#: with strace: three such calls per read, i.e. per line on a lightly loaded relay). 64 KiB
#: comes from the heap and still takes a whole burst of Yate's lines at once.
READ_SIZE = 65536


class YateProtocol(asyncio.Protocol):
    """Feeds everything read to ``feed``; calls ``lost`` once when the peer goes away."""

    def __init__(self, feed: Callable[[bytes], None], lost: Callable[[], None]) -> None:
        self.feed = feed
        self.lost = lost
        self.transport: asyncio.BaseTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if hasattr(transport, "max_size"):  # asyncio's pipe and socket transports
            transport.max_size = READ_SIZE  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def eof_received(self) -> bool:
        self._gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
            self.lost()


class _WriteProtocol(asyncio.Protocol):
    def __init__(self, lost: Callable[[], None]) -> None:
        self.lost = lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()


async def open_pipes(feed: Callable[[bytes], None], lost: Callable[[], None]
                     ) -> tuple[YateProtocol, asyncio.WriteTransport]:
    """Our stdin (from Yate) and stdout (to Yate) as asyncio pipes."""
    loop = asyncio.get_running_loop()
    reader = YateProtocol(feed, lost)
    rt, _ = await loop.connect_read_pipe(lambda: reader,
                                         os.fdopen(0, "rb", buffering=0, closefd=False))
    try:
        wt, _ = await loop.connect_write_pipe(lambda: _WriteProtocol(lost),
                                              os.fdopen(1, "wb", buffering=0, closefd=False))
    except ValueError:  # stdout is a regular file (a manual run): plain blocking writes
        wt = _FileWriter(1)
    return reader, wt


class _FileWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def close(self) -> None:
        pass


async def open_socket(mode: str, address: str, feed: Callable[[bytes], None],
                      lost: Callable[[], None]) -> tuple[YateProtocol, asyncio.WriteTransport]:
    """Connect to an extmodule ``[listener]``: ``tcp`` host:port or ``unix`` path."""
    loop = asyncio.get_running_loop()
    reader = YateProtocol(feed, lost)
    if mode == "tcp":
        host, _, port = address.rpartition(":")
        transport, _ = await loop.create_connection(lambda: reader, host.strip("[]"), int(port))
    else:
        transport, _ = await loop.create_unix_connection(lambda: reader, address)
    return reader, transport  # type: ignore[return-value]
