"""Benchmark ``archiver backfill`` against aria2c and curl, and its ledger at scale.

One command (from the repository root)::

    .venv/bin/python bench/run.py [--quick] [--skip-s3] [--runs N] [--only SECTION,...]

Everything runs on loopback against the project's Telnyx simulator (no faults), started as a
separate process so that its CPU is not in the contenders' figures, serving content from a cache
with ``sendfile`` so that the simulator is not what is measured. Contenders run one at a time,
alternating (each round starts with the next one), and every figure is a median over the rounds.
Sections:

* throughput: ``archiver backfill`` vs ``aria2c -j 8 -i urls.txt`` vs 8 parallel
  ``curl -o FILE`` (the ceiling: no hashing, no fsync) vs 8 parallel ``curl -o /dev/null``
  (the network-only bound), on 500 x 4 MB and on 20 x 100 MB;
* memory: peak RSS of ``archiver backfill`` for one 1 GB recording, to local disk and to S3
  (SeaweedFS, started here);
* scale: a full pass and a no-op pass over 10,000 and 100,000 recordings of 1 KB, and the size
  of the ledger per 100,000 rows.

It prints a table and writes the raw figures to ``bench/results/<time>.json``. See
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
KEY = "bench-key-0123456789"
KEY_ENV = "BENCH_TELNYX_API_KEY"
MB = 1_000_000
GB = 1_000_000_000
CONCURRENCY = 8
S3_KEY, S3_SECRET, S3_BUCKET = "benchkey", "benchsecret", "bench"
# GNU time (Debian package "time") measures each contender's peak RSS; see run_measured.
TIME = shutil.which("time", path="/usr/bin:/bin")
# The archiver under test runs from here (``-m archiver.cli`` imports from the working
# directory); ``--archiver-src`` points it at another checkout to compare before and after.
ARCHIVER_SRC = ROOT
# ``--baseline``: a second archiver (another checkout) run as one more throughput contender, so
# that a change's before and after come from the same run.
BASELINE_SRC: Path | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    sets: tuple[tuple[int, int], ...]  # (count, size in bytes) per throughput set
    memory_size: int
    scale_counts: tuple[int, int]
    runs: int
    timeout: float  # seconds one contender run may take before it counts as hung
    # Full passes over the larger scale set (each takes minutes); its no-op pass still runs
    # ``runs`` times, over the ledger the last full pass left.
    large_full_runs: int = 1
    s3_sets: tuple[tuple[int, int], ...] = ()  # archiver vs rclone copyurl into SeaweedFS
    pg_count: int = 0  # small recordings for the PostgreSQL ledger section


FULL = Plan(
    "full",
    ((5_000, 1000), (2_000, 64_000), (500, 4 * MB), (20, 100 * MB)),
    GB,
    (10_000, 100_000),
    3,
    1800,
    s3_sets=((250, 4 * MB), (10, 100 * MB)),
    pg_count=10_000,
)
QUICK = Plan(
    "quick",
    ((40, 1000), (24, 256_000), (4, 4 * MB)),
    32 * MB,
    (200, 1_000),
    1,
    120,
    1,
    s3_sets=((8, 256_000), (2, 4 * MB)),
    pg_count=200,
)

# Acceptance targets (full mode), from issue 16.
TARGETS = {
    "ratio_aria2": 1.0,  # archiver / aria2c at every size...
    "ratio_aria2_4mb": 1.2,  # ...and at 4 MB
    "ratio_durable": 0.9,  # archiver / (curl -o FILE, then sync), at 4 MB and above
    "ratio_rclone": 1.0,  # archiver / rclone copyurl into the same S3 server
    "rss_mb": 64.0,
    "noop_100k_s": 10.0,
    "full_100k_s": 120.0,
    "cpu_ms_per_rec": 1.0,  # CPU (getrusage) of the 100,000 full pass per recording
    "api_per_rec": 1.05,  # list pages + retrieves per archived recording, 10,000 backlog
    "growth": 1.25,  # time per recording at 100k / at 10k; 1.0 is linear
}
# Below this size a curl process per file would measure process start-up, not the transfer:
# each curl gets a batch of files (on one kept-alive connection) instead.
CURL_BATCH_BELOW = MB


SECTIONS = ("throughput", "memory", "s3", "scale", "postgres")


class BenchError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- running and measuring a child process ---------------------------------------------------


@dataclass
class Measure:
    seconds: float
    cpu: float  # user + system seconds of the child and the children it waited for
    rss_mb: float  # peak resident set size of the child (or its largest descendant)

    @classmethod
    def median(cls, runs: list[Measure]) -> Measure:
        return cls(
            statistics.median(m.seconds for m in runs),
            statistics.median(m.cpu for m in runs),
            max(m.rss_mb for m in runs),
        )


def run_measured(
    cmd: list[str],
    *,
    log_path: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    stdin: Path | None = None,
    cwd: Path = ROOT,
) -> Measure:
    """Run ``cmd`` to completion and return its wall time, CPU time (wait4) and peak RSS.

    The peak RSS comes from GNU time's own child: Linux carries a process's ``ru_maxrss`` over
    ``execve``, so a child spawned straight from this (large) process would report at least this
    process's RSS, whatever its own."""
    rss_path = log_path.with_name(log_path.name + ".rss")
    if TIME is not None:
        cmd = [TIME, "-f", "%M", "-o", str(rss_path), *cmd]
    with (
        open(log_path, "ab") as out,
        open(stdin if stdin is not None else os.devnull, "rb") as inp,
    ):
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=inp, stdout=out, stderr=out, env=env, cwd=cwd, start_new_session=True
        )
        watchdog = threading.Timer(timeout, _kill_quietly, (proc.pid,))
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise BenchError(f"{cmd[0]} exited {proc.returncode} after {seconds:.1f}s:\n{tail}")
    peak_kb = usage.ru_maxrss
    if TIME is not None:
        peak_kb = int(rss_path.read_text().split()[-1])
        rss_path.unlink()
    return Measure(seconds, usage.ru_utime + usage.ru_stime, peak_kb / 1024)


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def clean(path: Path) -> None:
    """Remove a contender's output and push pending writeback out, so the next one starts even."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


# -- the simulator ---------------------------------------------------------------------------


class Simulator:
    """``python -m archiver.simulator`` in its own process, serving from a content cache."""

    def __init__(self, *, count: int, size: int, cache: Path, log_path: Path) -> None:
        self.count, self.size = count, size
        self._cmd = [
            PY,
            "-m",
            "archiver.simulator",
            "--count",
            str(count),
            "--size-min",
            str(size),
            "--size-max",
            str(size),
            "--api-key",
            KEY,
            "--url-ttl",
            str(2 * 24 * 3600),
            "--content-cache",
            str(cache),
        ]
        self._log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self.api = self.download = ""

    def __enter__(self) -> Simulator:
        log(f"starting the simulator: {self.count} x {self.size:,} bytes (content cache warm-up)")
        with open(self._log_path, "ab") as err:
            self._proc = subprocess.Popen(
                self._cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT
            )
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            name, _, value = line.partition(":")
            if name == "API base URL":
                self.api = value.strip()
            elif name == "Download host":
                self.download = value.strip()
            elif name == "Recordings":
                return self
        self.__exit__()
        raise BenchError(f"the simulator did not start; see {self._log_path}")

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def requests(self) -> dict[str, int]:
        """The simulator's request counters so far (list, retrieve, other, download)."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        proc.send_signal(signal.SIGUSR1)
        for line in proc.stdout:
            name, _, value = line.partition(":")
            if name == "Requests":
                return {k: int(v) for k, v in (f.split("=") for f in value.split())}
        raise BenchError(f"the simulator stopped; see {self._log_path}")

    def urls(self) -> list[str]:
        """Fresh signed download URLs (two days' TTL) for every recording, via the API."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        urls: list[str] = []
        page = 1
        while True:
            query = urllib.parse.urlencode({"page[size]": "250", "page[number]": str(page)})
            request = urllib.request.Request(
                f"{self.api}/room_recordings?{query}", headers={"Authorization": f"Bearer {KEY}"}
            )
            with opener.open(request, timeout=120) as resp:
                doc = json.load(resp)
            urls += [entry["download_url"] for entry in doc["data"]]
            if page >= doc["meta"]["total_pages"]:
                return urls
            page += 1


# -- contenders ------------------------------------------------------------------------------


def archiver_config(api: str, out: Path, storage: str = "", ledger: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f'backend = "local"\npath = "{out / "archive"}"'
    ledger = ledger or f'path = "{out / "ledger.db"}"'
    path = out / "archiver.toml"
    path.write_text(
        f"""[telnyx]
