"""The ``tern`` command: serve, queue (list, show, summary, hold, release, delete, requeue,
flush), passwd, tls-report, version.

Parses arguments and hands over to the stage that does the work. Exit status 2 for a usage or
configuration error (one message on stderr), 1 when a named queue ID is not queued or the work
failed. Trusts the administrator at the terminal.
"""

import argparse
import functools
import os
import sys

import lmdb

from engine import __version__, speedups
from engine.cli.queue import NoSuchMessage
from engine.config import ConfigError, load_config


def _cmd_serve(args: argparse.Namespace) -> int:
    from engine.serve import StartupError, run

    try:
        run(load_config(args.config))
    except StartupError as error:
        print(f"tern: fatal: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_queue_list(args: argparse.Namespace) -> int:
    from engine.cli.queue import list_queue

    return list_queue(load_config(args.config), sys.stdout, as_json=args.json, err=sys.stderr)


def _cmd_queue_show(args: argparse.Namespace) -> int:
    from engine.cli.show import SECTIONS, show_message

    sections = tuple(name for name in SECTIONS if getattr(args, name)) or SECTIONS
    return show_message(load_config(args.config), _queue_id(args.queue_id), sys.stdout,
                        as_json=args.json, sections=sections, err=sys.stderr)


def _cmd_queue_summary(args: argparse.Namespace) -> int:
    from engine.cli.summary import DEFAULT_QUEUES, QUEUES, summarize

    unknown = sorted(set(args.queues) - set(QUEUES))
    if unknown:
        args.parser.error(f"unknown queue {unknown[0]!r} (choose from {', '.join(QUEUES)})")
    return summarize(load_config(args.config), sys.stdout, as_json=args.json,
                     senders=args.senders, queues=tuple(args.queues) or DEFAULT_QUEUES,
                     err=sys.stderr)


def _cmd_queue_operation(args: argparse.Namespace) -> int:
    from engine.cli.manage import run_operation

    op = args.queue_command
    if op == "flush":
        return run_operation(load_config(args.config), op, None, sys.stderr, domain=args.domain)
    if op == "delete":
        queue_ids = _queue_ids(args, allow_none=args.deferred)
        return run_operation(load_config(args.config), op, queue_ids, sys.stderr,
                             deferred_only=args.deferred)
    return run_operation(load_config(args.config), op, _queue_ids(args, allow_none=False),
                         sys.stderr)


def _queue_id(text: str) -> str:
    """A queue ID as typed, or copied from mailq with its ``!`` (held) or ``*`` mark."""
    return text.strip().rstrip("!*")


def _queue_ids(args: argparse.Namespace, *, allow_none: bool) -> list[str] | None:
    """The IDs named (``-``: one per line on stdin, as postsuper); None for ALL. A usage
    error (exit status 2) when there are none, unless ``allow_none`` (delete --deferred)."""
    words = list(args.queue_ids)
    if words == ["-"]:
        words = [line.split()[0] for line in sys.stdin if line.strip()]
    if "ALL" in words:
        if len(words) > 1:
            args.parser.error("ALL stands alone: name queue IDs or ALL, not both")
        return None
    if not words:
        if allow_none:
            return None
        args.parser.error("name queue IDs, ALL, or - (IDs on standard input)")
    return [_queue_id(word) for word in words]


def _cmd_tls_report(args: argparse.Namespace) -> int:
    """Ask the running server to send one day's TLS-RPT reports (RFC 8460) now."""
    import datetime

    from engine import control

    config = load_config(args.config)
    day = args.day or (datetime.datetime.now(datetime.UTC).date()
                       - datetime.timedelta(days=1)).isoformat()
    for name in control.shard_sockets(0):
        try:
            sent = control.request(config.queue_directory, "tls-report", name=name, day=day)
        except control.ControlUnavailable:
            continue
        except control.ControlError as error:
            print(f"tern: tls-report: {error}", file=sys.stderr)
            return 1
        for line in sent:
            print(line)
        return 0
    print("tern: tls-report: no server runs on this queue directory", file=sys.stderr)
    return 1


def _cmd_passwd(args: argparse.Namespace) -> int:
    from engine.cli.passwd import main

    return main(args)


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"tern {__version__}")
    for name, implementation in speedups.implementations().items():
        print(f"  {name}: {implementation}")
    return 0


