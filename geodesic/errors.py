"""Errors a user can act on. Each says which setting or file, what was given, and what is allowed."""
from __future__ import annotations


class GeodesicError(Exception):
    """Base class: every error the engine raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(GeodesicError, ValueError):
    """A setting outside what is allowed."""

    def __init__(self, setting: str, given: object, allowed: str):
        self.setting, self.given, self.allowed = setting, given, allowed
        super().__init__(f"{setting}: got {given!r}; allowed: {allowed}")


class DataError(GeodesicError):
    """A dataset that cannot be loaded (missing or corrupt folder, unknown name)."""


class CheckpointError(GeodesicError):
    """Weights that cannot be loaded safely or do not fit the model."""


class OutOfMemory(GeodesicError):
    """The device ran out of memory during a step; the walk keeps its last point."""


class WalkDiverged(GeodesicError):
    """A step produced a non-finite loss or weight; the walk keeps its last finite point."""


class Cancelled(GeodesicError):
    """A long computation stopped because its caller asked it to (should_stop() returned True)."""
