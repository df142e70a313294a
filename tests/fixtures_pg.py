"""A throwaway PostgreSQL cluster (Debian's postgresql-15) for the tests that need one.

One cluster per test session, started on first use and stopped (``-m immediate``) at the end:
``initdb`` into a temp dir (as the ``postgres`` user when the tests run as root, which initdb
refuses), loopback TCP on a free port, its unix socket in the same dir, fsync off. TCP logins need
a password (``PG_PASSWORD``, also in ``cluster.password_file``), so the tests take the same
password path as production. Every test gets a database of its own (``pg_url``).

No PostgreSQL installed is a failure, not a skip: CI installs ``postgresql-15``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

PG_PASSWORD = "pg-test-" + secrets.token_hex(8)
PG_USER = "postgres"


def _find_bindir() -> Path:
    explicit = os.environ.get("ARCHIVER_TEST_PGBIN")
    candidates = [explicit] if explicit else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    # Debian keeps the server binaries off PATH, one directory per major version.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    pytest.fail(
        "PostgreSQL is not installed: no initdb found (looked in $ARCHIVER_TEST_PGBIN, PATH and "
        "/usr/lib/postgresql/*/bin). Install it: apt-get install -y postgresql-15",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One server: ``start``, ``restart`` (for outage tests), ``stop``, and fresh databases."""

    def __init__(self) -> None:
        self.bindir = _find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="archiver-pg-"))
        self.pgdir = self.root / "pg"
        self.data = self.pgdir / "data"
        self.log = self.pgdir / "log"
        self.password_file = self.root / "password"
        self.port = 0
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
                f"\n{log}"
            )

    def start(self) -> None:
        # The server runs as postgres: it must reach its directory (pytest's tmp is 0700).
        self.root.chmod(0o755)
        self.pgdir.mkdir()
        self.password_file.write_text(PG_PASSWORD + "\n")
        self.password_file.chmod(0o644)
        if self.as_root:
            shutil.chown(self.pgdir, PG_USER, PG_USER)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={self.password_file}",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        for _ in range(5):
            self.port = _free_port()
            try:
                self._pg_ctl("start")
                return
            except RuntimeError:
                if "could not bind" not in (self.log.read_text() if self.log.exists() else ""):
                    raise
        raise RuntimeError("PostgreSQL found no free port")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.pgdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
            "-o", options, *extra, action,
        )  # fmt: skip

    def restart(self) -> None:
        """Stop (terminating every session, as a real restart would) and start again."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url(), password=PG_PASSWORD)

    async def create_database(self) -> str:
        name = "test_" + secrets.token_hex(6)
        conn = await self.admin()
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        return name

    async def drop_database(self, name: str) -> None:
        conn = await self.admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    @asynccontextmanager
    async def database(self) -> AsyncIterator[str]:
        """A new, empty database for one test; its URL (no password in it)."""
        name = await self.create_database()
        try:
            yield self.url(name)
        finally:
            await self.drop_database(name)


_cluster: PgCluster | None = None


def cluster() -> PgCluster:
    """The session's cluster, started on first use (also by code that has no fixture access)."""
    global _cluster
    if _cluster is None:
        started = PgCluster()
        try:
            started.start()
        except BaseException:
            started.stop()
            raise
        _cluster = started
    return _cluster


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        _cluster = None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    yield cluster()


@pytest.fixture
async def pg_url(pg_cluster: PgCluster) -> AsyncIterator[str]:
    async with pg_cluster.database() as url:
        yield url