base_url = "{api}"
api_key_env = "{KEY_ENV}"

[storage]
{storage}

[ledger]
{ledger}

[workers]
concurrency = {CONCURRENCY}
"""
    )
    return path


def archiver_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ARCHIVER_CONFIG"}
    env[KEY_ENV] = KEY
    env.update(extra or {})
    return env


def run_archiver(
    api: str,
    out: Path,
    plan: Plan,
    *,
    storage: str = "",
    env: dict[str, str] | None = None,
    src: Path | None = None,
) -> Measure:
    config = archiver_config(api, out, storage)
    return run_measured(
        [PY, "-m", "archiver.cli", "--config", str(config), "backfill"],
        log_path=out / "archiver.log",
        timeout=plan.timeout,
        env=archiver_env(env),
        cwd=src or ARCHIVER_SRC,
    )


def check_archived(out: Path, count: int) -> None:
    text = (out / "archiver.log").read_text(errors="replace")
    if f"\n{count} archived (" not in f"\n{text}":
        raise BenchError(f"archiver did not report {count} archived:\n{text[-2000:]}")


def check_files(directory: Path, count: int, size: int, *, suffix_skip: str = ".json") -> None:
    found = [
        p
        for p in directory.rglob("*")
        if p.is_file() and not p.name.endswith(suffix_skip) and not p.name.startswith(".")
    ]
    wrong = [p for p in found if p.stat().st_size != size]
    if len(found) != count or wrong:
        raise BenchError(f"{directory}: {len(found)} files ({len(wrong)} of the wrong size)")


@dataclass
class Contender:
    name: str
    run: Callable[[Path], Measure]  # given an empty output directory


def throughput_contenders(sim: Simulator, work: Path, plan: Plan) -> list[Contender]:
    urls = sim.urls()
    if len(urls) != sim.count:
        raise BenchError(f"listed {len(urls)} URLs, expected {sim.count}")
    url_file = work / "urls.txt"
    url_file.write_text("".join(u + "\n" for u in urls))
    count, size = sim.count, sim.size

    def archiver(src: Path | None = None) -> Callable[[Path], Measure]:
        def run(out: Path) -> Measure:
            measure = run_archiver(sim.api, out, plan, src=src)
            check_archived(out, count)
            check_files(out / "archive", count, size)
            return measure

        return run

    def aria2(out: Path) -> Measure:
        out.mkdir(parents=True)
        measure = run_measured(
            ["aria2c", "-j", str(CONCURRENCY), "-i", str(url_file), "-d", str(out / "dl"), "-q"],
            log_path=out.with_suffix(".log"),
            timeout=plan.timeout,
        )
        check_files(out / "dl", count, size)
        return measure

    def curl(to_disk: bool, durable: bool = False) -> Callable[[Path], Measure]:
        def run(out: Path) -> Measure:
            (out / "dl").mkdir(parents=True)
            pairs = out / "pairs.txt"
            pairs.write_text(
                "".join(
                    f"-o {out / 'dl' / f'{i}.bin' if to_disk else os.devnull} {url}\n"
                    for i, url in enumerate(urls)
                )
            )
            batch = 1 if size >= CURL_BATCH_BELOW else max(1, count // (CONCURRENCY * 8))
            cmd = ["xargs", "-P", str(CONCURRENCY), "-n", str(3 * batch), "curl", "-sS", "--fail"]
            measure = run_measured(
                cmd, log_path=out.with_suffix(".log"), timeout=plan.timeout, stdin=pairs
            )
            if durable:
                # What the archiver's promise costs on top: every file fsync'd (coreutils sync).
                files = [str(p) for p in (out / "dl").iterdir()]
                synced = run_measured(
                    ["sync", *files], log_path=out.with_suffix(".log"), timeout=plan.timeout
                )
                measure = Measure(
                    measure.seconds + synced.seconds, measure.cpu + synced.cpu, measure.rss_mb
                )
            if to_disk:
                check_files(out / "dl", count, size)
            return measure

        return run

    baseline = (
        [Contender(f"archiver backfill ({BASELINE_SRC.name})", archiver(BASELINE_SRC))]
        if BASELINE_SRC is not None
        else []
    )
    return [
        Contender("archiver backfill", archiver()),
        Contender(f"aria2c -j {CONCURRENCY}", aria2),
        Contender(f"curl -o FILE x{CONCURRENCY} (ceiling)", curl(True)),
        Contender(f"curl -o /dev/null x{CONCURRENCY} (network)", curl(False)),
        Contender(f"curl -o FILE x{CONCURRENCY}, then sync", curl(True, durable=True)),
        *baseline,
    ]


def throughput(work: Path, plan: Plan, results: dict[str, Any]) -> None:
    for count, size in plan.sets:
        label = f"{count} x {human(size)}"
        total = count * size
        cache = work / "cache"
        with Simulator(count=count, size=size, cache=cache, log_path=work / "simulator.log") as sim:
            contenders = throughput_contenders(sim, work, plan)
            runs: dict[str, list[Measure]] = {c.name: [] for c in contenders}
            for round_ in range(plan.runs):
                shift = round_ % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    out = work / "out" / f"c{contenders.index(contender)}-{round_}"
                    clean(out)
                    log(f"{label}: round {round_ + 1}/{plan.runs}: {contender.name}")
                    measure = contender.run(out)
                    runs[contender.name].append(measure)
                    log(f"  {total / measure.seconds / MB:,.0f} MB/s, {measure.cpu:.2f} s CPU")
                    clean(out)
                    with contextlib.suppress(FileNotFoundError):
                        out.with_suffix(".log").unlink()
        results["throughput"].append(
            {
                "label": label,
                "count": count,
                "size": size,
                "bytes": total,
                "runs": {name: [asdict(m) for m in ms] for name, ms in runs.items()},
            }
        )


# -- memory ----------------------------------------------------------------------------------


@contextlib.contextmanager
def seaweedfs(work: Path) -> Iterator[str]:
    """``weed mini`` on loopback, by the launcher the tests use; yields the S3 endpoint URL."""
    sys.path.insert(0, str(ROOT))
    from tests.seaweedfs import WeedError, weed_mini

    run = work / "s3"
    try:
        with weed_mini(run, access_key=S3_KEY, secret_key=S3_SECRET) as endpoint:
            yield endpoint
    except WeedError as exc:
        raise BenchError(f"SeaweedFS: {exc}") from exc
    finally:
        shutil.rmtree(run, ignore_errors=True)


def s3_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


def make_bucket(endpoint: str) -> None:
    client = s3_client(endpoint)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def s3_unavailable() -> str | None:
    """Why the archiver under test cannot store to S3, if it cannot (an older checkout)."""
    probe = subprocess.run(
        [PY, "-c", "import archiver.storage.s3"],
        cwd=ARCHIVER_SRC,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"no S3 backend in this archiver ({last[:60]})"
    return None


def memory(work: Path, plan: Plan, results: dict[str, Any], *, skip_s3: bool) -> None:
    size = plan.memory_size
    with Simulator(
        count=1, size=size, cache=work / "cache", log_path=work / "simulator.log"
    ) as sim:
        runs: list[Measure] = []
        for round_ in range(plan.runs):
            out = work / "out" / f"memory-local-{round_}"
            clean(out)
            log(f"memory: one {human(size)} recording to local disk, round {round_ + 1}")
            runs.append(run_archiver(sim.api, out, plan))
            check_archived(out, 1)
            clean(out)
        results["memory"]["local"] = {"size": size, "runs": [asdict(m) for m in runs]}
        reason = "skipped (--skip-s3)" if skip_s3 else s3_unavailable()
        if reason is not None:
            results["memory"]["s3"] = {"size": size, "skipped": reason}
            return
        with seaweedfs(work) as endpoint:
            make_bucket(endpoint)
            storage = (
                f'backend = "s3"\n\n[storage.s3]\nbucket = "{S3_BUCKET}"\n'
                f'endpoint_url = "{endpoint}"\nregion = "us-east-1"\n'
            )
            s3_runs: list[Measure] = []
            for round_ in range(plan.runs):
                out = work / "out" / f"memory-s3-{round_}"
                clean(out)
                log(f"memory: one {human(size)} recording to S3, round {round_ + 1}")
                s3_runs.append(
                    run_archiver(
                        sim.api,
                        out,
                        plan,
                        storage=storage + f'prefix = "r{round_}/"\n',
                        env=s3_env(),
                    )
                )
                check_archived(out, 1)
                clean(out)
        results["memory"]["s3"] = {"size": size, "runs": [asdict(m) for m in s3_runs]}


# -- S3: archiver vs rclone copyurl into the same server ----------------------------------------


def rclone_env(endpoint: str) -> dict[str, str]:
    """An rclone remote ``bench:`` from the environment; without AWS_CA_BUNDLE, which these
    machines set and which breaks rclone's S3 remote even for plain-HTTP endpoints."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    prefix = "RCLONE_CONFIG_BENCH_"
    env.update(
        {
            prefix + "TYPE": "s3",
            prefix + "PROVIDER": "SeaweedFS",
            prefix + "ACCESS_KEY_ID": S3_KEY,
            prefix + "SECRET_ACCESS_KEY": S3_SECRET,
            prefix + "ENDPOINT": endpoint,
            prefix + "REGION": "us-east-1",
        }
    )
    return env


