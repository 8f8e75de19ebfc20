"""Handing a plaintext connection over to the event loop's TLS, without losing or misrouting
a byte.

``loop.start_tls`` is a coroutine, and the connection does not wait for it. Before start_tls
puts its TLS layer under the transport, the socket may already deliver the client's ClientHello
(uvloop starts reading right after ``connection_made``, whatever the protocol asked); after the
handshake, the layer may hand over the client's first command before the coroutine that awaited
start_tls has resumed and switched the adapter to the new transport — a reply written then would
go out in plaintext. ``TlsHandoff`` stands in as the protocol on both sides while that happens:
it keeps the early bytes for the TLS layer, and the first decrypted bytes for the adapter. An
adapter that read past a PROXY protocol header can pass the bytes it has left over (``early``).
Trusts nothing it holds: the bytes only ever go where they were going.
"""

import asyncio
import ssl
from dataclasses import dataclass


class _Held(asyncio.Protocol):
    """A stand-in protocol: keeps what it receives, with reading paused."""

    def __init__(self, transport: asyncio.BaseTransport | None = None) -> None:
        self.transport = transport
        self.data = bytearray()
        self.ended = False  # EOF or connection lost while held

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.ended = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True


@dataclass
class Handshaken:
    """The result of a handshake: the TLS transport (its protocol not set yet), the bytes the
    client already sent over it, and whether the client already went away."""

    transport: asyncio.Transport
    data: bytes
    ended: bool


class TlsHandoff:
    """``TlsHandoff(transport)`` takes the connection over at once (call it the moment TLS is
    decided); ``await start(context, timeout=...)`` runs the server handshake."""

    def __init__(self, transport: asyncio.Transport, early: bytes = b"") -> None:
        self.transport = transport
        self._plain = _Held(transport)
        self._plain.data += early
        transport.set_protocol(self._plain)
        transport.pause_reading()

    async def start(self, context: ssl.SSLContext, *, timeout: float) -> Handshaken:
        """``loop.start_tls(..., server_side=True)``; raises what it raises (ssl.SSLError,
        ConnectionError, TimeoutError) when the handshake fails. The caller sets its protocol
        on the returned transport and then processes ``data``."""
        if self._plain.ended or self.transport.is_closing():
            raise ConnectionResetError("connection lost before the TLS handshake")
        loop = asyncio.get_running_loop()
        decrypted = _Held()
        handshake = loop.create_task(loop.start_tls(
            self.transport, decrypted, context, server_side=True, ssl_handshake_timeout=timeout))
        layer = self._plain
        try:
            for _ in range(10):  # start_tls installs its layer in its first step (call_soon)
                await asyncio.sleep(0)
                layer = self.transport.get_protocol()
                if layer is not self._plain or handshake.done():
                    break
            if self._plain.data and layer is not self._plain:
                _feed(layer, bytes(self._plain.data))
                self._plain.data.clear()
            tls = await handshake
        except asyncio.CancelledError:  # the session was cut (smtpd_timeout, shutdown)
            handshake.cancel()  # start_tls ends too, rather than fail later unheard
            raise
        return Handshaken(tls, bytes(decrypted.data), decrypted.ended)


def _feed(layer: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to a protocol as if the transport had read it."""
    if not hasattr(layer, "get_buffer"):
        layer.data_received(data)
        return
    view = memoryview(data)
    while view:
        buffer = layer.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        layer.buffer_updated(size)
        view = view[size:]
