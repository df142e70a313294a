"""Prometheus metrics. Defined once here; every module records into them directly."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ARCHIVED = Counter(
    "archiver_recordings_archived_total",
    "Recordings (and compositions) archived and verified, by source",
    ["source"],
)
FAILED = Counter(
    "archiver_recordings_failed_total", "Transfers that failed, by source", ["source", "permanent"]
)
SKIPPED = Counter(
    "archiver_recordings_skipped_total",
    "Recordings listed but not transferred",
    ["reason"],
)
BYTES = Counter("archiver_bytes_archived_total", "Bytes written to the archive", ["source"])
TRANSFER_SECONDS = Histogram(
    "archiver_transfer_duration_seconds",
    "Duration of one successful recording transfer",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
IN_FLIGHT = Gauge("archiver_transfers_in_flight", "Transfers running now")
QUEUE_DEPTH = Gauge("archiver_queue_depth", "Recordings waiting for a worker")
API_RESPONSES = Counter(
    "archiver_api_responses_total", "Telnyx API responses by status", ["status"]
)
DOWNLOAD_RESPONSES = Counter(
    "archiver_download_responses_total", "Download host responses by status", ["status"]
)
RETRIES = Counter("archiver_retries_total", "Retries of a failed operation", ["what"])
PASS_SECONDS = Histogram(
    "archiver_pass_duration_seconds",
    "Duration of one listing pass",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
LAST_SUCCESS = Gauge(
    "archiver_last_successful_pass_timestamp_seconds", "Unix time of the last successful pass"
)
OLDEST_UNARCHIVED_AGE = Gauge(
    "archiver_oldest_unarchived_age_seconds",
    "Age of the oldest recording seen but not yet archived (0 when none)",
)
WEBHOOK_EVENTS = Counter(
    "archiver_webhook_events_total", "Webhook deliveries by outcome", ["outcome"]
)
