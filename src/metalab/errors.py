"""User-facing errors: each says on one line what is wrong and what to do.

The CLI catches :class:`MetalabError` and prints its message without a traceback; anything else is a
bug and keeps its traceback.
"""


class MetalabError(Exception):
    """An error the user can fix (bad argument, missing file, incompatible checkpoint)."""


class DataError(MetalabError):
    """Missing, corrupt or mismatched data files."""


class ConfigError(MetalabError):
    """An impossible or unknown setting: too many ways, unknown method or recipe, ..."""


class CheckpointError(MetalabError):
    """A checkpoint that cannot be used for what was asked."""


class TrainingError(MetalabError):
    """Training stopped for a reason the user should know (e.g. a NaN loss)."""
