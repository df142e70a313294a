"""Real network stand-ins between archiver and a real server, on loopback, for what a server alone
cannot show: how many bytes a source sent (``ByteRelay``, TCP), and an S3 store whose bytes or
answers are damaged on the way or that reports no checksum (``S3Relay``, HTTP).

Nothing here is a mock: every request reaches the real server and every answer comes from it; the
relays only count, cut or change bytes on the wire, as a network or another store's dialect does.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

_CHUNK = 256 * 1024


class ByteRelay:
    """A TCP relay to ``host:port`` counting the bytes the server sends through it; ``when``
    runs an action once those reach a threshold (a SIGKILL at half a download, say)."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.sent = 0
        self._triggers: list[tuple[int, Callable[[], None]]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def when(self, threshold: int, action: Callable[[], None]) -> None:
        self._triggers.append((threshold, action))

    def reset(self) -> None:
        self.sent = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, count=False), self._pipe(up_reader, writer, count=True)
        )

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, count: bool
    ) -> None:
        try:
            while data := await src.read(_CHUNK):
                if count:
                    self.sent += len(data)
                    for trigger in [t for t in self._triggers if self.sent >= t[0]]:
                        self._triggers.remove(trigger)
                        trigger[1]()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
)
_CHECKSUM_HEADERS = ("x-amz-checksum-sha256", "x-amz-checksum-type")
_CHECKSUM_XML = re.compile(rb"<Checksum(SHA256|Type)>[^<]*</Checksum(SHA256|Type)>")


@dataclass
class S3Relay:
    """An HTTP relay in front of a real S3 server. SigV4 signatures survive it: the Host header,
    the path and the signed headers pass unchanged.

    - ``damage_uploads``: the next that many PUTs carrying a body (PutObject, UploadPart) have one
      byte of their body flipped on the way to the server;
    - ``cut_uploads``: the next that many have their body cut in half, the connection then closed;
    - ``damage_checksums``: the next that many answers to CompleteMultipartUpload or HeadObject
      that carry a SHA-256 checksum get another one (a store whose checksum disagrees with the
      parts it was sent; ``damage_answers_to`` narrows them, as ``("POST",)``: completions only);
    - ``strip_checksums``: every answer loses its checksums (a store that reports none);
    - ``fail_heads``: the next that many HeadObject requests get a 503 from the relay itself.
    """

    upstream: str
    damage_uploads: int = 0
    cut_uploads: int = 0
    damage_checksums: int = 0
    damage_answers_to: tuple[str, ...] = ("POST", "HEAD")
    strip_checksums: bool = False
    fail_heads: int = 0
    damaged: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    url: str = ""

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120)
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if request.method == "HEAD" and self.fail_heads > 0 and request.path.count("/") > 1:
            self.fail_heads -= 1
            self.damaged.append(f"503 {request.path_qs}")
            return web.Response(status=503)
        uploads = request.method == "PUT" and len(body) > 1024
        if uploads and self.cut_uploads > 0:
            self.cut_uploads -= 1
            self.damaged.append(f"cut {request.path_qs}")
            return await self._cut(request, headers, body)
        if uploads and self.damage_uploads > 0:
            self.damage_uploads -= 1
            self.damaged.append(f"flipped {request.path_qs}")
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=io.BytesIO(body) if body else None,
            allow_redirects=False,
            skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent"),
        ) as answer:
            data = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            out.pop("Content-Length", None)
            completes = request.method in self.damage_answers_to and (
                request.method == "HEAD" or "uploadId" in request.query
            )
            data, out = self._rewrite(data, out, completes=completes)
            resp = web.StreamResponse(status=answer.status, headers=out)
            if request.method == "HEAD":
                resp.content_length = int(answer.headers.get("Content-Length", "0"))
            else:
                resp.content_length = len(data)
            await resp.prepare(request)
            if request.method != "HEAD":
                await resp.write(data)
            await resp.write_eof()
            return resp

    def _rewrite(
        self, data: bytes, headers: dict[str, str], *, completes: bool
    ) -> tuple[bytes, dict[str, str]]:
        if self.strip_checksums:
            for name in list(headers):
                if name.lower() in _CHECKSUM_HEADERS:
                    del headers[name]
            data = _CHECKSUM_XML.sub(b"", data)
            return data, headers
        if self.damage_checksums > 0 and completes:
            damaged = False
            for name in list(headers):
                if name.lower() == "x-amz-checksum-sha256":
                    headers[name] = _other(headers[name])
                    damaged = True
            match = re.search(rb"<ChecksumSHA256>([^<]*)</ChecksumSHA256>", data)
            if match:
                wrong = _other(match.group(1).decode()).encode()
                data = data[: match.start(1)] + wrong + data[match.end(1) :]
                damaged = True
            if damaged:
                self.damage_checksums -= 1
                self.damaged.append("checksum")
        return data, headers

    async def _cut(
        self, request: web.Request, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        """Send the head of the request and half its body to the server, then hang up on both."""
        host, _, port = self.upstream.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port or 80))
        lines = [f"{request.method} {request.path_qs} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"]
        lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body[: len(body) // 2])
        await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        del reader
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=500)


def _other(checksum: str) -> str:
    """Another checksum of the same shape (its first character changed)."""
    first = "A" if checksum[:1] != "A" else "B"
    return first + checksum[1:]
