"""An in-process smtpd (the real adapter, an in-memory spool) for the abuse-defence tests, and
the client helpers they share. Everything is on loopback; clients may use 127.0.0.2+ as their
source address to be outside mynetworks or to count as another client."""

import asyncio
import contextlib
import io
import ipaddress

from engine.cleanup import Cleanup
from engine.config import Config
from engine.log import Maillog
from engine.smtpd.anvil import Anvil
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool.memory import MemorySpool

READ_TIMEOUT = 5.0  # seconds any one read waits: a test that breaks fails instead of hanging


class Server:
    """``async with Server(**config) as srv``: srv.port, srv.log(), srv.spool, srv.sessions."""

    def __init__(self, spool=None, **config) -> None:
        config.setdefault("myhostname", "mx.test")
        self.config = Config(**config)
        self.spool = spool if spool is not None else MemorySpool()
        self.sessions: set = set()
        self._log = io.StringIO()

    async def __aenter__(self) -> "Server":
        maillog = Maillog("mx.test", stream=self._log)
        context = SmtpdContext(config=self.config, maillog=maillog, sessions=self.sessions,
                               cleanup=Cleanup(self.spool, maillog, self.config),
                               anvil=Anvil(time_unit=self.config.anvil_rate_time_unit))
        self.server = await asyncio.get_running_loop().create_server(
            lambda: SmtpdProtocol(context), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        self.server.close()
        await self.server.wait_closed()

    def log(self) -> str:
        return self._log.getvalue()

    async def connect(self, source: str = "127.0.0.1", greeting: bool = True):
        """A client (reader, writer), after the greeting unless ``greeting`` is False."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                       local_addr=(source, 0))
        if greeting:
            line = await read_line(reader)
            assert line.startswith(b"220 "), line
        return reader, writer


def nets(*cidrs: str) -> tuple:
    """A mynetworks-style value for Config(...) built in a test (the loader parses files')."""
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


async def read_line(reader) -> bytes:
    return await asyncio.wait_for(reader.readline(), READ_TIMEOUT)


async def replies(reader, count: int) -> list[str]:
    """The next ``count`` replies (the last line of each); fewer when the server closes."""
    final = []
    while len(final) < count:
        line = await read_line(reader)
        if not line:
            break
        if line[3:4] == b" ":
            final.append(line.decode().rstrip("\r\n"))
    return final


async def until_closed(reader) -> bytes:
    """Everything the server still sends, up to its close."""
    return await asyncio.wait_for(reader.read(), READ_TIMEOUT)


async def close(writer) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def settle(server: Server) -> None:
    """Let the server's side of closed connections finish (its log lines, anvil counts)."""
    for _ in range(100):
        if not server.sessions:
            return
        await asyncio.sleep(0.01)
