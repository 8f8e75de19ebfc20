"""``tern passwd``: add a user to the AUTH passwd-file, or change a user's password.

The password comes from standard input (its first line), or from a prompt on a terminal
(asked twice, not echoed); it is hashed with a fresh salt and never printed. The file is
rewritten atomically (engine.auth.passwd_file.set_password); a running server picks the
change up at the next AUTH. Trusts the administrator at the terminal.
"""

import getpass
import sys
from typing import TextIO

from engine.auth import schemes
from engine.auth.passwd_file import PasswdFileError, set_password


class PasswdError(Exception):
    """Nothing was written: one line for the administrator."""


def read_password(stdin: TextIO) -> bytes:
    """The new password: prompted twice on a terminal, else the first line of ``stdin``."""
    if stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Retype new password: ") != first:
            raise PasswdError("the passwords do not match")
        password = first
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise PasswdError("empty password")
    return password.encode("utf-8", "surrogateescape")


def run_passwd(path: str, username: str, scheme: str, stdin: TextIO, out: TextIO) -> None:
    """Hash the password read from ``stdin`` and write ``username``'s entry into ``path``."""
    try:
        hashed = schemes.make_hash(scheme, read_password(stdin))
        replaced = set_password(path, username, hashed)
    except (ValueError, PasswdFileError) as error:
        raise PasswdError(str(error)) from None
    except OSError as error:
        raise PasswdError(f"{path}: cannot write: {error.strerror or error}") from None
    print(f"{'changed the password of' if replaced else 'added'} {username} in {path} "
          f"({scheme})", file=out)


def main(args) -> int:  # the argparse namespace of ``tern passwd``
    from engine.config import load_config

    path = args.file or load_config(args.config).smtpd_sasl_password_file
    if not path:
        args.parser.error("name the password file: --file, or smtpd_sasl_password_file in "
                          "--config's file")
    try:
        run_passwd(path, args.user, args.scheme, sys.stdin, sys.stdout)
    except PasswdError as error:
        print(f"tern: passwd: {error}", file=sys.stderr)
        return 1
    return 0
