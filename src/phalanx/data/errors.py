"""The errors and warnings of `phalanx.data`."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, file or argument was refused; the message names it, says what was wrong and what to do."""


class NoncanonicalDataWarning(UserWarning):
    """Data were loaded from files whose checksum is not the canonical one (on request)."""


class DataCacheWarning(UserWarning):
    """An image folder's cache could not be written; its images were decoded and will be again next time."""
