"""A TCP proxy that misbehaves on purpose, for outage drills and fault tests.

Modes: ``pass`` (forward both ways), ``refuse`` (drop every connection and
refuse new ones), ``stall`` (accept, never answer), ``drop_replies`` (forward
commands to the server but throw its replies away: the ambiguous case where a
write is applied and the client never learns it), and ``drop_big_replies``
(the same, but only on a connection once it has sent a command over 16 KiB: a
replay batch loses its reply while small health probes still pass), and ``hold``
(keep what clients send, forward nothing and answer nothing, as a partition does;
``deliver_held()`` then hands the held bytes to the server and closes, as a
partition that heals does with the segments TCP kept retransmitting).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

MODES = ("pass", "refuse", "stall", "drop_replies", "drop_big_replies", "hold")
BIG = 16 * 1024  # larger than any probe or script load, smaller than a replay batch


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # per connection held in "hold" mode: the bytes the client sent, the upstream writer, and
        # an event set once the server has closed that connection (it ran all it was sent)
        self._held: list[tuple[bytearray, asyncio.StreamWriter, asyncio.Event]] = []
        self._ready = threading.Event()
        self._generation = 0  # connections of an earlier generation are silent for good (move_to)
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

    def move_to(self, upstream_host: str, upstream_port: int) -> None:
        """New connections go to another server (a virtual IP moved in a failover); the open ones fall
        silent for good, as connections to a host that is gone without a word do: what their clients
        send is dropped and nothing is answered, nothing is closed."""
        asyncio.run_coroutine_threadsafe(self._move_to((upstream_host, upstream_port)), self._loop).result(5)

    async def _move_to(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._generation += 1
        self.mode = "pass"

    def deliver_held(self) -> int:
        """Send what ``hold`` kept to the server, then close those connections; bytes delivered."""
        return asyncio.run_coroutine_threadsafe(self._deliver_held(), self._loop).result(10)

    def held_bytes(self) -> int:
        """Bytes kept so far in ``hold`` mode, not yet delivered."""
        return asyncio.run_coroutine_threadsafe(self._held_bytes(), self._loop).result(5)

    async def _held_bytes(self) -> int:
        return sum(len(data) for data, _, _ in self._held)

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
        self._delivered = asyncio.Event()
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

    async def _deliver_held(self) -> int:
        """Write each held request upstream, then end the connection; return once the server has run them."""
        delivered = 0
        held, self._held = self._held, []
        for data, up_writer, server_done in held:
            up_writer.write(bytes(data))
            delivered += len(data)
            with contextlib.suppress(ConnectionError, OSError):
                await up_writer.drain()
                up_writer.write_eof()  # after the data: the server runs the commands, then sees the end
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server_done.wait(), 10)
        self._delivered.set()
        self._delivered = asyncio.Event()
        return delivered

    async def _close(self) -> None:
        self._cut_all()
        if self._server is not None:
            self._server.close()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        _, stuck = await asyncio.wait(others, timeout=1) if others else (set(), set())
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)  # no connection handler outlives the proxy

    def _cut_all(self) -> None:
        """Drop every connection; requests held on them are lost, as they are when a partition never heals."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._held.clear()
        self._delivered.set()
        self._delivered = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # close() ends the connections it has not
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.mode == "stall":
            return  # hold the connection open and say nothing
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        generation = self._generation
        muted = [False]  # this connection sent a big command while big replies are dropped
        held = bytearray()
        server_done = asyncio.Event()

        async def replies() -> None:
            await self._pump(up_reader, writer, muted, replies=True, generation=generation)
            server_done.set()

        await asyncio.gather(
            self._pump(
                reader, up_writer, muted, replies=False, held=held, server_done=server_done, generation=generation
            ),
            replies(),
            return_exceptions=True,
        )
        while generation != self._generation and not writer.transport.is_closing():
            await asyncio.sleep(1)  # moved away from: the client's side stays open and silent
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        muted: list[bool],
        replies: bool,
        held: bytearray | None = None,
        server_done: asyncio.Event | None = None,
        generation: int | None = None,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if generation is not None and generation != self._generation:
                    continue  # a connection to the server moved away from: dropped, unanswered
                if not replies and self.mode == "drop_big_replies" and len(data) > BIG:
                    muted[0] = True
                if self.mode == "hold":
                    if held is not None and server_done is not None:  # a request: kept for later, or never
                        if not held:
                            self._held.append((held, writer, server_done))
                        held += data
                    continue
                if self.mode == "stall" or (replies and (self.mode == "drop_replies" or muted[0])):
                    continue
                if replies and writer.transport.is_closing():
                    continue  # the client left; read on until the server has answered everything
                writer.write(data)
                await writer.drain()
        if held:
            await self._delivered.wait()  # the client is gone; its held request is not, yet
            return
        if generation is not None and generation != self._generation:
            return  # moved away from: nothing is closed either (_serve keeps the client's side open)
        writer.transport.abort()
