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


class MediaError(LlavakitError):
    """A medium named by an http(s) URL was refused or could not be fetched (see the subclasses)."""


class InvalidMediaURL(MediaError):
    """A media URL is malformed: no host, a bad port, a host that is neither a name nor an IP address.

    The caller's mistake: fix the URL.
    """


class MediaURLNotAllowed(MediaError):
    """A well-formed media URL is refused by policy before anything is fetched: a scheme other than
    http(s), credentials in the URL, a host off the allow-list, or a host whose address is not public
    (private, loopback, link-local, ...), on any redirect hop.

    The caller's mistake: use a public URL, or send the bytes themselves.
    """


class MediaFetchFailed(MediaError):
    """A media URL was allowed, but fetching it failed: the name did not resolve, the connection or TLS
    failed, the answer was an HTTP error, the body was over the byte cap, or it took past the deadline.

    Check the URL and the remote host; retrying later may help.
    """


class NonFiniteLogits(GenerationError):
    """The model gave one request logits (or, after its penalty and warping, probabilities) that are
    NaN or infinite, so no token can be picked. Only that request fails; the others keep running."""


class ParallelError(LlavakitError):
    """A tensor-parallel rank died, timed out in a collective or failed to load. The model cannot run
    any more: close it (`vlm.close()`) and load it again; the first message says which rank and why."""
