"""``archiver demo``: the whole engine against the bundled API simulator, on local disk.

A few hundred simulated recordings, with the faults a real account shows now and then (throttled
and failing list calls, truncated downloads, expired links), archived into ``./demo-archive``
and verified. Run it twice: the second run downloads nothing.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from archiver.commands import print_backfill
from archiver.config import load_settings
from archiver.filters import Filters
from archiver.progress import human_bytes, make_progress
from archiver.service import backfill, install_stop_signals, make_engine, open_services
from archiver.simulator import Faults, Simulator, make_recordings
from archiver.verify import verify_archive

KEY_ENV = "ARCHIVER_DEMO_KEY"


async def run_demo(*, count: int, directory: Path) -> int:
    key = "demo-" + secrets.token_hex(12)
    recordings = make_recordings(count, seed=2024, size=(20_000, 600_000), processing=3)
    for rec in recordings[:3]:
        rec.processing_lists_left = 1  # they finish while the backfill runs
    faults = Faults(
        list_error_rate=0.05,
        list_throttle_rate=0.05,
        throttle_reset_seconds=0.2,
        truncate_rate=0.05,
        expired_first_url_rate=0.1,
        error_shapes_mixed=True,
    )
    async with Simulator(recordings, api_key=key, faults=faults, seed=1) as sim:
        settings = load_settings(
            env={KEY_ENV: key},
            overrides={
                "telnyx.base_url": sim.api_base_url,
                "telnyx.api_key_env": KEY_ENV,
                "telnyx.max_backoff": 2.0,
                "storage.path": str(directory),
                "ledger.path": str(directory / "archiver.db"),
            },
            read_files=False,
        )
        print(f"simulated Telnyx account: {count} recordings at {sim.api_base_url}")
        async with open_services(settings) as services:
            with make_progress("archiving") as progress:
                engine = make_engine(services, [progress])
                uninstall = install_stop_signals(engine)
                try:
                    report = await backfill(services, Filters(), engine)
                finally:
                    uninstall()
            print_backfill(report)
            check = await verify_archive(
                services.ledger, services.storage, deep=True, sidecars=True
            )
        downloads = sum(sim.download_completions.values())
        injected = sim.injected
    if downloads:
        print(
            "faults survived: "
            f"{injected['list:error'] + injected['list:throttle']} failed or throttled list "
            f"calls, {injected['download:truncate']} truncated downloads, "
            f"{injected['list:expired_url']} expired links"
        )
    else:
        print("nothing to download: every recording was archived by an earlier run")
    print(
        f"verify (deep): {check.checked} recordings, {human_bytes(check.bytes)}, "
        f"{len(check.problems)} problem(s); {downloads} downloads completed this run"
    )
    config = write_inspection_config(directory)
    shown = _shown(config)
    print(f"archive: {_shown(directory)}  (run `archiver demo` again: it downloads nothing)")
    print("look at it with the demo's own config (its ledger is in the archive directory):")
    for command in ("status", "verify --deep", "manifest --format csv", "audit verify"):
        print(f"  archiver --config {shown} {command}")
    return 0 if report.all_archived and check.ok else 1


def write_inspection_config(directory: Path) -> Path:
    """A config for the read-only commands on the demo's archive and ledger (paths relative to
    the file, so the directory can be moved). The simulated API is gone once the demo ends."""
    path = directory / "archiver.toml"
    path.write_text(
        "# Written by `archiver demo`: the demo's archive and ledger, for status, verify,\n"
        "# manifest and audit (the simulated API it archived from is gone).\n"
        '[storage]\npath = "."\n\n[ledger]\npath = "archiver.db"\n',
        encoding="utf-8",
    )
    return path


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