def s3_storage(endpoint: str, prefix: str) -> str:
    return (
        f'backend = "s3"\n\n[storage.s3]\nbucket = "{S3_BUCKET}"\n'
        f'endpoint_url = "{endpoint}"\nregion = "us-east-1"\nprefix = "{prefix}"\n'
    )


def s3_throughput(work: Path, plan: Plan, results: dict[str, Any], *, skip_s3: bool) -> None:
    """Each run into a SeaweedFS of its own (started outside the timing), so that no contender
    pays for another's data or deletions."""
    reason = "skipped (--skip-s3)" if skip_s3 else s3_unavailable()
    if reason is None and not shutil.which("rclone"):
        reason = "skipped: rclone (Debian package) not installed"
    if reason is not None:
        results["s3"] = {"skipped": reason}
        return
    results["s3"] = {"sets": []}
    for count, size in plan.s3_sets:
        label = f"{count} x {human(size)}"
        with Simulator(
            count=count, size=size, cache=work / "cache", log_path=work / "simulator.log"
        ) as sim:
            urls = sim.urls()
            runs: dict[str, list[Measure]] = {"archiver backfill": [], "rclone copyurl": []}
            for round_ in range(plan.runs):
                names = list(runs) if round_ % 2 == 0 else list(reversed(runs))
                for name in names:
                    out = work / "out" / f"s3-{size}-{round_}-{name.split()[0]}"
                    clean(out)
                    log(f"S3 {label}: round {round_ + 1}/{plan.runs}: {name}")
                    with seaweedfs(work) as endpoint:
                        make_bucket(endpoint)
                        os.sync()
                        if name == "archiver backfill":
                            measure = run_archiver(
                                sim.api, out, plan, storage=s3_storage(endpoint, "a/"), env=s3_env()
                            )
                            check_archived(out, count)
                        else:
                            out.mkdir(parents=True)
                            pairs = out / "pairs.txt"
                            pairs.write_text(
                                "".join(
                                    f"{u} bench:{S3_BUCKET}/r/{i}.bin\n" for i, u in enumerate(urls)
                                )
                            )
                            measure = run_measured(
                                ["xargs", "-P", str(CONCURRENCY), "-n", "2", "rclone", "copyurl",
                                 "--s3-no-check-bucket", "-q"],
                                log_path=out / "rclone.log",
                                timeout=plan.timeout,
                                env=rclone_env(endpoint),
                                stdin=pairs,
                            )  # fmt: skip
                            check_objects(endpoint, "r/", count, size)
                    runs[name].append(measure)
                    rate = count * size / measure.seconds / MB
                    log(f"  {rate:,.0f} MB/s, {measure.cpu:.2f} s CPU")
                    clean(out)
        results["s3"]["sets"].append(
            {
                "label": label,
                "count": count,
                "size": size,
                "bytes": count * size,
                "runs": {name: [asdict(m) for m in ms] for name, ms in runs.items()},
            }
        )


