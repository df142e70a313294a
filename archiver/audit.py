"""The audit chain: every entry carries the hash of the one before it.

An entry's hash is SHA-256 over the previous hash and a canonical JSON of the entry, so removing,
reordering or editing any entry breaks every hash after it. ``verify_chain`` finds the first break.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from archiver.ledger.base import AuditEntry

GENESIS = "0" * 64


def entry_hash(
    prev_hash: str,
    seq: int,
    at: datetime,
    action: str,
    recording_id: str | None,
    details: Mapping[str, Any],
) -> str:
    body = json.dumps(
        {
            "seq": seq,
            "at": at.isoformat(),
            "action": action,
            "recording_id": recording_id,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    entries: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_chain(entries: AsyncIterator[AuditEntry]) -> ChainReport:
    prev = GENESIS
    expected_seq = 1
    count = 0
    problems: list[str] = []
    async for entry in entries:
        count += 1
        if entry.seq != expected_seq:
            problems.append(f"entry {entry.seq}: expected sequence {expected_seq} (entry missing)")
        if entry.prev_hash != prev:
            problems.append(f"entry {entry.seq}: does not chain to the entry before it")
        actual = entry_hash(
            entry.prev_hash, entry.seq, entry.at, entry.action, entry.recording_id, entry.details
        )
        if actual != entry.hash:
            problems.append(f"entry {entry.seq}: content does not match its hash (edited)")
        prev = entry.hash
        expected_seq = entry.seq + 1
    return ChainReport(entries=count, problems=problems)
