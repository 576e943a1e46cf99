"""A TCP proxy that misbehaves on purpose, for outage drills and fault tests.

Modes: ``pass`` (forward both ways), ``refuse`` (drop every connection and
refuse new ones), ``stall`` (accept, never answer), ``drop_replies`` (forward
commands to the server but throw its replies away: the ambiguous case where a
write is applied and the client never learns it), and ``drop_big_replies``
(the same, but only on a connection once it has sent a command over 16 KiB: a
replay batch loses its reply while small health probes still pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

MODES = ("pass", "refuse", "stall", "drop_replies", "drop_big_replies")
BIG = 16 * 1024  # larger than any probe or script load, smaller than a replay batch


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spillover-faultproxy", daemon=True)
        self._sock = socket.create_server(("127.0.0.1", listen_port), reuse_port=False)
        self.port: int = self._sock.getsockname()[1]
        self._thread.start()
        self._ready.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set_mode(self, mode: str) -> None:
        """Switch behaviour; ``refuse`` and ``stall`` also cut the connections already open."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        asyncio.run_coroutine_threadsafe(self._set_mode(mode), self._loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def _set_mode(self, mode: str) -> None:
        previous, self.mode = self.mode, mode
        if mode in ("refuse", "stall") or previous in ("stall", "drop_replies", "drop_big_replies"):
            self._cut_all()
        if mode == "refuse" and self._server is not None:
            self._server.close()
            self._server = None
        elif mode != "refuse" and self._server is None:
            self._sock = socket.create_server(("127.0.0.1", self.port))
            self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def _close(self) -> None:
        self._cut_all()
        if self._server is not None:
            self._server.close()

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.mode == "stall":
            return  # hold the connection open and say nothing
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        muted = [False]  # this connection sent a big command while big replies are dropped
        await asyncio.gather(
            self._pump(reader, up_writer, muted, replies=False),
            self._pump(up_reader, writer, muted, replies=True),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, muted: list[bool], replies: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if not replies and self.mode == "drop_big_replies" and len(data) > BIG:
                    muted[0] = True
                if self.mode == "stall" or (replies and (self.mode == "drop_replies" or muted[0])):
                    continue
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
