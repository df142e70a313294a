"""The one storage key validator: every backend, ``archiver.layout`` and the S3 prefix check use it.

A key is a ``/``-separated path relative to the archive. Anything that could step outside it, hide
a control character or pass for a partial upload is refused (``UnsafeValue``), never repaired.
"""

from __future__ import annotations

import re
import unicodedata

from archiver.errors import UnsafeValue

PARTIAL_SUFFIX = ".partial"
# The components archiver itself makes (``plain``): letters, digits and ``._=+-``, not leading
# with a dot, at most 201 characters.
_PLAIN_COMPONENT = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]{0,200}")


def check_key(key: str, *, plain: bool = False) -> list[str]:
    """Split a storage key into its path components; raise UnsafeValue for anything hostile.

    With ``plain``, every component must also be made of the characters archiver's own keys use
    (what ``archiver.layout`` renders): a template cannot produce anything else."""
    if not isinstance(key, str) or not key:
        raise UnsafeValue("storage key is empty")
    shown = f"{key!r:.120}"
    # Printable ASCII (every key archiver makes) has neither; only others need the slow look.
    printable = key.isascii() and key.isprintable()
    if not printable and any(unicodedata.category(c) in ("Cc", "Cs") for c in key):
        raise UnsafeValue(f"storage key {shown} contains a control character")
    if "\\" in key:
        raise UnsafeValue(f"storage key {shown} contains a backslash")
    if key.startswith("/"):
        raise UnsafeValue(f"storage key {shown} is absolute; keys are relative to the archive")
    parts = key.split("/")
    for part in parts:
        if not part:
            raise UnsafeValue(f"storage key {shown} has an empty path component")
        if part in (".", ".."):
            raise UnsafeValue(f"storage key {shown} has a {part!r} path component")
        if plain and not _PLAIN_COMPONENT.fullmatch(part):
            raise UnsafeValue(f"storage key {shown} is not a safe relative path")
    if is_partial_name(parts[-1]):
        raise UnsafeValue(f"storage key {shown} has the name of a partial upload")
    return parts


def is_partial_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)
