"""Typed errors. Every message says what was expected, what was found, and what to do.

All of them derive from `LlavakitError`, itself a `ValueError`, so callers that catch
`ValueError` around bad input keep working.
"""


class LlavakitError(ValueError):
    """Base class of every error llavakit raises on purpose."""


class ConfigError(LlavakitError):
    """A config file is missing, malformed, or asks for something llavakit does not support."""


class WeightsError(LlavakitError):
    """Weight files are missing, corrupt, truncated, or do not match the architecture."""


class ImageError(LlavakitError):
    """An image could not be read or decoded."""


class VideoError(LlavakitError):
    """A video could not be read or decoded, or its sampling parameters are invalid."""


class PromptError(LlavakitError):
    """A conversation is malformed, or its tokens do not match the images given."""


class TokenFeatureMismatch(PromptError):
    """The number of image tokens in the prompt differs from the number of image features."""


class GenerationError(LlavakitError):
    """Sampling parameters are invalid, or a prompt cannot be generated from."""
