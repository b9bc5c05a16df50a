"""Error types. Every failure a user can cause maps to one of these, with one clear message.

The CLI prints `error: <message>` for any SkvrtError and exits 1; Python callers catch SkvrtError.
"""


class SkvrtError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ModelLoadError(SkvrtError):
    """A model folder or file is missing, truncated, corrupt or unsupported."""


class ConfigError(ModelLoadError):
    """config.json lacks a required field or names something unsupported."""


class ChecksumError(SkvrtError):
    """A downloaded file does not have the expected sha256."""


class ContextOverflowError(SkvrtError):
    """A prompt (plus generation) does not fit in the context / KV cache."""


class InputError(SkvrtError):
    """Bad user input: empty prompt, non-UTF-8 text, bad option value."""
