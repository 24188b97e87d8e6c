"""User-facing errors: each one says what is wrong, where, and what to do.

The CLI prints ``AsgError`` messages without a traceback; anything else is a bug.
"""

from __future__ import annotations


class AsgError(Exception):
    """An error the user can act on (bad input, missing file, diverged run)."""


class ConfigError(AsgError):
    """Unknown key, wrong type or invalid value in a config or override."""


class DataError(AsgError):
    """Missing dataset folder, malformed list file, unreadable image, bad label."""


class WeightsError(AsgError):
    """Missing or incompatible weight file."""


class TrainingDiverged(AsgError):
    """A non-finite loss or gradient stopped the run (the last good checkpoint is kept)."""
