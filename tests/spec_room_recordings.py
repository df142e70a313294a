"""The Telnyx API spec for room recordings and compositions, as data, and a strict checker of
requests and answers.

The facts come from ``team-telnyx/openapi``, ``openapi/spec3.yml`` (OpenAPI 3.1.0), at commit
12de4dd039fd (2026-07-16), the newest version of that file this project could read whole; the
line numbers below are that file's. The SDK built from it (``team-telnyx/telnyx-python`` 4.x,
``types/room_recording_list_params.py``, ``resources/room_recordings.py``) sends the same keys.

* The list (``ListRoomRecordings``, line 107282) takes two deepObject parameters, exploded
  (``style: deepObject``, ``explode: true``): ``filter`` (107293) and ``page``
  (``video_PageConsolidated``, 3182). On the wire each property is one key:
  ``filter[date_ended_at][gte]``, ``page[size]``. Its one duration filter is
  ``filter[duration_secs]``, "duration_secs greater or equal" (107339).
* Until 2025-08-11 (the change is in that repository's commit f70aa708) the list defined
  ``filter[duration_secs][eq|lte|gte]`` instead, as the older reference page does:
  ``LEGACY_LIST_QUERY``. archiver must never send those.
* Errors take three shapes: ``{"errors": [...]}`` (``video_Errors``, 71988), one bare error
  object (``video_Error``, 71964: ``code`` and ``title`` required), the 404 of a retrieve or a
  delete (``video_ResourceNotFound``, 5602); and ``{"message", "success"}``
  (``video_GenericErrorResponse``, 5589), every 4XX of the list.
* No field of ``RoomRecording`` (50693) or ``PaginationMeta`` (42979) is required, and none is
  nullable (3.1.0: a null would need ``type: [..., "null"]``): a field without a value is
  left out.

Room compositions (``CreateRoomComposition``, the POST at 106953, is left out: archiver never
creates one):

* The list (``ListRoomCompositions``, line 106882) takes the deepObject ``filter`` (106891):
  ``filter[date_created_at][eq|gte|lte]`` (dates), ``filter[session_id]`` (a UUID) and
  ``filter[status]`` (an enum: ``completed``, ``processing``, ``enqueued``), then the same
  ``video_PageConsolidated``. Its 4XX is ``video_GenericErrorResponse`` as the recordings
  list's; a retrieve's or a delete's 404 is ``video_ResourceNotFound``; a delete answers 204
  without a body.
* ``RoomComposition`` (50513): no field required, none nullable. ``video_layout`` is a map
  (``additionalProperties``) of ``VideoRegion`` (65688); ``format`` has the one value ``mp4``;
  ``status`` is ``completed``, ``enqueued`` or ``processing``. The schema's example says
  ``record_type: composition`` (50521), its property's example ``room_composition`` (50575):
  the latter is what the simulator sends; the checker holds it to a string only.

What is judgement, not spec: a status no operation declares (401 on a retrieve, 429, 5xx) is
accepted when its body is one of the three error shapes (``UNDECLARED_ERRORS``); and answers
are held to the schema's own properties (an extra field is reported, though the spec does not
forbid one: the simulator must not invent fields).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

SPEC = "team-telnyx/openapi openapi/spec3.yml @ 12de4dd039fd (2026-07-16)"
SERVER = "https://api.telnyx.com/v2"  # servers, line 118160


# -- the facts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Value:
    """One schema of a parameter or a JSON value."""

    type: str  # string | integer | number | boolean | object
    format: str | None = None  # date | date-time | uuid | float | uri
    enum: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    line: int = 0


@dataclass(frozen=True)
class Obj:
    """A JSON object: its properties (none required unless named)."""

    properties: Mapping[str, Value | Obj | Arr | Map]
    required: tuple[str, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class Arr:
    items: Value | Obj | Arr | Map


@dataclass(frozen=True)
class Map:
    """A JSON object whose properties, any names, are all ``values`` (additionalProperties)."""

    values: Value | Obj | Arr | Map
    line: int = 0


Schema = Value | Obj | Arr | Map


DATE = "date"
UUID = "uuid"
URI = "uri"

# ListRoomRecordings' query keys (the deepObject ``filter``, then video_PageConsolidated).
LIST_QUERY: dict[str, Value] = {
    "filter[date_ended_at][eq]": Value("string", DATE, line=107299),
    "filter[date_ended_at][gte]": Value("string", DATE, line=107305),
    "filter[date_ended_at][lte]": Value("string", DATE, line=107311),
    "filter[date_started_at][eq]": Value("string", DATE, line=107320),
    "filter[date_started_at][gte]": Value("string", DATE, line=107326),
    "filter[date_started_at][lte]": Value("string", DATE, line=107332),
    "filter[duration_secs]": Value("integer", line=107339),  # "greater or equal"
    "filter[participant_id]": Value("string", UUID, line=107343),
    "filter[room_id]": Value("string", UUID, line=107348),
    "filter[session_id]": Value("string", UUID, line=107353),
    "filter[status]": Value("string", line=107358),  # no enum on the parameter
    "filter[type]": Value("string", line=107362),  # no enum on the parameter
    "page[number]": Value("integer", minimum=1, line=3190),  # default 1
    "page[size]": Value("integer", minimum=1, maximum=250, line=3195),  # default 20
}

# The same list as the older reference page (and the spec before 2025-08-11) has it.
LEGACY_LIST_QUERY: dict[str, Value] = {
    **{k: v for k, v in LIST_QUERY.items() if k != "filter[duration_secs]"},
    "filter[duration_secs][eq]": Value("integer"),
    "filter[duration_secs][lte]": Value("integer"),
    "filter[duration_secs][gte]": Value("integer"),
}

ROOM_RECORDING = Obj(
    {
        "codec": Value("string", line=50712),
        "completed_at": Value("string", "date-time", line=50716),
        "created_at": Value("string", "date-time", line=50721),
        "download_url": Value("string", line=50726),
        "duration_secs": Value("integer", line=50730),
        "ended_at": Value("string", "date-time", line=50734),
        "id": Value("string", UUID, line=50739),
        "participant_id": Value("string", UUID, line=50744),
        "record_type": Value("string", line=50749),  # readOnly; example room_recording
        "room_id": Value("string", UUID, line=50753),
        "session_id": Value("string", UUID, line=50758),
        "size_mb": Value("number", "float", line=50763),
        "started_at": Value("string", "date-time", line=50768),
        "status": Value("string", enum=("completed", "processing"), line=50773),
        "type": Value("string", enum=("audio", "video"), line=50780),
        "updated_at": Value("string", "date-time", line=50787),
    },
    line=50693,
)
PAGINATION_META = Obj(
    {
        "page_number": Value("integer", line=42981),
        "page_size": Value("integer", line=42984),
        "total_pages": Value("integer", line=42987),
        "total_results": Value("integer", line=42990),
    },
    line=42979,
)
ERROR_OBJECT = Obj(
    {
        "code": Value("string"),
        "detail": Value("string"),
        "meta": Value("object"),  # additionalProperties: true
        "source": Obj({"parameter": Value("string"), "pointer": Value("string")}),
        "title": Value("string"),
    },
    required=("code", "title"),
    line=71964,
)
ERRORS = Obj({"errors": Arr(ERROR_OBJECT)}, line=71988)
GENERIC_ERROR = Obj({"message": Value("string"), "success": Value("boolean")}, line=5589)
ERROR_SHAPES: dict[str, Obj] = {"errors": ERRORS, "bare": ERROR_OBJECT, "message": GENERIC_ERROR}

LIST_ANSWER = Obj({"data": Arr(ROOM_RECORDING), "meta": PAGINATION_META}, line=107370)
ONE_ANSWER = Obj({"data": ROOM_RECORDING}, line=107425)
BULK_DELETE_ANSWER = Obj({"data": Obj({"room_recordings": Value("integer")})}, line=107260)
PATH_ID = Value("string", UUID)  # room_recording_id, lines 107397 and 107418

# ListRoomCompositions' query keys (the deepObject ``filter``, then video_PageConsolidated).
COMPOSITION_LIST_QUERY: dict[str, Value] = {
    "filter[date_created_at][eq]": Value("string", DATE, line=106897),
    "filter[date_created_at][gte]": Value("string", DATE, line=106903),
    "filter[date_created_at][lte]": Value("string", DATE, line=106909),
    "filter[session_id]": Value("string", UUID, line=106916),
    "filter[status]": Value("string", enum=("completed", "processing", "enqueued"), line=106921),
    "page[number]": LIST_QUERY["page[number]"],
    "page[size]": LIST_QUERY["page[size]"],
}

VIDEO_REGION = Obj(
    {
        "height": Value("integer", minimum=16, line=65690),
        "max_columns": Value("integer", minimum=1, maximum=1000, line=65695),
        "max_rows": Value("integer", minimum=1, maximum=1000, line=65703),
        "video_sources": Arr(Value("string", UUID, line=65714)),  # "Can be '*'", but uuid
        "width": Value("integer", minimum=16, line=65719),
        "x_pos": Value("integer", line=65724),
        "y_pos": Value("integer", line=65730),
        "z_pos": Value("integer", minimum=-99, maximum=99, line=65736),
    },
    line=65688,
)
ROOM_COMPOSITION = Obj(
    {
        "completed_at": Value("string", "date-time", line=50540),
        "created_at": Value("string", "date-time", line=50545),
        "download_url": Value("string", line=50550),
        "duration_secs": Value("integer", line=50554),
        "ended_at": Value("string", "date-time", line=50558),
        "format": Value("string", enum=("mp4",), line=50563),
        "id": Value("string", UUID, line=50569),
        "record_type": Value("string", line=50574),  # readOnly; example room_composition
        "resolution": Value("string", line=50578),  # example 1280x720
        "room_id": Value("string", UUID, line=50582),
        "session_id": Value("string", UUID, line=50587),
        "size_mb": Value("number", "float", line=50592),
        "started_at": Value("string", "date-time", line=50597),
        "status": Value("string", enum=("completed", "enqueued", "processing"), line=50602),
        "updated_at": Value("string", "date-time", line=50610),
        "user_id": Value("string", UUID, line=50615),
        "video_layout": Map(VIDEO_REGION, line=50620),  # "Limited to 2 regions": not checked
        "webhook_event_failover_url": Value("string", URI, line=50626),  # default ''
        "webhook_event_url": Value("string", URI, line=50634),
        "webhook_timeout_secs": Value("integer", minimum=0, maximum=30, line=50640),
    },
    line=50513,
)
COMPOSITION_LIST_ANSWER = Obj({"data": Arr(ROOM_COMPOSITION), "meta": PAGINATION_META}, line=106933)
COMPOSITION_ONE_ANSWER = Obj({"data": ROOM_COMPOSITION}, line=107015)
# room_composition_id, lines 106987 and 107008: a uuid as PATH_ID.


@dataclass(frozen=True)
class Operation:
    id: str
    method: str
    path: str  # below the server's /v2
    query: Mapping[str, Value]
    # By status ("200", "404", or a class such as "4XX"); None: no body.
    responses: Mapping[str, Obj | None]
    line: int
    # Never sent by archiver (it deletes one verified recording at a time).
    forbidden: bool = False


OPERATIONS = (
    Operation("ListRoomRecordings", "GET", "/room_recordings", LIST_QUERY,
              {"200": LIST_ANSWER, "4XX": GENERIC_ERROR}, 107282),
    Operation("DeleteRoomRecordings", "DELETE", "/room_recordings", LIST_QUERY,
              {"201": BULK_DELETE_ANSWER, "422": ERRORS}, 107172, forbidden=True),
    Operation("ViewRoomRecording", "GET", "/room_recordings/{room_recording_id}", {},
              {"200": ONE_ANSWER, "404": ERROR_OBJECT}, 107413),
    Operation("DeleteRoomRecording", "DELETE", "/room_recordings/{room_recording_id}", {},
              {"204": None, "404": ERROR_OBJECT}, 107391),
    Operation("ListRoomCompositions", "GET", "/room_compositions", COMPOSITION_LIST_QUERY,
              {"200": COMPOSITION_LIST_ANSWER, "4XX": GENERIC_ERROR}, 106882),
    Operation("ViewRoomComposition", "GET", "/room_compositions/{room_composition_id}", {},
              {"200": COMPOSITION_ONE_ANSWER, "404": ERROR_OBJECT}, 107003),
    Operation("DeleteRoomComposition", "DELETE", "/room_compositions/{room_composition_id}", {},
              {"204": None, "404": ERROR_OBJECT}, 106981),
)  # fmt: skip

# Judgement (see the module docstring): statuses any call may meet without the spec saying so.
UNDECLARED_ERRORS = frozenset({401, 403, 408, 409, 429, 500, 502, 503, 504})


# -- the checker -----------------------------------------------------------------------------
_UUID_RE = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+")  # RFC 3986: a scheme, then the rest
_INT_RE = re.compile(r"-?\d+")
_DATE_TIME_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})", re.IGNORECASE
)


def operation(method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
    """The operation a request is, with its path parameters; None for one the spec lacks."""
    parts = path.strip("/").split("/")
    for op in OPERATIONS:
        template = op.path.strip("/").split("/")
        if op.method != method or len(template) != len(parts):
            continue
        params: dict[str, str] = {}
        for want, got in zip(template, parts, strict=True):
            if want.startswith("{"):
                params[want.strip("{}")] = got
            elif want != got:
                break
        else:
            return op, params
    return None


def format_problem(value: Value, text: str) -> str | None:
    """Why ``text`` is not a valid ``value`` (a query or path string), or None."""
    if value.type == "integer":
        if not _INT_RE.fullmatch(text):
            return "not an integer"
        number = int(text)
        if value.minimum is not None and number < value.minimum:
            return f"below {value.minimum}"
        if value.maximum is not None and number > value.maximum:
            return f"above {value.maximum}"
        return None
    if value.format == DATE:
        if not _DATE_RE.fullmatch(text):
            return "not a date (YYYY-MM-DD)"
        try:
            date.fromisoformat(text)
        except ValueError:
            return "not a calendar date"
    if value.format == UUID and not _UUID_RE.fullmatch(text):
        return "not a UUID"
    if value.format == URI and not _URI_RE.fullmatch(text):
        return "not an absolute URI"
    if value.enum is not None and text not in value.enum:
        return f"not one of {value.enum}"
    return None


def request_problems(
    method: str,
    path: str,
    query: Mapping[str, str] | Any,
    headers: Mapping[str, str],
    body: bytes = b"",
    *,
    query_keys: Mapping[str, Value] | None = None,
) -> list[str]:
    """Everything about a request (``path`` below /v2) the spec does not allow. ``query`` is a
    multi-mapping (a key given twice is a problem); ``query_keys`` replaces the operation's
    own (to hold a request to the legacy forms)."""
    found = operation(method, path)
    if found is None:
        return [f"{method} {path}: no such operation in {SPEC}"]
    op, params = found
    where = f"{op.id} ({method} {path})"
    problems: list[str] = []
    if op.forbidden:
        problems.append(f"{where}: archiver must never call {op.id}")
    for name, text in params.items():
        why = format_problem(PATH_ID, text)
        if why:
            problems.append(f"{where}: path parameter {name}={text!r}: {why}")
    keys = op.query if query_keys is None else query_keys
    for key in set(query):
        values = query.getall(key) if hasattr(query, "getall") else [query[key]]
        if key not in keys:
            problems.append(f"{where}: query key {key!r} is not defined by the spec")
            continue
        if len(values) > 1:
            problems.append(f"{where}: query key {key!r} given {len(values)} times")
        for text in values:
            why = format_problem(keys[key], text) or ("empty" if not text else None)
            if why:
                problems.append(f"{where}: {key}={text!r}: {why}")
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme != "Bearer" or not token:
        problems.append(f"{where}: no 'Authorization: Bearer <key>' (securitySchemes bearerAuth)")
    if body:
        problems.append(f"{where}: a body ({len(body)} bytes) on a request that takes none")
    accept = headers.get("Accept", "*/*")
    has_body = any(
        schema is not None for code, schema in op.responses.items() if code.startswith("2")
    )
    if has_body and "application/json" not in accept and "*/*" not in accept:
        problems.append(f"{where}: Accept {accept!r} refuses the JSON answer")
    if not has_body and accept != "*/*":
        # The answer is a 204 without a body; the SDK sends */* (resources/room_recordings.py).
        problems.append(f"{where}: Accept {accept!r} for an answer without a body (send */*)")
    return problems


def answer_schema(op: Operation, status: int) -> Obj | str | None:
    """The schema of ``op``'s answer with ``status``: an Obj, None (no body), or a problem."""
    for key in (str(status), f"{str(status)[0]}XX"):
        if key in op.responses:
            return op.responses[key]
    if status in UNDECLARED_ERRORS:
        return "any error shape"
    return f"status {status} is not declared for {op.id}"