def _queue_command(commands, name: str, summary: str, func, *,
                   json_help: str = "") -> argparse.ArgumentParser:
    """A ``tern queue`` subcommand; each takes --config, and --json where it prints records."""
    command = commands.add_parser(name, help=summary, description=summary)
    command.add_argument("--config", "-c", help="TOML configuration file")
    if json_help:
        command.add_argument("--json", action="store_true", help=json_help)
    command.set_defaults(func=func, parser=command)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tern", description="Tern mail transfer agent")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the mail server")
    serve.add_argument("--config", "-c", help="TOML configuration file (default: embedded)")
    serve.set_defaults(func=_cmd_serve)

    queue = commands.add_parser("queue", help="inspect and manage the mail queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)

    queue_command = functools.partial(_queue_command, queue_commands)
    queue_command("list", "list the queue (as mailq)", _cmd_queue_list,
                  json_help="one JSON object per message (as postqueue -j)")
    show = queue_command("show", "show one message: envelope, headers, body (as postcat -q)",
                         _cmd_queue_show, json_help="one JSON object")
    show.add_argument("queue_id", metavar="QID")
    for section in ("envelope", "headers", "body"):
        show.add_argument(f"--{section}", action="store_true",
                          help=f"show the {section} (default: all three)")
    ids_help = "queue IDs, ALL, or - to read IDs from standard input"
    for name, summary in (("hold", "put messages on hold (as postsuper -h)"),
                       ("release", "release messages from hold (as postsuper -H)"),
                       ("requeue", "retry messages now, from the start (as postsuper -r)")):
        operation = queue_command(name, summary, _cmd_queue_operation)
        operation.add_argument("queue_ids", nargs="*", metavar="QID", help=ids_help)
    delete = queue_command("delete", "delete messages (as postsuper -d)", _cmd_queue_operation)
    delete.add_argument("queue_ids", nargs="*", metavar="QID", help=ids_help)
    delete.add_argument("--deferred", action="store_true",
                        help="only deferred messages (all of them when no QID is named)")
    flush = queue_command("flush", "attempt deferred mail now (as postqueue -f, -s)",
                          _cmd_queue_operation)
    flush.add_argument("--domain", help="only mail for this domain (as postqueue -s)")
    summary = queue_command("summary", "recipients by domain and age (as qshape)",
                            _cmd_queue_summary, json_help="one JSON object")
    summary.add_argument("queues", nargs="*", metavar="QUEUE",
                         help="hold, deferred, active (default: deferred and active, "
                              "every message not on hold)")
    summary.add_argument("--senders", action="store_true",
                         help="sender domains, counting messages (as qshape -s)")

    from engine.auth.schemes import WRITABLE

    passwd = commands.add_parser(
        "passwd", help="add an AUTH user or change a password (Dovecot passwd-file)",
        description="Write USER's entry in the AUTH password file (Dovecot's passwd-file "
                    "format). The password is read from standard input, or prompted for on a "
                    "terminal.")
    passwd.add_argument("user", metavar="USER")
    passwd.add_argument("--scheme", choices=WRITABLE, default=WRITABLE[0],
                        help=f"password hash scheme (default {WRITABLE[0]})")
    passwd.add_argument("--file", "-f", help="the password file (default: "
                                             "smtpd_sasl_password_file of --config)")
    passwd.add_argument("--config", "-c", help="TOML configuration file")
    passwd.set_defaults(func=_cmd_passwd, parser=passwd)

    tls_report = commands.add_parser(
        "tls-report", help="send TLS-RPT reports (RFC 8460) of one day now",
        description="Send the TLS-RPT aggregate reports of DAY (default: yesterday, UTC) to "
                    "every policy domain that asks for them (its _smtp._tls TXT record), "
                    "through the running server, which otherwise does it daily.")
    tls_report.add_argument("--day", help="the UTC day, YYYY-MM-DD (default: yesterday)")
    tls_report.add_argument("--config", "-c", help="TOML configuration file")
    tls_report.set_defaults(func=_cmd_tls_report)

    version = commands.add_parser("version", help="version and hot-path implementations")
    version.set_defaults(func=_cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"tern: fatal: {error}", file=sys.stderr)
        return 2
    except NoSuchMessage as error:
        print(f"tern: {error}", file=sys.stderr)
        return 1
    except lmdb.Error as error:
        print(f"tern: fatal: cannot read the queue: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `tern queue list | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
