"""What archiver archives: the API's collections of Video media, each a *source*.

``room_recordings`` (per participant and track) and ``room_compositions`` (the mixed mp4 Telnyx
builds of a room session, opt-in: ``[sources] room_compositions = true``). Both go through the
same engine, ledger, storage, verification and audit chain; the ledger knows each row's source,
and the API calls, the filters the API understands and the default key differ per source.
"""

from __future__ import annotations

from dataclasses import dataclass

RECORDINGS = "room_recordings"
COMPOSITIONS = "room_compositions"


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    # The API's collection path (list; ``{path}/{id}`` retrieves and deletes one).
    path: str
    # One item, in messages.
    noun: str
    # The webhook event that says an item is ready.
    ready_event: str
    # Statuses before an item can be downloaded.
    waiting: tuple[str, ...]
    default_key_template: str


SOURCES: dict[str, Source] = {
    RECORDINGS: Source(
        name=RECORDINGS,
        path="/room_recordings",
        noun="recording",
        ready_event="video.room.recording.completed",
        waiting=("processing",),
        default_key_template="{ended:%Y/%m/%d}/{room_id}/{id}.{ext}",
    ),
    COMPOSITIONS: Source(
        name=COMPOSITIONS,
        path="/room_compositions",
        noun="composition",
        ready_event="video.room.composition.completed",
        waiting=("enqueued", "processing"),
        default_key_template="compositions/{created:%Y/%m/%d}/{session_id}/{id}.mp4",
    ),
}


def source_of(name: str | None) -> Source:
    """The source named ``name`` (a ledger row's; None or unknown: recordings, the only
    source before there were others)."""
    return SOURCES.get(name or RECORDINGS, SOURCES[RECORDINGS])
