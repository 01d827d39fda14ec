"""User-facing errors: the CLI prints their message (which names file, line and field) and exits non-zero."""


class EzoError(Exception):
    exit_code = 1


class ConfigError(EzoError, ValueError):
    """A recipe, override or flag that does not validate."""

    exit_code = 2


class ModelError(EzoError, ValueError):
    """A model spec that cannot be resolved or loaded."""


class RecordError(EzoError, ValueError):
    """Bad input data; the message starts with FILE:LINE (or FILE for whole-file problems)."""
