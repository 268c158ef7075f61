"""Connection limits uvicorn does not set by itself: a cap on open connections and a header deadline.

uvicorn closes idle kept-alive connections, but a connection that trickles its request headers a
byte at a time (slowloris), or opens and sends nothing, stays open forever, and there is no limit
to how many do. Each one costs a file descriptor; enough of them starve the server. Here:

    connection made ─► more than max_connections open? ─► 503, closed
                    ─► headers of the next request not complete within header_timeout_s? ─► closed

The body has its own deadline, enforced where it is read (the app answers 408).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY_BODY = (b'{"error":{"message":"too many open connections; retry shortly.","type":"server_error",'
              b'"param":null,"code":"overloaded"}}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a deadline for each request's headers."""

    class GuardedH11Protocol(H11Protocol):
        """One HTTP/1.1 connection; see the module docstring."""

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                transport.write(_BUSY)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # part of a request's headers, or nothing yet
                if self._header_timer is None:
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request headers in %g s",
                                 header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol
