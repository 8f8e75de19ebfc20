"""Restriction lists against golden files, in the style of Postfix's smtpd_check tests.

Each ``tests/data/smtpd_check/*.txt`` is a script. ``key = value`` lines are TOML settings (read
by the real loader; ``$DATA`` is this directory; alias_maps is ``$DATA/aliases`` unless set);
``dns RECORD`` lines are zone records served by a real unbound for the file. Then commands set
the session's facts and evaluate a stage, each followed by the expected answer (``> OK`` or
``> the reply``):

    client 192.0.2.1 [name]    helo NAME    mail ADDR    rcpt ADDR    data    sasl USER

``client`` starts a new session. A settings line after commands starts a new configuration.
"""

import asyncio
from pathlib import Path

import pytest
import uvloop

from engine.config import load_config
from engine.dns import Resolver
from engine.policy.restrictions import Facts, Policy, SessionChecks

DATA = Path(__file__).parent / "data" / "smtpd_check"
SCRIPTS = sorted(DATA.glob("*.txt"))
STAGES = {"helo": "HELO", "mail": "MAIL", "rcpt": "RCPT", "data": "DATA"}


def parse(path: Path) -> tuple[list[str], list[list]]:
    """(dns records, blocks); a block is [settings lines, [(line number, command, arg,
    expected)]]."""
    records: list[str] = []
    blocks: list[list] = []
    pending = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("dns "):
            records.append(line[4:])
        elif line.startswith(">"):
            assert pending is not None, f"{path.name}:{number}: an answer without a command"
            blocks[-1][1].append((*pending, line[1:].strip()))
            pending = None
        elif "=" in line.split()[0] or " = " in line:
            if not blocks or blocks[-1][1]:
                blocks.append([[], []])
            blocks[-1][0].append(line.replace("$DATA", str(DATA)))
        else:
            assert pending is None, f"{path.name}:{number}: the command before has no answer"
            command, _, arg = line.partition(" ")
            if not blocks:
                blocks.append([[], []])
            if command in ("client", "sasl"):
                blocks[-1][1].append((number, command, arg, None))
            else:
                assert command in STAGES, f"{path.name}:{number}: unknown command {command}"
                pending = (number, command, arg)
    assert pending is None, f"{path.name}: the last command has no answer"
    return records, blocks


def run_block(settings: list[str], steps: list, tmp_path: Path, dns: list[str]) -> list[str]:
    """Play one block; the list of mismatches ("file line: got X, expected Y")."""
    config_file = tmp_path / "tern.toml"
    # the aliases are the scripts' own (data/smtpd_check/aliases), never the machine's
    aliases = [] if any(line.startswith("alias_maps") for line in settings) else [
        f'alias_maps = ["texthash:{DATA}/aliases"]']
    config_file.write_text("\n".join(['myhostname = "mx.example.test"', *aliases, *dns,
                                      *settings]) + "\n")
    config = load_config(config_file)
    policy = Policy(config)
    resolver = Resolver(config) if dns else None
    checks, facts = None, None
    failures = []

    async def play():
        nonlocal checks, facts
        for number, command, arg, expected in steps:
            if command == "client":
                ip, _, name = arg.partition(" ")
                checks, facts = SessionChecks(policy), Facts(ip, name or "unknown")
                continue
            if command == "sasl":
                facts.sasl_username = arg
                continue
            previous_helo = facts.helo
            if command == "helo":
                facts.helo = arg
            elif command == "mail":
                facts.sender = arg.strip("<>")
            elif command == "rcpt":
                facts.recipient = arg.strip("<>")
            stage = STAGES[command]
            if checks.needs_dns(stage):
                reply = await checks.decide_async(stage, facts, resolver)
            else:
                reply = checks.decide(stage, facts)
            if command == "helo" and reply is not None:
                facts.helo = previous_helo  # a refused HELO name is not kept (Postfix)
            got = "OK" if reply is None else str(reply)
            if got != expected:
                failures.append(f"line {number}: {command} {arg}: got {got!r}, "
                                f"expected {expected!r}")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(play())
    return failures


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_golden(script, tmp_path, request):
    records, blocks = parse(script)
    dns = []
    if records:
        host, port = request.getfixturevalue("dns_server")(records)
        dns = [f'dns_servers = ["{host}:{port}"]', "dns_timeout = 2"]
    assert blocks and all(steps for _, steps in blocks), f"{script.name}: nothing to check"
    failures = []
    for settings, steps in blocks:
        failures += run_block(settings, steps, tmp_path, dns)
    assert not failures, f"{script.name}:\n" + "\n".join(failures)


def test_golden_files_cover_every_restriction():
    """Each restriction named by the issue appears in at least one golden script."""
    text = "\n".join(path.read_text() for path in SCRIPTS)
    for name in ("permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination",
                 "reject_non_fqdn_helo_hostname", "reject_invalid_helo_hostname",
                 "reject_non_fqdn_sender", "reject_non_fqdn_recipient",
                 "reject_unknown_sender_domain", "reject_unknown_recipient_domain",
                 "reject_unlisted_recipient", "check_client_access", "check_helo_access",
                 "check_sender_access", "check_recipient_access", "permit", "reject", "defer",
                 "smtpd_delay_reject", "smtpd_data_restrictions"):
        assert name in text, name
