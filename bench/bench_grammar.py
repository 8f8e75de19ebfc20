"""Compiled vs pure SMTP command grammar on a realistic mix of MAIL FROM / RCPT TO lines.

Run: pytest bench/bench_grammar.py --benchmark-enable -p no:cacheprovider (see bench/README.md).
Each group holds the two twins side by side. One round parses every line of the mix the way
server._command does: split_command, then parse_mail_from or parse_rcpt_to on the argument.
"""

import random

from engine.smtp.grammar import GrammarError


def command_mix(count=1000):
    """Per transaction one MAIL and 1–5 RCPT, as bulk senders write them: parameters on most
    lines, a null sender now and then, a quoted local part or an address literal rarely, and
    one line in fifty malformed."""
    rng = random.Random(5321)
    domains = ["example.com", "mail.example.org", "news-letters.example.net", "eu.example.co.uk"]
    lines = []
    while len(lines) < count:
        n = len(lines)
        tag = rng.randrange(10**6)
        sender = "<>" if n % 20 == 0 else f"<bounce+{n}-{tag}@{rng.choice(domains)}>"
        lines.append(f"MAIL FROM:{sender} SIZE={rng.randrange(500, 90000)} BODY=8BITMIME"
                     + (f" RET=HDRS ENVID=QQ{n}" if n % 3 == 0 else ""))
        for r in range(rng.randrange(1, 6)):
            local = rng.choice(["first.last{}", "user{}", "info{}", "j.doe+list{}", '"john {}"'])
            domain = "[192.0.2.7]" if rng.random() < 0.02 else rng.choice(domains)
            mailbox = f"{local.format(r)}@{domain}"
            params = ""
            if rng.random() < 0.3:  # ORCPT is xtext: a space is +20
                params = " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;" + mailbox.replace(" ", "+20")
            lines.append(f"RCPT TO:<{mailbox}>{params}")
        if rng.random() < 0.2:
            lines.append("RCPT TO:<no domain>" if rng.random() < 0.5 else "MAIL FROM:<a@b> X_Y=1")
    return [line.encode() for line in lines[:count]]


def parse_all(module, lines):
    split_command, mail, rcpt = module.split_command, module.parse_mail_from, module.parse_rcpt_to
    parsed = errors = 0
    for line in lines:
        verb, arg = split_command(line)
        try:
            mail(arg) if verb == "MAIL" else rcpt(arg)
            parsed += 1
        except GrammarError:
            errors += 1
    return parsed, errors


def test_mail_and_rcpt_lines(benchmark, twin):
    lines = command_mix()
    benchmark.group = "1,000 MAIL/RCPT lines: split_command + parse_mail_from/parse_rcpt_to"
    parsed, errors = benchmark(parse_all, twin("grammar"), lines)
    assert parsed + errors == len(lines) and 0 < errors < len(lines) // 10


def test_split_command_only(benchmark, twin):
    lines = command_mix()
    benchmark.group = "1,000 MAIL/RCPT lines: split_command"
    split_command = twin("grammar").split_command
    benchmark(lambda: [split_command(line) for line in lines])
