"""archiver.media on real media made by ffmpeg here, and on the bodies hosts send instead."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from random import Random

import pytest

from archiver import media
from archiver.errors import ConfigError, WrongContent
from archiver.media import Container

AUDIO = ("-f", "lavfi", "-i", "sine=frequency=440:duration=3")
VIDEO = ("-f", "lavfi", "-i", "testsrc=duration=3:size=64x48:rate=10")
MISSING_FFMPEG = "ffmpeg/ffprobe are not on PATH: install the Debian package ffmpeg (CI does)"


@dataclass(frozen=True)
class Sample:
    """One small real file: ffmpeg input, encoder choices (first available wins), muxer args."""

    name: str
    source: tuple[str, ...]
    stream: str
    encoders: tuple[str, ...]
    container: Container
    extra: tuple[str, ...] = ()


SAMPLES = [
    Sample("opus.ogg", AUDIO, "-c:a", ("libopus",), Container.OGG),
    Sample("vp8.webm", VIDEO, "-c:v", ("libvpx",), Container.MATROSKA),
    Sample("vp9.webm", VIDEO, "-c:v", ("libvpx-vp9",), Container.MATROSKA),
    Sample("opus.weba", AUDIO, "-c:a", ("libopus",), Container.MATROSKA, ("-f", "webm")),
    Sample("h264.mkv", VIDEO, "-c:v", ("libx264", "mpeg4"), Container.MATROSKA),
    Sample("h264.mp4", VIDEO, "-c:v", ("libx264", "mpeg4"), Container.MP4),
    Sample("h264.mov", VIDEO, "-c:v", ("libx264", "mpeg4"), Container.MP4),
    Sample("aac.m4a", AUDIO, "-c:a", ("aac",), Container.MP4),
    Sample("pcm.wav", AUDIO, "-c:a", ("pcm_s16le",), Container.WAV),
    Sample("id3.mp3", AUDIO, "-c:a", ("libmp3lame", "libshine"), Container.MP3),
    Sample(
        "bare.mp3",
        AUDIO,
        "-c:a",
        ("libmp3lame",),
        Container.MP3,
        ("-id3v2_version", "0", "-write_xing", "0"),  # starts with a frame header, no tag
    ),
    Sample("flac.flac", AUDIO, "-c:a", ("flac",), Container.FLAC),
    Sample("adts.aac", AUDIO, "-c:a", ("aac",), Container.AAC, ("-f", "adts")),
    Sample("vp8.ivf", VIDEO, "-c:v", ("libvpx",), Container.IVF, ("-f", "ivf")),
]


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None or media.ffprobe_path() is None:
        pytest.fail(MISSING_FFMPEG)
    return path


@pytest.fixture(scope="session")
def encoders(ffmpeg: str) -> set[str]:
    out = subprocess.run(
        [ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True, check=True
    ).stdout
    # After a legend ending in " ------", lines look like " A....D libopus  libopus Opus".
    table = out.split(" ------\n", 1)[-1]
    return {line.split()[1] for line in table.splitlines() if len(line.split()) > 1}


@pytest.fixture(scope="session")
def make(
    ffmpeg: str, encoders: set[str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Sample], Path]:
    root = tmp_path_factory.mktemp("media")
    made: dict[str, Path] = {}

    def build(sample: Sample) -> Path:
        if sample.name in made:
            return made[sample.name]
        usable = [e for e in sample.encoders if e in encoders]
        if not usable:
            pytest.skip(f"this ffmpeg has no {' or '.join(sample.encoders)} encoder")
        out = root / sample.name
        pix = ("-pix_fmt", "yuv420p") if usable[0] == "libx264" else ()
        cmd = [ffmpeg, "-v", "error", "-y", *sample.source, sample.stream, usable[0], *pix]
        subprocess.run([*cmd, *sample.extra, str(out)], check=True, capture_output=True)
        made[sample.name] = out
        return out

    return build


@pytest.fixture
def png(ffmpeg: str, tmp_path: Path) -> Path:
    out = tmp_path / "x.png"
    image = ("-f", "lavfi", "-i", "color=size=8x8", "-frames:v", "1")
    subprocess.run([ffmpeg, "-v", "error", *image, str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def subtitles(ffmpeg: str, tmp_path: Path) -> Path:
    """A Matroska file that parses but holds only a subtitle track."""
    srt = tmp_path / "x.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:03,000\nhello\n")
    out = tmp_path / "subs.mkv"
    subprocess.run([ffmpeg, "-v", "error", "-i", str(srt), str(out)], check=True)
    return out


def head_of(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(media.HEAD_BYTES)


def entries(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def by_name(name: str) -> Sample:
    return next(s for s in SAMPLES if s.name == name)


def reason(call: Callable[[], object]) -> str:
    with pytest.raises(WrongContent) as info:
        call()
    return str(info.value)


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


# -- real media is accepted ------------------------------------------------------------------
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_real_media_is_recognised(sample: Sample, make: Callable[[Sample], Path]) -> None:
    data = make(sample).read_bytes()
    head = data[: media.HEAD_BYTES]
    assert media.sniff(head) == sample.container
    assert media.check_head(head, content_type=None) == sample.container
    assert media.check_copy(head, len(data), size_mb=round(len(data) / 1e6, 1)) is None
    # The simulator's way: a real container header followed by pseudo-random bytes.
    fake = data[:16] + Random(sample.name).randbytes(media.HEAD_BYTES - 16)
    assert media.check_head(fake, content_type="application/octet-stream") == sample.container


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
async def test_real_media_passes_ffprobe(sample: Sample, make: Callable[[Sample], Path]) -> None:
    assert await media.check_media(make(sample), 3) is None


def test_sniff_refuses_reserved_frame_headers() -> None:
    assert media.sniff(b"\xff\xfb\x90\x00") == Container.MP3  # MPEG-1 layer III, 128 kb/s
    assert media.sniff(b"\xff\xfb\xf0\x00") is None  # bitrate index 15 is reserved
    assert media.sniff(b"\xff\xfb\x9c\x00") is None  # sampling rate index 3 is reserved
    assert media.sniff(b"\xff\xeb\x90\x00") is None  # MPEG version 01 is reserved
    assert media.sniff(b"\xff\xf1\x50\x80") == Container.AAC  # ADTS, 44.1 kHz
    assert media.sniff(b"\xff\xe1\x50\x80") is None  # layer 0 without the 12th sync bit
    assert media.sniff(b"\xff\xf1\x3c\x80") is None  # ADTS sampling index 15
    assert media.sniff(b"ID3\xff\x00") is None
    assert media.sniff(b"RIFF\x00\x00\x00\x00AVI ") is None  # RIFF, but a video for Windows
    assert media.sniff(b"RIFF\x00\x00\x00\x00WEBP") is None  # RIFF, but an image
    assert media.sniff(b"") is None


# -- what hosts send instead ------------------------------------------------------------------
HTML_81 = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Wi-Fi</body></html>"
assert len(HTML_81) == 81
S3_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>"
)
JSON_ERROR = b'{"errors":[{"code":"10015","title":"Bad Request","detail":"no such recording"}]}'


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (HTML_81, "text/html", "the download host sent an HTML page (81 bytes, text/html,"),
        (b"\xef\xbb\xbf\n  <html><body>captive</body></html>", None, "an HTML page"),
        (b'<?xml version="1.0"?><!DOCTYPE html><html>', None, "an HTML page"),
        (JSON_ERROR, "application/json", "a JSON document"),
        (b'[{"id": 1}]', None, "a JSON document"),
        (S3_ERROR, "application/xml", "an XML document"),
        (b"Service Unavailable\r\n", None, "a text body"),
        (b"caf\xc3\xa9 ferm\xc3", None, "a text body"),  # cut inside a character
        (b"", "audio/ogg", "the download host sent an empty body"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", "audio/ogg", "a gzip-compressed body"),
        (b"\x28\xb5\x2f\xfd\x04\x58", None, "a zstd-compressed body"),
        (b"PK\x03\x04\x14\x00", None, "a ZIP archive"),
        (
            bytes(range(200, 256)),
            "audio/ogg",
            "does not start like any media container archiver knows (Ogg, WebM/Matroska, MP4,",
        ),
    ],
)
def test_check_head_says_what_was_sent(
    body: bytes, content_type: str | None, expected: str
) -> None:
    message = reason(lambda: media.check_head(body, content_type=content_type, size=len(body)))
    assert expected in message
    assert body or message == expected
    assert "\n" not in message and message.count(". ") == 0


def test_gzip_of_a_real_recording_is_refused(make: Callable[[Sample], Path]) -> None:
    packed = gzip.compress(make(by_name("opus.ogg")).read_bytes())
    assert media.sniff(packed[: media.HEAD_BYTES]) is None
    message = reason(lambda: media.check_head(packed[:64], content_type="audio/ogg"))
    assert "gzip-compressed" in message


def excerpt(message: str) -> str:
    return message.split("starting '", 1)[1].split("'", 1)[0]


def test_body_excerpts_are_short_and_never_show_a_url() -> None:
    for page in (
        b'<html><a href="https://portal.example/login?t=SECRET">',
        b"<html>" + b"z" * 30 + b"https://portal.example/login?t=SECRET",  # at the cut
    ):
        message = reason(partial(media.check_head, page, content_type="text/html"))
        assert "portal" not in message and "SECRET" not in message and "://" not in message
        assert "<url>" in excerpt(message)
    for body in (b"x" * 200, b"<html>" + b"y" * 200):
        message = reason(partial(media.check_head, body, content_type=None))
        assert len(excerpt(message)) <= 40 and excerpt(message).endswith("…")
    binary = reason(lambda: media.check_head(b"a\x00b" * 30, content_type=None))
    assert "\x00" not in binary and binary.endswith("starting 61 00 62 61 00 62 61 00")
    schemeless = b"see //cdn.example/a?sig=TOKEN and www.example.com/p?k=v"
    message = reason(lambda: media.check_head(schemeless, content_type="text/plain\r\nX: y"))
    assert "TOKEN" not in message and "www.example" not in message and "\r" not in message


def test_only_the_head_is_read() -> None:
    # Text beyond the head cannot turn a media head into text, nor cost time.
    head = b"OggS" + b"\x00" * 60
    assert media.check_head(head + b"<html>" * 100_000, content_type=None) == Container.OGG


# -- headers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "zstd", "identity, gzip", "GZIP"])
def test_check_headers_refuses_encoded_bodies(encoding: str) -> None:
    message = reason(lambda: media.check_headers("audio/ogg", encoding))
    assert "Content-Encoding" in message and encoding.split(", ")[-1].lower() in message


@pytest.mark.parametrize(
    ("content_type", "what"),
    [
        ("text/html", "an HTML page"),
        ("TEXT/HTML; charset=utf-8", "an HTML page"),
        ("application/xhtml+xml", "an HTML page"),
        ("application/json", "a JSON document"),
        ("application/problem+json", "a JSON document"),
        ("application/xml", "an XML document"),
        ("text/xml", "an XML document"),
        ("image/svg+xml", "an XML document"),
        ("text/plain", "a text body"),
        ("text/csv", "a text body"),
        ("multipart/byteranges; boundary=x", "a multipart body"),
    ],
)
def test_check_headers_refuses_text_types(content_type: str, what: str) -> None:
    message = reason(lambda: media.check_headers(content_type, None))
    assert message.startswith(f"the download host sent {what} (Content-Type: ")
    assert message.endswith(", not a recording")


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "audio/ogg",
        "audio/ogg; codecs=opus",
        "audio/webm",
        "video/mp4",
        "video/webm",
        "application/octet-stream",
        "binary/octet-stream",
    ],
)
@pytest.mark.parametrize("encoding", [None, "", "identity", "Identity"])
def test_check_headers_accepts_media_types(content_type: str | None, encoding: str | None) -> None:
    media.check_headers(content_type, encoding)


# -- size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size_mb", "bounds"),
    [
        (5.6, (5_550_000, 5_924_454)),  # 5.55e6 .. floor(5.65 MiB)
        (0.0, (0, 52_428)),  # a 20 KB file: up to 0.05 MiB
        (0.02, (0, 73_400)),  # two decimals: still at least 0.05 MB of slack
        (0.25, (200_000, 314_572)),
        (120.0, (119_950_000, 125_881_548)),
        (5, (4_500_000, 5_767_168)),  # an integer is rounded to units
        (5.625, (5_575_000, 5_950_668)),  # three decimals: the 0.05 MB floor applies
    ],
)
def test_size_bounds(size_mb: float, bounds: tuple[int, int]) -> None:
    assert media.size_bounds(size_mb) == bounds
    assert media.max_plausible_size(size_mb) == bounds[1]


@pytest.mark.parametrize("size_mb", [None, math.nan, math.inf, -math.inf, -0.1, True, "5.6"])
def test_size_bounds_of_unusable_values(size_mb: object) -> None:
    assert media.size_bounds(size_mb) is None  # type: ignore[arg-type]
    assert media.max_plausible_size(size_mb) is None  # type: ignore[arg-type]
    media.check_size(123, size_mb)  # type: ignore[arg-type]


def test_size_bounds_worst_cases_at_both_ends() -> None:
    # Every value shown to 0.1 up to 300 MB: the bounds are the extreme byte counts within half a
    # unit, the lower one in 10^6-byte MB and the upper one in 2^20-byte MB; one byte further is
    # outside in both units.
    half = Fraction(1, 20)
    for tenths in range(3001):
        shown = Fraction(tenths, 10)
        low, high = media.size_bounds(tenths / 10) or (-1, -1)
        assert Fraction(high, 2**20) <= shown + half < Fraction(high + 1, 2**20)
        assert Fraction(high + 1, 10**6) > shown + half
        if low > 0:
            assert Fraction(low - 1, 10**6) < shown - half <= Fraction(low, 10**6)
        else:
            assert low == 0 and shown <= half


def test_check_size_accepts_every_size_the_simulator_or_a_binary_api_would_round() -> None:
    rng = Random(5)
    for _ in range(5000):
        size = int(10 ** rng.uniform(0, 9.5))
        media.check_size(size, round(size / 1e6, 1))
        media.check_size(size, round(size / 2**20, 1))
        media.check_size(size, round(size / 1e6, 2))


def test_check_size_refuses_half_a_body_an_empty_one_and_a_runaway() -> None:
    message = reason(lambda: media.check_size(2_800_000, 5.6))
    assert message == (
        "the download host sent 2,800,000 bytes, but the API's size_mb 5.6 means"
        " 5,550,000 to 5,924,454 bytes"
    )
    assert "6,000,000 bytes" in reason(lambda: media.check_size(6_000_000, 5.6))
    assert "20,000,000" in reason(lambda: media.check_size(20_000_000, 0.0))
    for size_mb in (None, 0.0, 5.6):
        empty = reason(partial(media.check_size, 0, size_mb))
        assert empty == "the download host sent an empty body"
    media.check_size(20_000, 0.0)
    media.check_size(1, None)
    media.check_size(10**12, None)


# -- stored copies -------------------------------------------------------------------------------
def test_check_copy_reports_what_an_older_version_may_have_stored(
    make: Callable[[Sample], Path],
) -> None:
    data = make(by_name("opus.ogg")).read_bytes()
    size_mb = round(len(data) * 40 / 1e6, 1)  # the API says 40 times more than we hold
    assert media.check_copy(data[:64], len(data) * 40, size_mb=size_mb) is None
    cut = media.check_copy(data[:64], len(data), size_mb=size_mb)
    assert cut is not None and cut.startswith(f"the stored copy has {len(data):,} bytes, but")
    assert media.check_copy(data[:64], len(data), size_mb=None) is None
    page = media.check_copy(HTML_81[:64], 81, size_mb=0.0)
    assert page is not None and page.startswith("the stored copy is an HTML page (81 bytes,")
    assert media.check_copy(b"", 0, size_mb=0.0) == "the stored copy is empty"
    assert media.check_copy(data[:64], 0, size_mb=None) == "the stored copy is empty"
    odd = media.check_copy(bytes(range(64)), 64, size_mb=0.0)
    assert odd is not None and "does not start like any media container" in odd


# -- ffprobe -------------------------------------------------------------------------------------
async def test_check_media_on_a_path(make: Callable[[Sample], Path], tmp_path: Path) -> None:
    ogg = make(by_name("opus.ogg"))
    assert await media.check_media(ogg, 3) is None
    assert await media.check_media(ogg, 5) is None  # within 2 s
    assert await media.check_media(ogg, None) is None
    longer = await media.check_media(ogg, 10)
    assert longer == "the copy lasts 3.0 s, but the API says 10 s"
    assert await media.check_media(ogg, 6) is not None
    assert await media.check_media(ogg, 10, tolerance=8.0) is None

    noise = tmp_path / "noise.ogg"
    noise.write_bytes(b"OggS" + Random(1).randbytes(50_000))
    assert media.sniff(head_of(noise)) == Container.OGG  # the cheap check lets it by
    problem = await media.check_media(noise, 3)
    assert problem is not None and problem.startswith("ffprobe cannot read the copy as media: ")
    assert str(tmp_path) not in problem and "file:" not in problem
    assert await media.check_media(noise, None) is not None


async def test_check_media_refuses_formats_it_does_not_know(
    png: Path, make: Callable[[Sample], Path], tmp_path: Path
) -> None:
    # Without the demuxer list each of these would pass: ffprobe would follow a concat list to
    # the recording it names, and read a PNG as a one-frame video.
    ogg = make(by_name("opus.ogg"))
    playlist = tmp_path / "list.txt"
    playlist.write_text(f"ffconcat version 1.0\nfile '{ogg}'\n")
    problem = await media.check_media(playlist, 3)
    assert problem is not None and problem.startswith("ffprobe cannot read the copy as media")
    assert await media.check_media(png, None) is not None


async def test_check_media_wants_an_audio_or_video_stream(subtitles: Path) -> None:
    assert media.sniff(head_of(subtitles)) == Container.MATROSKA
    problem = await media.check_media(subtitles, None)
    assert problem == "ffprobe finds no audio or video stream in the copy"


@pytest.mark.parametrize(
    ("fmt", "streams", "problem"),
    [
        ("N/A", ["3.0", "9.5"], None),  # no format duration: the longest stream's
        (None, ["9.5", "N/A"], None),
        ("N/A", ["3.0", "4.0"], "the copy lasts 4.0 s, but the API says 10 s"),
        ("N/A", ["N/A", None], "ffprobe cannot tell how long the copy lasts"),
        ("10.4", ["1.0"], None),  # the format's duration wins when there is one
    ],
)
def test_duration_read_from_ffprobe_output(
    fmt: str | None, streams: list[str | None], problem: str | None
) -> None:
    # ffprobe's JSON shape for -show_entries format=duration:stream=codec_type,duration.
    doc = {
        "streams": [{"codec_type": "audio", "duration": d} for d in streams],
        "format": {} if fmt is None else {"duration": fmt},
    }
    assert media._judge(json.dumps(doc).encode(), 10, 2.0) == problem
    assert media._judge(b"not json", 10, 2.0) == "ffprobe gave output that is not JSON"


async def test_check_media_spools_an_iterator_privately_and_removes_it(
    make: Callable[[Sample], Path], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    seen: list[int] = []

    async def watched(data: bytes) -> AsyncIterator[bytes]:
        async for chunk in chunks(data, 4096):
            yield chunk
            # Resumed only after the chunk was written: look at the spool file ffprobe will read.
            seen.extend(stat.S_IMODE(path.stat().st_mode) for path in spool.rglob("*"))

    # An MP4 with its index at the end (ffmpeg's default): ffprobe must seek, so no pipe.
    mp4 = make(by_name("h264.mp4")).read_bytes()
    assert mp4.find(b"moov") > mp4.find(b"mdat")
    assert await media.check_media(watched(mp4), 3, spool_dir=spool) is None
    assert sorted(set(seen)) == [0o600, 0o700]  # the file and its directory, every time
    assert entries(spool) == []

    ogg = make(by_name("opus.ogg")).read_bytes()
    assert await media.check_media(chunks(ogg), 3, spool_dir=spool) is None
    assert await media.check_media(chunks(ogg), 10, spool_dir=spool) is not None
    noise = b"OggS" + Random(2).randbytes(30_000)
    assert await media.check_media(chunks(noise), 3, spool_dir=spool) is not None
    assert entries(spool) == []


async def test_check_media_removes_the_spool_when_the_source_fails(tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"OggS" + b"\x00" * 100
        raise OSError("the archive went away")

    with pytest.raises(OSError, match="went away"):
        await media.check_media(broken(), 3, spool_dir=tmp_path)
    assert entries(tmp_path) == []


async def test_check_media_gives_up_after_its_timeout(make: Callable[[Sample], Path]) -> None:
    problem = await media.check_media(make(by_name("opus.ogg")), 3, timeout=0.0)
    assert problem == "ffprobe did not finish reading the copy within 0 s"


async def test_check_media_without_ffprobe_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", os.fspath(tmp_path))
    assert media.ffprobe_path() is None
    with pytest.raises(ConfigError) as info:
        await media.check_media(tmp_path / "x.ogg", 3)
    assert info.value.problems == [
        "source.media_check is on but ffprobe is not on PATH (Debian package ffmpeg)"
    ]
