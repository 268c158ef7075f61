"""Remote media fetching now lives in `llavakit.fetch`, shared with `load_image`; kept so that
`llavakit.server.fetch` imports keep working."""

from ..fetch import RemoteFetcher, is_blocked_address

__all__ = ["RemoteFetcher", "is_blocked_address"]
