"""Errors anole raises for bad input. Each message names the file or field and the fix."""


class AnoleError(Exception):
    """Base class for errors a user can act on; the CLI prints these without a traceback."""


class IngestError(AnoleError):
    """A source could not be ingested; the store is left exactly as it was."""


class LayoutError(IngestError):
    """A source is neither the Omniglot nor the generic layout."""


class SamplingError(AnoleError):
    """An episode cannot be sampled with the requested ways, shots and queries."""


class CheckpointError(AnoleError):
    """A checkpoint is missing, corrupt or incompatible."""


class ConfigError(AnoleError):
    """A configuration field is unknown or has a bad value."""


class StoreError(AnoleError):
    """The store is unreadable, damaged, or lacks a requested domain."""


class DiskFullError(AnoleError):
    """A write ran out of disk space; what was on disk before it is intact."""
