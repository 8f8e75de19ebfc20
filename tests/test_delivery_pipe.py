"""The pipe delivery agent with real /bin/sh scripts: argv macros, sysexits, output, time limit,
and the user the command runs as."""

import asyncio
import gc
import os
import pwd
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import uvloop

from engine.config import Config, ConfigError, load_config
from engine.config.settings import PipeTransport
from engine.delivery import DeliveryRequest, NextHop, TransientFailure
from engine.delivery import pipe as pipe_agent
from engine.delivery.agents import build_agents, service_name
from engine.delivery.route import nexthop_for
from engine.dns import Resolver

CONTENT = b"Subject: piped\r\n\r\nbody line\r\n"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def world():
    """A 0755 directory the pipe user (nobody, when root) can reach and write in."""
    path = Path(tempfile.mkdtemp(prefix="tern-pipe-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def script(world: Path, body: str) -> str:
    path = world / "command.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def deliver(world, body, argv_tail=(), recipients=("u1+ext@example.test",), time_limit=10.0,
            user="nobody"):
    command = script(world, body)
    transport = PipeTransport((command, *argv_tail), user, time_limit)
    config = Config(myhostname="mx.example.test", recipient_delimiter="+")
    request = DeliveryRequest("4PipeQ", "sender@example.org", list(recipients), CONTENT,
                              NextHop("filter", "example.test", 0, False))
    return run(pipe_agent.deliver(request, config, "filter", transport))


def test_exit_0_is_sent_with_macros_expanded(world):
    out = world / "out"
    outcome = deliver(world, f'printf "%s|" "$@" > {out}\ncat > {out}.msg\nid -u > {out}.uid\n',
                      ("-f", "${sender}", "${nexthop}", "--", "${recipient}", "${user}",
                       "${extension}", "${domain}", "${mailbox}", "q=${queue_id}"),
                      recipients=("u1+ext@example.test", "u2@Example.test"))
    assert [(r.recipient, r.status, r.dsn, r.reply, r.relay) for r in outcome.results] == [
        ("u1+ext@example.test", "sent", "2.0.0", "delivered via filter service", "filter"),
        ("u2@Example.test", "sent", "2.0.0", "delivered via filter service", "filter")]
    assert out.read_text().split("|")[:-1] == [
        "-f", "sender@example.org", "example.test", "--",
        "u1+ext@example.test", "u2@Example.test", "u1", "u2", "ext", "",
        "example.test", "example.test", "u1+ext", "u2", "q=4PipeQ"]
    assert (world / "out.msg").read_bytes() == CONTENT.replace(b"\r\n", b"\n")
    uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
    assert int((world / "out.uid").read_text()) == uid


def test_the_command_takes_its_user_under_uvloop_too(world):
    """tern serve runs on uvloop, whose subprocess has no user/group arguments: the identity
    is taken in the child all the same (nobody when root, else Tern's own user)."""
    out = world / "ids"
    command = script(world, f"id -u > {out}; id -G >> {out}\n")
    request = DeliveryRequest("4PipeU", "sender@example.org", ["u@example.test"], CONTENT,
                              NextHop("filter", "example.test", 0, False))
    outcome = uvloop.run(pipe_agent.deliver(request, Config(), "filter",
                                            PipeTransport((command,), "nobody", 10.0)))
    assert outcome.results[0].status == "sent"
    nobody = pwd.getpwnam("nobody")
    expected = ([str(nobody.pw_uid), str(nobody.pw_gid)] if os.geteuid() == 0
                else [str(os.getuid()), " ".join(str(g) for g in os.getgroups())])
    uid, groups = out.read_text().splitlines()
    assert uid == expected[0] and (os.geteuid() != 0 or groups == expected[1])


def test_exit_75_defers_with_the_command_output(world):
    (result,) = deliver(world, "cat >/dev/null\necho 'mailbox busy' >&2\nexit 75\n").results
    assert (result.status, result.dsn, result.reply) == (
        "deferred", "4.3.0", "temporary failure. Command output: mailbox busy")


# Postfix's sys_exits table (global/sys_exits.c): every sysexits(3) code
@pytest.mark.parametrize("code, status, dsn, text", [
    (64, "bounced", "5.3.0", "command line usage error"),
    (65, "bounced", "5.6.0", "data format error"),
    (66, "bounced", "5.3.0", "cannot open input"),
    (67, "bounced", "5.1.1", "user unknown"),
    (68, "bounced", "5.1.2", "host name unknown"),
    (69, "bounced", "5.3.0", "service unavailable"),
    (70, "bounced", "5.3.0", "internal software error"),
    (71, "deferred", "4.3.0", "system resource problem"),
    (72, "bounced", "5.3.0", "critical OS file missing"),
    (73, "bounced", "5.2.0", "can't create user output file"),
    (74, "bounced", "5.3.0", "input/output error"),
    (75, "deferred", "4.3.0", "temporary failure"),
    (76, "bounced", "5.5.0", "remote error in protocol"),
    (77, "bounced", "5.7.0", "permission denied"),
    (78, "bounced", "5.3.5", "local configuration error"),
])
def test_sysexits_decide_with_their_meaning(world, code, status, dsn, text):
    (result,) = deliver(world, f"cat >/dev/null\necho no such box\nexit {code}\n").results
    assert (result.status, result.dsn, result.reply) == (
        status, dsn, f"{text}. Command output: no such box")


@pytest.mark.parametrize("body, status, dsn, text", [
    ("echo '5.2.2 mailbox full'\nexit 75\n", "bounced", "5.2.2", "mailbox full"),
    ("echo '4.2.1 try later please'\nexit 1\n", "deferred", "4.2.1", "try later please"),
    ("echo '5.1.1'\nexit 67\n", "bounced", "5.1.1", "Command died with status 67: \"{}\""),
    ("echo '5.1.10x not a status'\nexit 67\n", "bounced", "5.1.1",
     "user unknown. Command output: 5.1.10x not a status"),
    ("echo '2.0.0 fine'\nexit 1\n", "bounced", "5.3.0",
     "Command died with status 1: \"{}\". Command output: 2.0.0 fine"),
])
def test_command_output_starting_with_a_status_code_decides(world, body, status, dsn, text):
    """Postfix's pipe(8): after a non-zero exit, output in the form "D.S.N text" gives the
    status (4 defers, 5 bounces) and the reason."""
    (result,) = deliver(world, "cat >/dev/null\n" + body).results
    assert (result.status, result.dsn, result.reply) == (
        status, dsn, text.format(world / "command.sh"))


def test_other_exit_status_bounces(world):
    command = script(world, "echo 'line one'\nprintf 'two\\tthree\\n'\nexit 1\n")
    transport = PipeTransport((command,), "nobody", 10.0)
    request = DeliveryRequest("4Q", "", ["a@example.test"], CONTENT,
                              NextHop("filter", "example.test", 0, False))
    (result,) = run(pipe_agent.deliver(request, Config(), "filter", transport)).results
    assert (result.status, result.dsn, result.reply) == (
        "bounced", "5.3.0", f'Command died with status 1: "{command}". '
                            "Command output: line one two three")


def test_command_not_reading_its_input_still_decides(world):
    big = CONTENT + b"x" * 1_000_000
    command = script(world, "exit 0\n")
    request = DeliveryRequest("4Q", "", ["a@example.test"], big,
                              NextHop("filter", "example.test", 0, False))
    (result,) = run(pipe_agent.deliver(request, Config(), "filter",
                                       PipeTransport((command,), "nobody", 10.0))).results
    assert result.status == "sent"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_command_output_is_kept_bounded_and_the_rest_drained(loop):
    """50 MB of output: only the first OUTPUT_LIMIT bytes are kept (memory does not grow
    with what a command prints), the rest is read and dropped, and its exit status still
    decides."""
    argv = ["/bin/sh", "-c", "cat >/dev/null; head -c 50000000 /dev/zero | tr '\\0' x; exit 3"]
    runner = asyncio.run if loop == "asyncio" else uvloop.run
    status, output = runner(pipe_agent.run_command(argv, b"message\n" * 1000,
                                                   {"PATH": "/usr/bin:/bin"}, {}, 60.0))
    assert (status, output) == (3, b"x" * pipe_agent.OUTPUT_LIMIT)


def test_time_limit_defers_and_kills_the_command(world):
    marker = world / "alive"
    with pytest.raises(TransientFailure) as caught:
        deliver(world, f"sleep 30 &\necho $! > {marker}\nwait\n", time_limit=0.5)
    assert caught.value.dsn == "4.3.0"
    assert caught.value.text.startswith("Command time limit exceeded:")
    # the whole process group got SIGKILL: the sleep ends too
    assert ended(int(marker.read_text())), "the command's child survived the time limit"


def ended(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie, waiting up to ~2 s for a SIGKILL to land."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ")[1].startswith(("Z", "X")):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_time_limit_kills_the_group_even_when_the_shell_has_exited(world, loop, monkeypatch):
    """``echo hi; sleep 30 & exit 0``: the shell is gone when the limit fires but its child
    holds the output open; the whole group is still killed and the pipes closed, with nothing
    left to a closed loop (no "Event loop is closed" when they are collected)."""
    marker = world / "sleeper"
    argv = ["/bin/sh", "-c", f"sleep 30 & echo $! > {marker}; echo hi; exit 0"]
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    runner = asyncio.run if loop == "asyncio" else uvloop.run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _ = runner(pipe_agent.run_command(argv, b"x\n", {"PATH": "/usr/bin:/bin"}, {},
                                                  0.5))
        gc.collect()
    assert status is None
    assert ended(int(marker.read_text())), "the shell's child survived the time limit"
    assert [str(u.exc_value) for u in unraisable] == []
    assert [str(w.message) for w in caught if "closed" in str(w.message)
            or issubclass(w.category, ResourceWarning)] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as another user")
def test_the_working_directory_is_entered_with_the_commands_rights(world):
    """The cwd is entered after the identity is taken: a directory only root can reach is
    not the command's cwd ("/" instead, as Postfix's command.c); one the user can reach is."""
    nobody = pwd.getpwnam("nobody")
    private = world / "private"
    private.mkdir(mode=0o700)
    reachable = world / "open"
    reachable.mkdir(mode=0o755)

    def cwd_of(directory):
        identity = {"user": nobody.pw_uid, "group": nobody.pw_gid, "cwd": str(directory)}
        status, output = asyncio.run(pipe_agent.run_command(
            ["/bin/sh", "-c", "pwd"], b"", {"PATH": "/usr/bin:/bin"}, identity, 10.0))
        assert status == 0
        return output.decode().strip()

    assert cwd_of(private) == "/"
    assert cwd_of(reachable) == str(reachable)
    assert cwd_of(world / "missing") == "/"


def test_cancelled_delivery_kills_and_reaps_the_command_group(world):
    """The delivery task cancelled (the queue manager stopping): the command and what it
    started are killed, and the command reaped, before the cancellation goes on."""
    pids = world / "pids"
    command = script(world, f"sleep 30 &\necho $$ $! > {pids}\nwait\n")
    request = DeliveryRequest("4Q", "s@example.org", ["a@example.test"], CONTENT,
                              NextHop("filter", "example.test", 0, False))

    async def scenario():
        task = asyncio.create_task(pipe_agent.deliver(
            request, Config(), "filter", PipeTransport((command,), "nobody", 60.0)))
        for _ in range(500):
            if pids.exists() and pids.read_text().endswith("\n"):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        shell, sleeper = map(int, pids.read_text().split())
        with pytest.raises(ChildProcessError):
            os.waitpid(shell, os.WNOHANG)  # already reaped
        return shell, sleeper

    shell, sleeper = asyncio.run(scenario())
    assert ended(shell) and ended(sleeper)


def test_pipe_transport_from_config_and_transport_maps(tmp_path, world):
    command = script(world, "cat >/dev/null\n")
    path = tmp_path / "tern.toml"
    path.write_text(f'[transport_maps]\n"lists.example.test" = "mailman:"\n'
                    f'[pipe_transports.mailman]\nargv = ["{command}", "${{recipient}}"]\n'
                    f'user = "nobody"\ntime_limit = "30s"\n')
    config = load_config(path)
    hop = nexthop_for("lists.example.test", config)
    assert hop == NextHop("mailman", "lists.example.test", 0, False)
    agents = build_agents(config, Resolver(config))
    assert service_name("mailman", config) == "pipe"
    request = DeliveryRequest("4Q", "s@x.test", ["l@lists.example.test"], CONTENT, hop)
    (result,) = run(agents["mailman"](request)).results
    assert (result.status, result.reply, result.relay) == (
        "sent", "delivered via mailman service", "mailman")
    path.write_text(f'[pipe_transports.mailman]\nargv = ["{command}", "${{recipeint}}"]\n'
                    f'user = "nobody"\n')
    with pytest.raises(ConfigError, match=r"unknown macro \$\{recipeint\}"):
        load_config(path)


def test_flags_add_headers_and_run_once_per_recipient_with_D(world):
    out = world / "out"
    command = script(world, f'cat >> {out}\necho "argv:$1" >> {out}\n')
    transport = PipeTransport((command, "${recipient}"), "nobody", 10.0, "FRDhu>.B")
    request = DeliveryRequest("4Q", "s@x.test", ["Ann@EXAMPLE.test", "bob@example.test"],
                              b"Subject: f\r\n\r\nFrom here\r\n.dot\r\n",
                              NextHop("lda", "example.test", 0, False))
    outcome = run(pipe_agent.deliver(request, Config(), "lda", transport))
    assert [r.status for r in outcome.results] == ["sent", "sent"]
    text = out.read_text()
    first, second = text.split("argv:ann@example.test\n")
    assert first.startswith("From s@x.test  ")
    assert first.split("\n", 1)[1] == ("Return-Path: <s@x.test>\nDelivered-To: Ann@EXAMPLE.test\n"
                                       "Subject: f\n\n>From here\n..dot\n\n")
    assert "Delivered-To: bob@example.test\n" in second
    assert second.endswith("argv:bob@example.test\n")


def test_without_flags_the_message_goes_as_it_is(world):
    out = world / "out"
    command = script(world, f"cat > {out}\n")
    transport = PipeTransport((command,), "nobody", 10.0)
    request = DeliveryRequest("4Q", "s@x.test", ["a@example.test", "b@example.test"],
                              b"Subject: f\r\n\r\nFrom here\r\n.dot\r\n",
                              NextHop("p", "example.test", 0, False))
    assert [r.status for r in run(pipe_agent.deliver(request, Config(), "p",
                                                     transport)).results] == ["sent", "sent"]
    assert out.read_bytes() == b"Subject: f\n\nFrom here\n.dot\n"


def _argv_run(world, sender, recipients):
    """Run a command that records its argv (one per line) for ``recipients``."""
    out = world / "argv"
    command = script(world, f'printf "%s\\n" "$@" > {out}\ncat >/dev/null\n')
    transport = PipeTransport((command, "-f", "${sender}", "--", "${recipient}"), "nobody", 10.0)
    request = DeliveryRequest("4Q", sender, list(recipients), CONTENT,
                              NextHop("filter", "example.test", 0, False))
    outcome = run(pipe_agent.deliver(request, Config(), "filter", transport))
    argv = out.read_text().splitlines() if out.exists() else None
    return [(r.recipient, r.status, r.dsn, r.reply) for r in outcome.results], argv


def test_recipient_starting_with_a_dash_never_reaches_the_command_line(world):
    """Postfix's allow_min_user = no where it cannot be bypassed: "-C/tmp/evil.cf@x" would read
    as an option. It bounces (5.1.3); the others of the request are delivered."""
    results, argv = _argv_run(world, "s@example.org",
                              ["a@example.test", "-C/tmp/evil.cf@example.test", "b@example.test"])
    assert results == [
        ("a@example.test", "sent", "2.0.0", "delivered via filter service"),
        ("-C/tmp/evil.cf@example.test", "bounced", "5.1.3", "bad address syntax"),
        ("b@example.test", "sent", "2.0.0", "delivered via filter service")]
    assert argv == ["-f", "s@example.org", "--", "a@example.test", "b@example.test"]
    (world / "argv").unlink()
    results, argv = _argv_run(world, "s@example.org", ["-oQ/tmp@example.test"])
    assert results == [("-oQ/tmp@example.test", "bounced", "5.1.3", "bad address syntax")]
    assert argv is None


def test_sender_starting_with_a_dash_runs_no_command(world):
    results, argv = _argv_run(world, "-X/tmp/log@example.org", ["a@example.test"])
    assert results == [("a@example.test", "bounced", "5.1.7", "bad sender address syntax")]
    assert argv is None


def test_null_sender_expands_to_mailer_daemon(world):
    results, argv = _argv_run(world, "", ["a@example.test"])
    assert results == [("a@example.test", "sent", "2.0.0", "delivered via filter service")]
    assert argv == ["-f", "MAILER-DAEMON", "--", "a@example.test"]