def check_objects(endpoint: str, prefix: str, count: int, size: int) -> None:
    client = s3_client(endpoint)
    sizes = [
        obj["Size"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=S3_BUCKET, Prefix=prefix
        )
        for obj in page.get("Contents", [])
    ]
    if len(sizes) != count or any(n != size for n in sizes):
        raise BenchError(f"S3 {prefix}: {len(sizes)} objects, expected {count} of {size:,} bytes")


# -- PostgreSQL ledger: one and three instances ---------------------------------------------

PG_USER = "postgres"


def pg_bindir() -> Path | None:
    # Debian keeps the server binaries off PATH, one directory per major version.
    candidates = [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    on_path = shutil.which("initdb")
    candidates += [Path(on_path).parent] if on_path else []
    return next(
        (c for c in candidates if all((c / t).is_file() for t in ("initdb", "pg_ctl", "psql"))),
        None,
    )


def ensure_postgres() -> Path | str:
    """The server's bin directory, installing Debian's postgresql-15 when root; or why not."""
    bindir = pg_bindir()
    if bindir is None and os.geteuid() == 0:
        log("installing postgresql-15")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql-15"], check=False, env=env)
        bindir = pg_bindir()
    return bindir if bindir is not None else "skipped: no PostgreSQL server (initdb) installed"


@contextlib.contextmanager
def postgres(bindir: Path) -> Iterator[Callable[[], str]]:
    """A throwaway cluster on loopback with the server's default durability (fsync on), as the
    postgres user when running as root; yields a function making a fresh database's URL."""
    # Not under ``work``, which may sit in a directory the postgres user cannot reach.
    run = Path(tempfile.mkdtemp(prefix="archiver-bench-pg-"))
    run.chmod(0o755)
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(run, PG_USER, PG_USER)

    def call(*args: str) -> None:
        cmd = [str(bindir / args[0]), *args[1:]]
        if as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise BenchError(f"{args[0]} failed: {done.stdout[-500:]} {done.stderr[-500:]}")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = run / "data"
    user = PG_USER if as_root else getpass.getuser()
    call("initdb", "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8")
    options = f"-p {port} -k {run} -c listen_addresses=127.0.0.1 -c max_connections=100"
    call(
        "pg_ctl", "-D", str(data), "-l", str(run / "log"), "-w", "-t", "30", "-o", options, "start"
    )
    made = 0

    def database() -> str:
        nonlocal made
        made += 1
        name = f"bench{made}"
        call("psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "postgres", "-qc",
             f"CREATE DATABASE {name}")  # fmt: skip
        return f"postgresql://{user}@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        with contextlib.suppress(BenchError):
            call("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(run, ignore_errors=True)


def run_instances(
    api: str, out: Path, plan: Plan, url: str, instances: int
) -> tuple[Measure, list[int]]:
    """``instances`` concurrent ``archiver run --once`` on one ledger and one archive: the wall
    time from the first start to the last exit, the CPU of them all, what each archived."""
    config = archiver_config(api, out, ledger=f'url = "{url}"')
    procs = []
    started = time.perf_counter()
    for i in range(instances):
        with open(out / f"archiver-{i}.log", "wb") as log_file:
            procs.append(
                subprocess.Popen(
                    [PY, "-m", "archiver.cli", "--config", str(config), "run", "--once"],
                    stdout=log_file,
                    stderr=log_file,
                    env=archiver_env(),
                    cwd=ARCHIVER_SRC,
                    start_new_session=True,
                )
            )
    cpu, rss = 0.0, 0.0
    watchdogs = [threading.Timer(plan.timeout, _kill_quietly, (p.pid,)) for p in procs]
    for w in watchdogs:
        w.start()
    try:
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            rss = max(rss, usage.ru_maxrss / 1024)
    finally:
        for w in watchdogs:
            w.cancel()
    seconds = time.perf_counter() - started
    archived = []
    for i, proc in enumerate(procs):
        text = (out / f"archiver-{i}.log").read_text(errors="replace")
        found = re.findall(r"\b(\d+) archived \(", text)  # "pass 1 ok in ...: N archived ("
        # 1: "still owed" at the end of its pass, which another instance was archiving then.
        if proc.returncode not in ((0, 1) if instances > 1 else (0,)) or not found:
            raise BenchError(f"instance {i} exited {proc.returncode}:\n{text[-2000:]}")
        archived.append(int(found[-1]))
    return Measure(seconds, cpu, rss), archived


def pg_ledger(work: Path, plan: Plan, results: dict[str, Any]) -> None:
    found = ensure_postgres()
    if isinstance(found, str):
        results["postgres"] = {"skipped": found}
        return
    n = plan.pg_count
    runs: dict[str, list[dict[str, Any]]] = {"1": [], "3": []}
    with (
        Simulator(count=n, size=1000, cache=work / "cache", log_path=work / "simulator.log") as sim,
        postgres(found) as database,
    ):
        for round_ in range(plan.runs):
            order = ("1", "3") if round_ % 2 == 0 else ("3", "1")
            for instances in order:
                out = work / "out" / f"pg-{instances}-{round_}"
                clean(out)
                log(
                    f"PostgreSQL: {instances} instance(s) over {n:,} recordings, round {round_ + 1}"
                )
                measure, archived = run_instances(sim.api, out, plan, database(), int(instances))
                if sum(archived) != n:
                    raise BenchError(f"{instances} instances archived {archived}, not {n} in all")
                log(f"  {n / measure.seconds:,.0f} recordings/s ({archived})")
                runs[instances].append({**asdict(measure), "archived": archived})
                clean(out)
    results["postgres"] = {"count": n, "runs": runs}


# -- scale -----------------------------------------------------------------------------------


def ledger_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("ledger.db*") if p.is_file())


def scale(work: Path, plan: Plan, results: dict[str, Any]) -> None:
    size = 1000
    small, large = plan.scale_counts
    with contextlib.ExitStack() as stack:
        sims = {
            n: stack.enter_context(
                Simulator(count=n, size=size, cache=work / "cache", log_path=work / "simulator.log")
            )
            for n in (small, large)
        }
        runs: dict[int, dict[str, list[Any]]] = {
            n: {"full": [], "noop": [], "ledger_bytes": [], "requests": []} for n in sims
        }
        full_runs = {small: plan.runs, large: min(plan.runs, plan.large_full_runs)}
        last: dict[int, Path] = {}
        for round_ in range(plan.runs):
            order = [small, large] if round_ % 2 == 0 else [large, small]
            for n in order:
                if round_ < full_runs[n]:
                    out = last[n] = work / "out" / f"scale-{n}-{round_}"
                    clean(out)
                    log(f"scale: full pass over {n:,} recordings of 1 KB, round {round_ + 1}")
                    before = sims[n].requests()
                    full = run_archiver(sims[n].api, out, plan)
                    after = sims[n].requests()
                    check_archived(out, n)
                    runs[n]["requests"].append({k: after[k] - before[k] for k in after})
                    log(f"  {full.seconds:.1f} s")
                    runs[n]["full"].append(asdict(full))
                    runs[n]["ledger_bytes"].append(ledger_bytes(out))
                # Kept until the section ends: ext4 skips inodes freed in the last ~30 s when it
                # allocates new ones, so deleting 200,000 files here would slow the next pass's
                # file creation, which no real archive (that only grows) pays for.
                out = last[n]
                (out / "archiver.log").unlink()
                log(f"scale: no-op pass over {n:,} archived recordings, round {round_ + 1}")
                noop = run_archiver(sims[n].api, out, plan)
                check_archived(out, 0)
                log(f"  {noop.seconds:.1f} s")
                runs[n]["noop"].append(asdict(noop))
        results["scale"] = {"size": size, "runs": {str(n): r for n, r in runs.items()}}
    clean(work / "out")


# -- report ----------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit, scale_ in (("GB", GB), ("MB", MB), ("KB", 1000)):
        if n >= scale_:
            value = n / scale_
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


@dataclass
class Table:
    lines: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.lines += ["", title]

    def row(self, *cells: str, widths: tuple[int, ...] = (40, 11, 15, 11, 13)) -> None:
        text = "".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        )
        self.lines.append("  " + text.rstrip())

    def target(self, label: str, value: str, target: str, ok: bool | None) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        if ok is not None:
            self.checks.append((label, ok))
        self.lines.append(f"  {label:<40}{value:>11}   {target:<22}{verdict}".rstrip())


