"""One root exception for the package, so callers can catch sorter's failures apart from bugs.

Every message says what went wrong *and* what to do about it: these errors end up in front of
an on-call engineer or in a CLI, not in a debugger.
"""

from __future__ import annotations


class SorterError(Exception):
    """Root of every error sorter raises on purpose."""


class ConfigError(SorterError, ValueError):
    """Configuration that cannot work (a flag, a setting, an argument); raised before any work starts.
    Also a ValueError, for callers of the library that validate their own arguments that way."""


class ServiceError(SorterError):
    """A local service sorter starts itself (the demo's broker and Redis) did not come up."""


class WeightsError(SorterError):
    """A pretrained-weights file that cannot be used for the backbone it was given for."""


class WeightsNotFoundError(WeightsError):
    """No pretrained weights could be found offline for a backbone."""


class CheckpointError(SorterError):
    """A checkpoint that is missing, truncated, tampered with or does not match its model."""


class DatasetError(SorterError):
    """A training/evaluation folder that cannot be used as it is."""


class FrameDecodeError(SorterError):
    """An image payload that cannot be turned into pixels (corrupt, too large, unknown format).

    ``reason`` is a stable code for dead-letter headers and metrics.
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason
