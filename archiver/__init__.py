"""archiver: keep a verified copy of every Telnyx Video Room recording, fetched once."""

__version__ = "0.1.0"