def rate(mbps: float) -> str:
    return f"{mbps:,.0f}" if mbps >= 10 else f"{mbps:.1f}"


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[str, Any], plan: Plan) -> Table:
    full = plan.name == "full"
    t = Table()
    meta = results["meta"]
    t.lines.append(
        f"archiver benchmark: {plan.name} mode, medians of {plan.runs} run(s); "
        f"{meta['cpus']} CPUs, "
        f"load average {meta['load_before']:.2f} before, {meta.get('load_after', 0):.2f} after"
    )
    for entry in results.get("throughput", []):
        total = entry["bytes"]
        t.section(f"Throughput: {entry['label']} ({human(total)}), concurrency {CONCURRENCY}")
        widths = (40, 9, 15, 9, 10, 11, 8)
        t.row(
            "contender", "MB/s", "(min-max)", "rec/s", "CPU s/GB", "CPU ms/rec", "RSS MB",
            widths=widths,
        )  # fmt: skip
        rates: dict[str, float] = {}
        for name, runs in entry["runs"].items():
            mbps = [total / r["seconds"] / MB for r in runs]
            rates[name] = statistics.median(mbps)
            cpu = median_of(runs, "cpu")
            t.row(
                name,
                rate(rates[name]),
                f"({rate(min(mbps))}-{rate(max(mbps))})",
                f"{rates[name] * MB / entry['size']:,.0f}",
                f"{cpu / (total / GB):.2f}",
                f"{cpu / entry['count'] * 1000:.2f}",
                f"{max(r['rss_mb'] for r in runs):.0f}",
                widths=widths,
            )
        names = list(rates)
        archiver, aria2, ceiling = rates[names[0]], rates[names[1]], rates[names[2]]
        need = TARGETS["ratio_aria2_4mb" if entry["size"] == 4 * MB else "ratio_aria2"]
        ratio = archiver / aria2
        t.target("archiver / aria2c", f"{ratio:.2f}", f">= {need}", ratio >= need if full else None)
        ratio = archiver / ceiling
        t.target("archiver / ceiling (curl -o FILE)", f"{ratio:.2f}", "(no target)", None)
        if len(names) > 4:
            ratio = archiver / rates[names[4]]
            need = TARGETS["ratio_durable"]
            applies = entry["size"] >= 4 * MB
            t.target(
                "archiver / durable ceiling (then sync)",
                f"{ratio:.2f}",
                f">= {need}" if applies else "(no target below 4 MB)",
                ratio >= need if full and applies else None,
            )
        if len(names) > 5:
            ratio = archiver / rates[names[5]]
            t.target("archiver / baseline", f"{ratio:.2f}", f"({names[5]})", None)
    s3 = results.get("s3")
    if s3:
        t.section(
            f"S3: into SeaweedFS, archiver backfill vs rclone copyurl, concurrency {CONCURRENCY}"
        )
        if "skipped" in s3:
            t.target("archiver / rclone copyurl", "n/a", s3["skipped"], None)
        for entry in s3.get("sets", []):
            total = entry["bytes"]
            rates = {}
            for name, runs in entry["runs"].items():
                mbps = [total / r["seconds"] / MB for r in runs]
                rates[name] = statistics.median(mbps)
                t.row(
                    f"{name}, {entry['label']}",
                    f"{rates[name]:,.0f}",
                    f"({min(mbps):,.0f}-{max(mbps):,.0f})",
                    f"{median_of(runs, 'cpu') / (total / GB):.2f}",
                    f"{max(r['rss_mb'] for r in runs):.0f}",
                )
            ratio = rates["archiver backfill"] / rates["rclone copyurl"]
            need = TARGETS["ratio_rclone"]
            applies = entry["size"] >= 4 * MB
            t.target(
                f"archiver / rclone copyurl, {entry['label']}",
                f"{ratio:.2f}",
                f">= {need}" if applies else "(no target below 4 MB)",
                ratio >= need if full and applies else None,
            )
    mem = results.get("memory")
    if mem:
        t.section(f"Memory: peak RSS of archiver backfill, one {human(plan.memory_size)} recording")
        for where in ("local", "s3"):
            entry = mem.get(where)
            label = f"peak RSS, {'local disk' if where == 'local' else 'S3'}"
            if entry is None or "skipped" in entry:
                why = entry["skipped"] if entry else "not run"
                t.target(label, "n/a", why, None)
                continue
            rss = max(r["rss_mb"] for r in entry["runs"])
            t.target(
                label,
                f"{rss:.0f} MB",
                f"<= {TARGETS['rss_mb']:.0f} MB",
                rss <= TARGETS["rss_mb"] if full else None,
            )
    sc = results.get("scale")
    if sc:
        small, large = plan.scale_counts
        t.section(f"Scale: recordings of 1 KB, concurrency {CONCURRENCY}, SQLite ledger")
        t.row("pass", "seconds", "(min-max)", "rec/s", "ledger ops/s")
        per_rec: dict[tuple[str, int], float] = {}
        for kind, ops_per_rec in (("full", 3), ("noop", 1)):
            for n in (small, large):
                runs = sc["runs"][str(n)][kind]
                secs = [r["seconds"] for r in runs]
                med = statistics.median(secs)
                per_rec[(kind, n)] = med / n
                t.row(
                    f"{'full' if kind == 'full' else 'no-op'} pass, {n:,}"
                    + (f" ({len(runs)} run)" if len(runs) < plan.runs else ""),
                    f"{med:.1f}",
                    f"({min(secs):.1f}-{max(secs):.1f})",
                    f"{n / med:,.0f}",
                    f"{n * ops_per_rec / med:,.0f}",
                )
        for kind, limit in (("full", TARGETS["full_100k_s"]), ("noop", TARGETS["noop_100k_s"])):
            med = per_rec[(kind, large)] * large
            label = f"{'full' if kind == 'full' else 'no-op'} pass, {large:,}"
            t.target(
                f"{label} (seconds)",
                f"{med:.1f}",
                f"<= {limit:.0f} s",
                med <= limit if full else None,
            )
        for kind in ("full", "noop"):
            growth = per_rec[(kind, large)] / per_rec[(kind, small)]
            t.target(
                f"growth {small:,} -> {large:,}, {'full' if kind == 'full' else 'no-op'}",
                f"{growth:.2f}",
                f"<= {TARGETS['growth']} (1 = linear)",
                growth <= TARGETS["growth"] if full else None,
            )
        cpu = median_of(sc["runs"][str(large)]["full"], "cpu") / large * 1000
        need = TARGETS["cpu_ms_per_rec"]
        t.target(
            f"CPU per recording, full pass {large:,}",
            f"{cpu:.2f} ms",
            f"<= {need:.0f} ms (getrusage)",
            cpu <= need if full else None,
        )
        requests = sc["runs"][str(small)].get("requests", [])
        if requests:
            first = requests[0]
            per = (first["list"] + first["retrieve"]) / small
            need = TARGETS["api_per_rec"]
            t.target(
                f"API requests per recording, {small:,}",
                f"{per:.3f}",
                f"<= {need} ({first['list']} lists, {first['retrieve']} retrieves)",
                per <= need if full else None,
            )
        size = statistics.median(sc["runs"][str(large)]["ledger_bytes"])
        t.target("ledger size per 100,000 rows", f"{size / large * 100_000 / MB:.1f} MB", "", None)
    pg = results.get("postgres")
    if pg:
        t.section("PostgreSQL ledger: archiver run --once instances, recordings of 1 KB")
        if "skipped" in pg:
            t.target("recordings/s", "n/a", pg["skipped"], None)
        else:
            n = pg["count"]
            for instances, runs in pg["runs"].items():
                secs = [r["seconds"] for r in runs]
                med = statistics.median(secs)
                t.row(
                    f"{instances} instance(s), {n:,} recordings",
                    f"{med:.1f} s",
                    f"({min(secs):.1f}-{max(secs):.1f})",
                    f"{n / med:,.0f}/s",
                    f"{median_of(runs, 'cpu') / n * 1000:.2f} CPU ms",
                )
            t.target("PostgreSQL ledger (report only)", "", "(no target)", None)
    if not full:
        t.lines += ["", "quick mode: sizes are too small for the targets to apply"]
    elif t.checks:
        failed = [label for label, ok in t.checks if not ok]
        t.lines += [
            "",
            f"targets: {len(t.checks) - len(failed)} of {len(t.checks)} met"
            + (f"; not met: {', '.join(failed)}" if failed else ""),
        ]
    return t


