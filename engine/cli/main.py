"""The ``tern`` command: serve, queue, version.

Parses arguments and hands over to the stage that does the work; a ConfigError becomes one
message on stderr and exit status 2. Trusts the administrator at the terminal.
"""

import argparse
import sys

from engine import __version__, speedups
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

    return list_queue(load_config(args.config), sys.stdout, as_json=args.json)


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"tern {__version__}")
    for name, implementation in speedups.implementations().items():
        print(f"  {name}: {implementation}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tern", description="Tern mail transfer agent")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the mail server")
    serve.add_argument("--config", "-c", help="TOML configuration file (default: embedded)")
    serve.set_defaults(func=_cmd_serve)

    queue = commands.add_parser("queue", help="inspect and manage the mail queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    listing = queue_commands.add_parser("list", help="list the queue (as mailq)")
    listing.add_argument("--config", "-c", help="TOML configuration file")
    listing.add_argument("--json", action="store_true", help="one JSON object per message")
    listing.set_defaults(func=_cmd_queue_list)

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


if __name__ == "__main__":
    sys.exit(main())
