"""What an auditor reads: a manifest that says where each object is, and a verify that says
what a delete marker hides. Real CLI, local disk and a real S3 server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from archiver.simulator import Simulator, make_recordings
from tests.conftest import write_config
from tests.fixtures_s3 import S3Server
from tests.test_cli import cli
from tests.test_identity import s3_config


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_the_manifest_locates_every_local_copy(sim_factory: Any, tmp_path: Path):
    sim: Simulator = await sim_factory(make_recordings(5, seed=151))
    config = str(write_config(sim, tmp_path))
    code, _, err = await cli("--config", config, "backfill")
    assert code == 0, err
    code, out, err = await cli("--config", config, "manifest")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5
    for record in records:
        where = Path(record["location"])
        assert where.is_absolute() and where.relative_to(tmp_path / "archive")
        assert where.as_posix().endswith(record["storage_key"])
        assert sha256_of(where) == record["sha256"]


async def test_on_s3_the_manifest_names_bucket_and_prefix_and_verify_a_hidden_version(
    sim_factory: Any, tmp_path: Path, s3_server: S3Server, s3_prefix: str
):
    recs = make_recordings(3, seed=152)
    sim: Simulator = await sim_factory(recs)
    config = str(s3_config(sim, tmp_path, s3_server, s3_prefix, sidecar=True))
    code, _, err = await cli("--config", config, "backfill")
    assert code == 0, err
    code, out, err = await cli("--config", config, "manifest", "--format", "csv")
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    client = s3_server.client()
    for row in rows:
        assert row["location"] == f"s3://{s3_server.bucket}/{s3_prefix}{row['storage_key']}"
        full = row["location"].removeprefix(f"s3://{s3_server.bucket}/")
        body = client.get_object(Bucket=s3_server.bucket, Key=full)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == row["sha256"]

    # Someone deletes one object: a versioned bucket keeps it under a delete marker.
    hidden = rows[0]
    client.delete_object(Bucket=s3_server.bucket, Key=f"{s3_prefix}{hidden['storage_key']}")
    code, out, _ = await cli("--config", config, "verify")
    assert code == 1, out
    problem = next(line for line in out.splitlines() if line.startswith(f"PROBLEM {hidden['id']}"))
    assert "missing from the archive" in problem and "a delete marker hides it" in problem
    assert hidden["version_id"] in problem and "remove the marker to restore it" in problem