# -- main ------------------------------------------------------------------------------------


def ensure_peers(sections: set[str], *, skip_s3: bool) -> None:
    global TIME
    peers = [("aria2c", "aria2"), ("curl", "curl"), ("/usr/bin/time", "time")]
    if "s3" in sections and not skip_s3:
        peers.append(("rclone", "rclone"))
    missing = [pkg for tool, pkg in peers if not shutil.which(tool)]
    if not missing:
        return
    if os.geteuid() != 0:
        if missing == ["rclone"]:
            return  # the S3 section says it is skipped, and why
        raise SystemExit(f"bench: install {' '.join(missing)} (Debian packages) first")
    log(f"installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    TIME = shutil.which("time", path="/usr/bin:/bin")


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "missing"
    return out.splitlines()[0] if out else "unknown"


def needed_space(plan: Plan, sections: set[str]) -> int:
    need = 2 * GB
    if "throughput" in sections:
        need += sum(c * s for c, s in plan.sets) + max(c * s for c, s in plan.sets)
    if "memory" in sections:
        need += 2 * plan.memory_size
    if "scale" in sections:
        need += plan.scale_counts[1] * 12_000 * 2
    if "s3" in sections:
        need += 2 * max(c * s for c, s in plan.s3_sets)
    return need


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--skip-s3", action="store_true", help="no S3 memory figure")
    parser.add_argument("--runs", type=int, help="rounds per contender (default 3, quick 1)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help="comma-separated sections to run"
    )
    parser.add_argument(
        "--large-full-runs",
        type=int,
        help="full passes over the larger scale set (default 1: each takes minutes)",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the JSON goes (default: bench/results)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: under results)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--archiver-src",
        type=Path,
        help="run the archiver from this checkout (e.g. an older commit, to compare)",
    )
    parser.add_argument(
        "--sizes",
        help="throughput sets of these recording sizes only (bytes, comma-separated)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run the archiver of this checkout in the throughput section (before/after)",
    )
    args = parser.parse_args(argv)
    global ARCHIVER_SRC, BASELINE_SRC
    if args.baseline is not None:
        BASELINE_SRC = args.baseline.resolve()
        if not (BASELINE_SRC / "archiver" / "cli.py").is_file():
            parser.error(f"{BASELINE_SRC} holds no archiver/cli.py")
    if args.archiver_src is not None:
        ARCHIVER_SRC = args.archiver_src.resolve()
        if not (ARCHIVER_SRC / "archiver" / "cli.py").is_file():
            parser.error(f"{ARCHIVER_SRC} holds no archiver/cli.py")
    plan = QUICK if args.quick else FULL
    if args.runs:
        plan = dataclasses.replace(plan, runs=args.runs)
    if args.large_full_runs:
        plan = dataclasses.replace(plan, large_full_runs=args.large_full_runs)
    if args.sizes:
        wanted = {int(n) for n in args.sizes.split(",")}
        plan = dataclasses.replace(plan, sets=tuple(s for s in plan.sets if s[1] in wanted))
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    ensure_peers(sections, skip_s3=args.skip_s3)
    results_dir: Path = args.results.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.workdir or results_dir / f"work-{stamp}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < needed_space(plan, sections):
        raise SystemExit(
            f"bench: {human(free)} free under {work}, {human(needed_space(plan, sections))} needed"
        )
    results: dict[str, Any] = {
        "meta": {
            "mode": plan.name,
            "runs": plan.runs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg()[0],
            "python": platform.python_version(),
            "aria2c": version(["aria2c", "--version"]),
            "curl": version(["curl", "--version"]),
            "sections": sorted(sections),
            "archiver_src": str(ARCHIVER_SRC.relative_to(ROOT))
            if ARCHIVER_SRC.is_relative_to(ROOT)
            else ARCHIVER_SRC.name,
        },
        "throughput": [],
        "memory": {},
    }
    started = time.monotonic()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("throughput", lambda: throughput(work, plan, results)),
        ("memory", lambda: memory(work, plan, results, skip_s3=args.skip_s3)),
        ("s3", lambda: s3_throughput(work, plan, results, skip_s3=args.skip_s3)),
        ("scale", lambda: scale(work, plan, results)),
        ("postgres", lambda: pg_ledger(work, plan, results)),
    ]
    errors: dict[str, str] = {}
    try:
        for name, step in steps:
            if name in sections:
                try:
                    step()
                except BenchError as exc:  # report the other sections all the same
                    log(f"{name} failed: {exc}")
                    errors[name] = str(exc)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["load_after"] = os.getloadavg()[0]
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["errors"] = errors
    table = report(results, plan)
    for name, error in errors.items():
        table.lines += ["", f"{name}: FAILED: {error.splitlines()[0]}"]
    results["table"] = table.lines
    out = results_dir / f"{stamp}-{plan.name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(table.lines))
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"\n(raw figures: {shown}; {results['meta']['seconds']:.0f} s in all)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
