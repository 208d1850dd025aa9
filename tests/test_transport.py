"""The asyncio side of the pipe: what the read transport is asked to do per read."""

from __future__ import annotations

import asyncio
import os

from yate_sipgen.transport import READ_SIZE, YateProtocol


def test_reads_ask_for_a_heap_sized_buffer_and_still_take_every_byte() -> None:
    """asyncio's 256 KiB reads are served by mmap (three system calls and fresh pages per
    read); ours ask for 64 KiB, and a write bigger than that still arrives whole."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        got: list[bytes] = []
        proto = YateProtocol(got.append, lambda: None)
        transport, _ = await loop.connect_read_pipe(lambda: proto, os.fdopen(r, "rb", 0))
        assert transport.max_size == READ_SIZE <= 128 * 1024  # glibc's mmap threshold
        data = b"%%>message:x:1:m::k=" + b"v" * (3 * READ_SIZE) + b"\n"
        view = memoryview(data)
        while view:
            n = await loop.run_in_executor(None, os.write, w, view[:65536])
            view = view[n:]
        os.close(w)
        await asyncio.wait_for(proto.closed, 5)
        transport.close()
        assert b"".join(got) == data

    asyncio.run(go())
