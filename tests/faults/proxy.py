"""A small asyncio TCP proxy that can stall and cut the connections it carries.

Put between the worker and a broker that advertises the proxy's address (so clients
keep going through it after bootstrap). `stall()` keeps connections open but stops
moving bytes (a hung network); `cut()` closes every connection and refuses new ones
(a broker gone away); `restore()` brings normal service back.
"""

from __future__ import annotations

import asyncio
import contextlib

from worker.testing.embedded import HOST


class Proxy:
    def __init__(self, target_port: int, listen_port: int) -> None:
        self.target_port = target_port
        self.listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0  # accepted in all
        self.held = 0  # reads that arrived while stalled (held until restored)
        self.closed_by_cut = 0  # connections open when `cut` closed them

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.listen_port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, HOST, self.listen_port)

    @property
    def open(self) -> int:
        """Client connections open now (each has two writers: client and upstream)."""
        return len(self._writers) // 2

    async def stop(self) -> None:
        await self.cut()

    def stall(self) -> None:
        self._flowing.clear()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.closed_by_cut += self.open
        for writer in list(self._writers):
            writer.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def restore(self) -> None:
        self._flowing.set()
        if self._server is None:
            await self.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if not self._flowing.is_set():
                    self.held += 1
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(sink)
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()
