"""Is this plausibly the recording? Cheap checks on a download (and on a stored copy).

A download host, proxy, captive portal or CDN can answer 200 with something that is not the
recording: an HTML or JSON error page, an S3 XML error, an empty body, a body cut off where no
Content-Length announced its size, a compressed body. These checks refuse such bodies with
:class:`~archiver.errors.WrongContent` (transient: a later attempt may get the real bytes) before
they are committed, and report them on stored copies (``verify --deep``, delete-at-source).

The engine calls, while streaming:

* :func:`check_headers` on the response's Content-Type and Content-Encoding;
* :func:`check_head` on the first :data:`HEAD_BYTES` bytes;
* :func:`max_plausible_size` once, to stop a body that grows past what the API announced, and
  :func:`check_size` on the final size.

:func:`check_copy` re-applies the head and size checks to a stored copy, and :func:`check_media`
asks ffprobe whether a copy parses as media and lasts as long as the API says.

Containers, recognised by their magic bytes only (a deep parse would refuse the project's
simulator, which serves a correct container header followed by pseudo-random bytes):

* **Ogg** (``OggS`` at 0): Opus audio, the codec of audio room recordings.
* **WebM/Matroska** (EBML ``1A 45 DF A3`` at 0): VP8 video and Opus audio as browsers and WebRTC
  recorders write them (``.webm``, ``.weba``, ``.mkv``, ``.mka``).
* **MP4/ISO-BMFF** (``ftyp`` at offset 4, any brand: ``isom``, ``mp42``, ``M4A ``, ``qt  ``,
  ``3gp6``, ...): H.264 video (and AAC or Opus audio), the format of video recordings and
  compositions; QuickTime and 3GP files are the same box structure.
* **WAV** (``RIFF``/``RF64``/``BW64`` at 0, ``WAVE`` at 8): PCM audio, the ``pcm`` codec.
* **MP3** (an ``ID3`` v2 tag, or an MPEG audio frame header): the ``mp3`` codec.
* **FLAC** (``fLaC`` at 0): lossless audio that some exports use.
* **AAC (ADTS)** (a 12-bit sync with layer 0): raw AAC, the ``aac`` codec outside MP4.
* **IVF** (``DKIF`` at 0): the plain container WebRTC stacks write raw VP8 frames into.

Left out on purpose: raw H.264 Annex B streams (the magic, ``00 00 00 01``, is too weak and the
stream has no duration to verify) and MPEG-TS (its sync is only recognisable across 188-byte
packets, far more than a small head).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum
from pathlib import Path

from archiver.errors import ConfigError, WrongContent

HEAD_BYTES = 64
"""Leading bytes :func:`sniff` and :func:`check_head` look at (they ignore any beyond)."""

SIZE_TOLERANCE_MB = Decimal("0.05")
"""The least slack around ``size_mb`` on either side (see :func:`size_bounds`)."""

FFPROBE_TIMEOUT = 120.0
"""Seconds ffprobe may take on one copy (it reads headers and indexes, not every frame)."""

_MB = 10**6
_MIB = 2**20


class Container(StrEnum):
    """A media container a recording can come in (see the module docstring for why each)."""

    OGG = "ogg"
    MATROSKA = "matroska"
    MP4 = "mp4"
    WAV = "wav"
    MP3 = "mp3"
    FLAC = "flac"
    AAC = "aac"
    IVF = "ivf"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Container.OGG: "Ogg",
    Container.MATROSKA: "WebM/Matroska",
    Container.MP4: "MP4",
    Container.WAV: "WAV",
    Container.MP3: "MP3",
    Container.FLAC: "FLAC",
    Container.AAC: "AAC (ADTS)",
    Container.IVF: "IVF",
}
KNOWN_CONTAINERS = ", ".join(_LABELS.values())

# ffprobe demuxers allowed to open a copy: ours only, so a hostile "recording" (an HLS playlist,
# a concat list) cannot make ffprobe open other files or the network.
_DEMUXERS = "ogg,matroska,mov,wav,mp3,flac,aac,ivf"


# ------------------------------------------------------------------------------------ headers


def check_headers(content_type: str | None, content_encoding: str | None) -> None:
    """Refuse a response whose headers say it is not a recording's own bytes.

    Any Content-Encoding other than ``identity`` is refused, not decoded: the archive must hold
    exactly the recording's bytes (the hash, the announced size and a ``Range`` resume all refer
    to the identity body, and a resumed range of a compressed body cannot be stitched). Content
    types that are text, HTML, JSON or XML (``text/*``, ``application/json``,
    ``application/xml``, ``application/xhtml+xml``, any ``+json`` or ``+xml``) and multipart
    bodies are refused. An absent type, ``application/octet-stream``, ``binary/octet-stream``,
    ``audio/*``, ``video/*`` and anything else pass: :func:`check_head` looks at the bytes.
    """
    if content_encoding is not None:
        codings = [c.strip().lower() for c in content_encoding.split(",")]
        foreign = [c for c in codings if c and c != "identity"]
        if foreign:
            shown = _clean(", ".join(foreign), 30)
            raise WrongContent(
                f"the download host sent a {shown}-encoded body (Content-Encoding: {shown}),"
                " not the recording's own bytes"
            )
    what = _type_kind(content_type)
    if what is not None:
        raise WrongContent(
            f"the download host sent {what} (Content-Type: {_clean(content_type or '', 60)}),"
            " not a recording"
        )


def _type_kind(content_type: str | None) -> str | None:
    """What a text-like content type announces (``an HTML page``), None for anything else."""
    if not content_type:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in ("text/html", "application/xhtml+xml"):
        return "an HTML page"
    if mime == "application/json" or mime.endswith("+json"):
        return "a JSON document"
    if mime in ("application/xml", "text/xml") or mime.endswith("+xml"):
        return "an XML document"
    if mime.startswith("text/"):
        return "a text body"
    if mime.startswith("multipart/"):
        return "a multipart body"
    return None


# --------------------------------------------------------------------------------------- head


def sniff(head: bytes) -> Container | None:
    """The container the leading bytes announce, by magic bytes alone; None if none does."""
    if head.startswith(b"OggS"):
        return Container.OGG
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Container.MATROSKA
    if head[4:8] == b"ftyp":
        return Container.MP4
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return Container.WAV
    if head.startswith(b"fLaC"):
        return Container.FLAC
    if head.startswith(b"DKIF"):
        return Container.IVF
    # ID3v2: version 2-4, then a revision byte that is never 0xFF.
    if head[:3] == b"ID3" and len(head) >= 5 and head[3] in (2, 3, 4) and head[4] != 0xFF:
        return Container.MP3
    if len(head) >= 4 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return _frame_sync(head)
    return None


def _frame_sync(head: bytes) -> Container | None:
    # 11 sync bits are set; the rest of the header must not use reserved values.
    version = (head[1] >> 3) & 0b11
    layer = (head[1] >> 1) & 0b11
    if layer == 0:
        # ADTS: 12 sync bits, layer 0, a sampling index below 13.
        return Container.AAC if version & 0b10 and (head[2] >> 2) & 0b1111 < 13 else None
    bitrate = head[2] >> 4
    rate = (head[2] >> 2) & 0b11
    if version == 0b01 or bitrate == 0b1111 or rate == 0b11:
        return None
    return Container.MP3


def check_head(head: bytes, *, content_type: str | None, size: int | None = None) -> Container:
    """The container of a download's first bytes, or :class:`WrongContent` saying what it is.

    ``head`` is the first :data:`HEAD_BYTES` bytes of the body (fewer only if the body is
    shorter); ``size`` is the body's full size when known (Content-Length), for the message.
    An empty head, text (HTML, JSON, XML, plain), a compressed or archive file and bytes that
    match no known container are refused.
    """
    container = sniff(head)
    if container is not None:
        return container
    if not head:
        raise WrongContent("the download host sent an empty body")
    details = [f"{size:,} bytes"] if size is not None else []
    if content_type:
        details.append(_clean(content_type, 60))
    details.append(_sample(head[:HEAD_BYTES]))
    what = _head_kind(head[:HEAD_BYTES])
    if what is None:
        raise WrongContent(
            "the download host sent a body that does not start like any media container"
            f" archiver knows ({KNOWN_CONTAINERS}): {', '.join(details)}"
        )
    raise WrongContent(f"the download host sent {what} ({', '.join(details)}), not a recording")


def _head_kind(head: bytes) -> str | None:
    """What a non-empty head that is no container looks like (``an HTML page``), or None."""
    for magic, what in _PACKED:
        if head.startswith(magic):
            return what
    if len(head) >= 2 and head[0] == 0x78 and head[1] in (0x01, 0x5E, 0x9C, 0xDA):
        return "a zlib-compressed body"
    text = _as_text(head.removeprefix(b"\xef\xbb\xbf"))  # a UTF-8 byte order mark
    if text is None:
        return None
    body = text.lstrip(" \t\r\n\f").lower()
    if body.startswith("<") and any(tag in body for tag in _HTML_TAGS):
        return "an HTML page"
    if body.startswith("<"):
        return "an XML document"
    if body.startswith(("{", "[")):
        return "a JSON document"
    return "a text body"


_PACKED = (
    (b"\x1f\x8b", "a gzip-compressed body"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed body"),
    (b"BZh", "a bzip2-compressed body"),
    (b"PK\x03\x04", "a ZIP archive"),
)
_HTML_TAGS = ("<!doctype html", "<html", "<head", "<body", "<title", "<meta", "<script")


def _as_text(head: bytes) -> str | None:
    """The head as text if it is UTF-8 made of printable characters and whitespace."""
    # A multi-byte character may be cut at the head's end: drop up to 3 trailing bytes.
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if all(ch.isprintable() or ch in "\t\r\n\f" for ch in text):
            return text
        return None
    return None


# URLs (with or without a scheme) never leave this module, even cut short inside an excerpt.
_URL = re.compile(r"(?i)[a-z][a-z0-9+.-]*://\S*|(?<![\w/])//\S+|\bwww\.\S+")


def _clean(value: str, limit: int) -> str:
    """``value`` with controls removed, whitespace collapsed, URLs hidden, at most ``limit``."""
    text = "".join(ch if ch.isprintable() else " " for ch in value)
    text = _URL.sub("<url>", " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sample(head: bytes) -> str:
    """A short, safe view of a head: the text it starts with, or its first bytes in hex."""
    if _as_text(head) is not None:
        return f"starting {_clean(head.decode('utf-8', errors='replace'), 40)!r}"
    return f"starting {head[:8].hex(' ')}"


# --------------------------------------------------------------------------------------- size


# Typed: 5 and 5.0 are told apart (they are rounded to different places).
@functools.lru_cache(maxsize=4096, typed=True)
def size_bounds(size_mb: float | None) -> tuple[int, int] | None:
    """The byte sizes, inclusive, that the API's ``size_mb`` can stand for; None if unusable.

    The API rounds ``size_mb`` (5.6; 0.0 for a 20 KB file; the simulator sends
    ``round(size / 1e6, 1)``) and does not say whether a MB is 10^6 or 2^20 bytes. The value
    shown is trusted to half a unit of its last decimal, read from the float's shortest repr
    (5.6 -> 0.05, 0.02 -> 0.005), but never less than :data:`SIZE_TOLERANCE_MB`; the lower
    bound takes 10^6-byte MB and the upper 2^20-byte MB, so either unit fits. Worst cases for
    5.6: a decimal API's smallest 5.6 is 5,550,000 bytes, the lower bound; a binary API's
    largest 5.6 is just under 5.65 MiB = 5,924,454.4 bytes, the upper bound 5,924,454. For 0.0
    the range is 0 to 52,428 bytes (0.05 MiB). Arithmetic is exact (decimal), so a size on a
    bound is never refused by a float's error.
    """
    if size_mb is None or isinstance(size_mb, bool) or not isinstance(size_mb, int | float):
        return None
    if not math.isfinite(size_mb) or size_mb < 0:
        return None
    shown = Decimal(size_mb) if isinstance(size_mb, int) else Decimal(repr(size_mb))
    exponent = shown.as_tuple().exponent
    assert isinstance(exponent, int)  # finite, checked above
    tolerance = max(Decimal(5).scaleb(exponent - 1), SIZE_TOLERANCE_MB)
    low = ((shown - tolerance) * _MB).to_integral_value(ROUND_CEILING)
    high = ((shown + tolerance) * _MIB).to_integral_value(ROUND_FLOOR)
    return max(0, int(low)), int(high)


def max_plausible_size(size_mb: float | None) -> int | None:
    """The most bytes a body may have for this ``size_mb``; None when it says nothing."""
    bounds = size_bounds(size_mb)
    return None if bounds is None else bounds[1]


# Without ``size_mb``, a body is bounded by what its duration could hold at a bitrate far above
# any room recording's (64 Mbit/s; 1080p video is a few), plus room for headers; without a
# duration either, by a hard cap. Only there to stop an endless body from filling the disk.
_MAX_BYTES_PER_SECOND = 8_000_000
_MAX_OVERHEAD = 64 * 1024 * 1024
HARD_CAP = 64 * 1024**3


def size_limit(size_mb: float | None, duration_secs: int | None) -> tuple[int, str]:
    """The most bytes a download may bring, and what says so (for the refusal's sentence)."""
    plausible = max_plausible_size(size_mb)
    if plausible is not None:
        return plausible, f"the API's size_mb {size_mb}"
    if isinstance(duration_secs, int) and duration_secs >= 0:
        limit = duration_secs * _MAX_BYTES_PER_SECOND + _MAX_OVERHEAD
        return limit, f"{duration_secs} s at 64 Mbit/s (no size_mb)"
    return HARD_CAP, "archiver's limit for a recording of unknown size and duration"


def check_size(size: int, size_mb: float | None) -> None:
    """Refuse an empty body, and a body whose size ``size_mb`` cannot stand for."""
    if size <= 0:
        raise WrongContent("the download host sent an empty body")
    problem = _size_problem(size, size_mb)
    if problem is not None:
        raise WrongContent(f"the download host sent {problem}")


def _size_problem(size: int, size_mb: float | None) -> str | None:
    bounds = size_bounds(size_mb)
    if bounds is None or bounds[0] <= size <= bounds[1]:
        return None
    low, high = bounds
    return f"{size:,} bytes, but the API's size_mb {size_mb!r} means {low:,} to {high:,} bytes"


def check_copy(head: bytes, size: int, *, size_mb: float | None) -> str | None:
    """What is wrong with a stored copy by the same checks as a download, or None.

    ``head`` is the copy's first :data:`HEAD_BYTES` bytes and ``size`` its size. A copy archived
    before these checks existed, or by a version with looser ones, is reported here.
    """
    if size <= 0 or not head:
        return "the stored copy is empty"
    if sniff(head) is None:
        what = _head_kind(head[:HEAD_BYTES])
        sample = _sample(head[:HEAD_BYTES])
        if what is None:
            return (
                "the stored copy does not start like any media container archiver knows"
                f" ({KNOWN_CONTAINERS}): {sample}"
            )
        return f"the stored copy is {what} ({size:,} bytes, {sample}), not a recording"
    problem = _size_problem(size, size_mb)
    return None if problem is None else f"the stored copy has {problem}"


# ------------------------------------------------------------------------------------ ffprobe


def ffprobe_path() -> str | None:
    """Where ffprobe is on PATH, or None."""
    return shutil.which("ffprobe")


async def check_media(
    source: Path | AsyncIterator[bytes],
    duration_secs: int | None,
    *,
    tolerance: float = 2.0,
    timeout: float = FFPROBE_TIMEOUT,  # noqa: ASYNC109 - ffprobe's own limit, not a cancel scope
    spool_dir: Path | None = None,
) -> str | None:
    """What ffprobe finds wrong with a copy, or None when it is media of the right length.

    The copy must parse as one of the known containers with an audio or video stream, and
    last (the format's duration, else its longest stream's) ``duration_secs`` within
    ``tolerance`` seconds; ``duration_secs`` None checks only that it parses. A byte iterator
    (an S3 object) is spooled to a private file first, in ``spool_dir`` or the system's temp
    directory, and removed afterwards: MP4 keeps its index at the end, so ffprobe must seek.
    Raises :class:`ConfigError` when ffprobe is not installed.
    """
    ffprobe = ffprobe_path()
    if ffprobe is None:
        raise ConfigError(
            "source.media_check is on but ffprobe is not on PATH (Debian package ffmpeg)"
        )
    if isinstance(source, Path):
        return await _probe(ffprobe, source, duration_secs, tolerance, timeout)
    spool = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="archiver-probe-", dir=spool_dir))
    try:
        copy = spool / "copy"
        await _spool(source, copy)
        return await _probe(ffprobe, copy, duration_secs, tolerance, timeout)
    finally:
        await asyncio.to_thread(shutil.rmtree, spool, ignore_errors=True)


async def _spool(source: AsyncIterator[bytes], path: Path) -> None:
    # mkdtemp made the directory 0700; the file is 0600 and must be new.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = await asyncio.to_thread(os.open, path, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        async for chunk in source:
            await asyncio.to_thread(out.write, chunk)


async def _probe(
    ffprobe: str, path: Path, duration_secs: int | None, tolerance: float, limit: float
) -> str | None:
    target = os.fspath(path)
    args = [
        *("-v", "error", "-protocol_whitelist", "file", "-format_whitelist", _DEMUXERS),
        *("-show_entries", "format=duration:stream=codec_type,duration", "-of", "json"),
        *("-i", f"file:{target}"),
    ]
    proc = await asyncio.create_subprocess_exec(
        ffprobe,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(limit):
            out, err = await proc.communicate()
    except TimeoutError:
        return f"ffprobe did not finish reading the copy within {limit:g} s"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        text = err.decode("utf-8", errors="replace").replace(f"file:{target}: ", "")
        lines = text.replace(target, "copy").splitlines()
        reason = _clean(lines[-1], 120) if lines else f"exit status {proc.returncode}"
        return f"ffprobe cannot read the copy as media: {reason}"
    return _judge(out, duration_secs, tolerance)


def _judge(out: bytes, duration_secs: int | None, tolerance: float) -> str | None:
    try:
        doc = json.loads(out)
    except ValueError:
        return "ffprobe gave output that is not JSON"
    streams = [s for s in doc.get("streams") or [] if s.get("codec_type") in ("audio", "video")]
    if not streams:
        return "ffprobe finds no audio or video stream in the copy"
    if duration_secs is None:
        return None
    lasts = _seconds((doc.get("format") or {}).get("duration"))
    if lasts is None:
        lengths = [d for d in (_seconds(s.get("duration")) for s in streams) if d is not None]
        lasts = max(lengths, default=None)
    if lasts is None:
        return "ffprobe cannot tell how long the copy lasts"
    if abs(lasts - duration_secs) > tolerance:
        return f"the copy lasts {lasts:.1f} s, but the API says {duration_secs} s"
    return None


def _seconds(value: object) -> float | None:
    if not isinstance(value, str | int | float):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # ffprobe writes "N/A" when it does not know
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