def answer_problems(
    method: str, path: str, status: int, headers: Mapping[str, str], body: bytes
) -> list[str]:
    """Everything about an answer to ``method path`` the spec does not allow."""
    found = operation(method, path)
    if found is None:
        return []  # the request is reported already
    op, _ = found
    where = f"{op.id} answered {status}"
    schema = answer_schema(op, status)
    if isinstance(schema, str) and schema != "any error shape":
        return [f"{where}: {schema}"]
    if schema is None:
        return [f"{where}: a body ({len(body)} bytes) where none is declared"] if body else []
    content_type = headers.get("Content-Type", "")
    if not content_type.startswith("application/json"):
        return [f"{where}: Content-Type {content_type!r}, not application/json"]
    try:
        doc = json.loads(body)
    except ValueError:
        return [f"{where}: the body is not JSON"]
    if isinstance(schema, str):
        shapes = {name: json_problems(shape, doc, "$") for name, shape in ERROR_SHAPES.items()}
        if not any(not found for found in shapes.values()):
            return [f"{where}: the body is none of the three error shapes: {doc!r:.200}"]
        return []
    return [f"{where}: {p}" for p in json_problems(schema, doc, "$")]


def json_problems(schema: Schema, doc: Any, path: str) -> list[str]:
    """Every way ``doc`` differs from ``schema`` (strict: unknown properties and nulls too)."""
    if doc is None:
        return [f"{path}: null (nothing is nullable)"]
    if isinstance(schema, Arr):
        if not isinstance(doc, list):
            return [f"{path}: {type(doc).__name__}, not an array"]
        return [
            p
            for i, item in enumerate(doc)
            for p in json_problems(schema.items, item, f"{path}[{i}]")
        ]
    if isinstance(schema, Map):
        if not isinstance(doc, dict):
            return [f"{path}: {type(doc).__name__}, not an object"]
        return [
            p
            for name, value in doc.items()
            for p in json_problems(schema.values, value, f"{path}.{name}")
        ]
    if isinstance(schema, Obj):
        if not isinstance(doc, dict):
            return [f"{path}: {type(doc).__name__}, not an object"]
        found = [f"{path}: {name!r} is required" for name in schema.required if name not in doc]
        for name, value in doc.items():
            sub = schema.properties.get(name)
            if sub is None:
                found.append(f"{path}: {name!r} is not a property of the schema")
            else:
                found += json_problems(sub, value, f"{path}.{name}")
        return found
    return [f"{path}: {why}" for why in [_value_problem(schema, doc)] if why]


def _value_problem(value: Value, doc: Any) -> str | None:
    kinds: dict[str, tuple[type, ...]] = {
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
        "object": (dict,),
    }
    if isinstance(doc, bool) and value.type != "boolean":
        return f"{doc!r} is a boolean, not {value.type}"
    if not isinstance(doc, kinds[value.type]):
        return f"{doc!r:.80} is not {value.type}"
    if value.type == "integer":
        if value.minimum is not None and doc < value.minimum:
            return f"{doc!r} is below {value.minimum}"
        if value.maximum is not None and doc > value.maximum:
            return f"{doc!r} is above {value.maximum}"
    if value.type != "string":
        return None
    if value.format == "date-time":
        if not _DATE_TIME_RE.fullmatch(doc):
            return f"{doc!r:.80} is not a date-time (RFC 3339)"
        try:
            datetime.fromisoformat(doc.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return f"{doc!r:.80} is not a valid date-time"
        return None
    return format_problem(value, doc)


@dataclass
class Seen:
    """One request as a checker saw it, for the tests' own assertions."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int = 0
    problems: list[str] = field(default_factory=list)
