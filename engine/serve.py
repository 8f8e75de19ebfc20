"""``tern serve``: wires the stages together on one uvloop event loop and runs until signalled.

smtpd listeners → cleanup → spool (LMDB shard) → qmgr → delivery agents, and the control
socket (engine.control) through which ``tern queue`` operations reach qmgr. SIGTERM/SIGINT stop
intake first, let sessions finish committing, flush the spool, then stop deliveries (their
recipients stay queued). With ``worker_count`` 1 this one process is the server; otherwise
engine.supervisor binds the listeners and runs ``serve`` in one worker process per shard, on the
inherited listening sockets. Trusts the validated Config.
"""

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import lmdb

from engine import __version__
from engine.auth.passwd_file import PasswdFileError, PasswordFile
from engine.cleanup import Cleanup
from engine.config import Config, Listener
from engine.control import ControlError, ControlServer
from engine.delivery.agents import build_agents
from engine.delivery.connections import ConnectionCache
from engine.dns import Resolver
from engine.log import Maillog
from engine.qmgr.manager import QueueManager
from engine.smtp import replies
from engine.smtpd.anvil import Anvil
from engine.smtpd.session import SmtpdContext, SmtpdProtocol
from engine.spool.lmdb_spool import LmdbSpool
from engine.spool.queue_id import QueueIdGenerator
from engine.tls.server import server_context, validity_warnings

SHUTDOWN_GRACE = 10.0  # seconds sessions get to finish a commit before being cut


class StartupError(Exception):
    """The server cannot start (spool unusable, address in use): one line for the operator."""


def shard_path(config: Config, shard: int = 0) -> Path:
    return Path(config.queue_directory) / f"shard{shard}"


def worker_count(config: Config) -> int:
    """How many worker processes (spool shards) the server runs: 0 means one per core."""
    return config.worker_count or os.cpu_count() or 1


async def serve(config: Config, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, shard: int = 0,
                sockets: list[tuple[Listener, socket.socket]] | None = None,
                control_name: str = "control") -> None:
    """The whole server in this process, on spool shard ``shard``. A worker of the supervisor
    is given the listening ``sockets`` (bound there) and its own ``control_name``; it leaves
    the daemon's start and stop lines to the supervisor."""
    loop = asyncio.get_running_loop()
    worker = sockets is not None
    try:
        maillog = Maillog(config.myhostname, config.maillog_file)
    except OSError as error:
        raise StartupError(f"maillog_file {config.maillog_file}: {error.strerror}") from error
    try:
        spool = LmdbSpool(shard_path(config, shard), map_size=config.queue_map_size,
                          map_size_limit=config.queue_map_size_limit,
                          commit_window=config.queue_commit_window)
    except (OSError, lmdb.Error) as error:
        raise StartupError(f"queue_directory {config.queue_directory}: cannot open the spool: "
                           f"{getattr(error, 'strerror', None) or error}") from error
    resolver = Resolver(config)
    connections = ConnectionCache(config)  # idle SMTP sessions reused for the next message
    # local forwards through cleanup, made below (it needs qmgr, which needs the agents)
    agents = build_agents(config, resolver, connections, maillog,
                          inject=lambda *args, **kwargs: cleanup.inject(*args, **kwargs))
    qmgr = QueueManager(spool, config, maillog, agents)
    # cleanup queues client mail and, for qmgr, Tern's own notices (bounces, delay warnings)
    cleanup = Cleanup(spool, maillog, config, on_queued=qmgr.notify_new,
                      new_queue_id=QueueIdGenerator(shard))
    qmgr.cleanup = cleanup
    await qmgr.start()
    try:
        control = await ControlServer.start(Path(config.queue_directory), qmgr, maillog,
                                            name=control_name)
    except ControlError as error:
        await qmgr.stop()
        spool.close()
        raise StartupError(str(error)) from error
    reports = None  # TLS-RPT: one worker sends the daily reports (of every worker's results)
    if config.smtp_tlsrpt_enable:
        from engine.tls import tlsrpt_send

        control.tls_report = lambda day: tlsrpt_send.send_reports(config, cleanup, maillog, day)
        if shard == 0:
            reports = asyncio.create_task(tlsrpt_send.daily(config, cleanup, maillog))
    sessions: set = set()  # every listener's: smtpd_connection_limit counts them all
    anvil = Anvil(time_unit=config.anvil_rate_time_unit)  # per-client counters, all listeners
    tls = server_context(config)  # files checked by load_config; one context for all listeners
    if shard == 0:  # once, not once per worker
        for warning in validity_warnings(config):
            maillog.line("smtpd", f"warning: {warning}")
    try:  # AUTH's credentials, one table per worker (re-read when the file changes)
        authenticator = (PasswordFile(config.smtpd_sasl_password_file)
                         if config.smtpd_sasl_password_file else None)
    except PasswdFileError as error:
        await control.close()
        await qmgr.stop()
        spool.close()
        raise StartupError(f"smtpd_sasl_password_file: {error}") from error

    def factory(listener: Listener) -> Callable[[], SmtpdProtocol]:
        context = SmtpdContext(config=config, cleanup=cleanup, maillog=maillog,
                               sessions=sessions, listener=listener, anvil=anvil, tls=tls,
                               authenticator=authenticator)
        return lambda: SmtpdProtocol(context)

    servers = []
    for listener, sock in sockets or ():
        servers.append(await loop.create_server(factory(listener), sock=sock, backlog=1024))
    for listener in () if worker else config.listen:
        try:
            servers.append(await loop.create_server(
                factory(listener), listener.host, listener.port,
                reuse_address=True, backlog=1024))
        except OSError as error:
            await control.close()
            await qmgr.stop()
            spool.close()
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise StartupError(f"cannot listen on {listener.host}:{listener.port}: "
                               f"{reason}") from error
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # not possible outside the main thread (tests may run serve() in a thread)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    if not worker:
        maillog.line("master", started_line(config))
    if ready is not None:
        ready.set()
    await stop.wait()

    if not worker:
        maillog.line("master", "terminating on signal")
    for item in servers:
        item.close()
    deadline = loop.time() + SHUTDOWN_GRACE
    while any(session._committing for session in sessions) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    for session in list(sessions):
        session.close_with(replies.SHUTTING_DOWN)
    if reports is not None:
        reports.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reports
    await spool.drain()
    await qmgr.stop(grace=SHUTDOWN_GRACE)
    await control.close()  # after qmgr: until here `tern queue` ops go through this server
    await connections.close()
    await spool.drain()
    spool.close()
    maillog.close()


def started_line(config: Config, workers: int = 1) -> str:
    where = ", ".join(f"{item.host}:{item.port}" for item in config.listen)
    text = (f"daemon started -- version {__version__}, configuration "
            f"{config.config_file or '(embedded defaults)'}, listening on {where}")
    return text + (f", {workers} workers" if workers > 1 else "")


def run(config: Config) -> None:
    """Run the server until SIGTERM/SIGINT: in this process on uvloop when ``worker_count`` is
    1, else as a supervisor of one worker process per shard (engine.supervisor)."""
    workers = worker_count(config)
    if workers > 1:
        from engine.supervisor import Supervisor

        Supervisor(config, workers).run()
        return
    import uvloop

    uvloop.run(serve(config))
