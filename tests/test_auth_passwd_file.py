"""Dovecot passwd-files: parsing (errors name file:line), lookups, re-reading on change, and
``tern passwd`` writing entries atomically without ever printing the password."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.auth import schemes
from engine.auth.passwd_file import PasswdFileError, PasswordFile, load, parse, set_password

REPO = Path(__file__).resolve().parent.parent
SHA = schemes.sha512_crypt(b"s3cret", "$6$rounds=1000$abcdefgh")  # fast: 1000 rounds


def test_parse_dovecot_lines():
    text = (f"# Tern AUTH users\n\nalice@example.test:{{SHA512-CRYPT}}{SHA}:1000:1000::/home/a::"
            f"userdb_quota_rule=*:storage=1G\n  # indented comment\nbob:{{PLAIN}}pw\r\n"
            f"carol:{SHA}\n")
    entries = parse(text, "passwd")
    assert sorted(entries) == ["alice@example.test", "bob", "carol"]
    assert (entries["alice@example.test"].scheme, entries["alice@example.test"].stored) == (
        "SHA512-CRYPT", SHA)
    assert (entries["bob"].scheme, entries["bob"].stored) == ("PLAIN", "pw")
    assert entries["carol"].scheme == "SHA512-CRYPT"  # no prefix: crypt(3), as Dovecot's CRYPT


@pytest.mark.parametrize("text, line, problem", [
    ("alice:{PLAIN}x\njust-a-name\n", 2, 'expected "user:{SCHEME}hash"'),
    ("# c\n:{PLAIN}x\n", 2, 'expected "user:{SCHEME}hash"'),
    ("alice:\n", 1, "user alice: no password"),
    ("alice::1000:1000\n", 1, "user alice: no password"),
    ("al ice:{PLAIN}x\n", 1, "has spaces or control characters"),
    ("alice:{PLAIN}x\n\nALICE:{PLAIN}y\n", 3, "user ALICE is already on line 1"),
    ("alice:{NTLM}abc\n", 1, "user alice: unknown password scheme {NTLM}"),
    ("alice:{SHA512-CRYPT}$6$x$y\n", 1, "user alice: malformed SHA512-CRYPT hash"),
    ("alice:$1$salt$md5hash\n", 1, "user alice: no {SCHEME} prefix"),
])  # fmt: skip
def test_malformed_lines_name_file_and_line(text, line, problem):
    with pytest.raises(PasswdFileError) as info:
        parse(text, "/etc/tern/passwd")
    assert str(info.value).startswith(f"/etc/tern/passwd:{line}: ")
    assert problem in str(info.value)


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(PasswdFileError, match="missing: cannot read: No such file"):
        load(tmp_path / "missing")
    bad = tmp_path / "passwd"
    bad.write_bytes(b"alice:{PLAIN}x\nb\xe9b:{PLAIN}y\n")
    with pytest.raises(PasswdFileError, match=r"passwd:2: not UTF-8 text"):
        load(bad)


def test_authenticate(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(f"Alice@Example.test:{{SHA512-CRYPT}}{SHA}\nbob:{{PLAIN}}pw\n")
    table = PasswordFile(path)
    assert table.authenticate("alice@example.test", b"s3cret") == "Alice@Example.test"
    assert table.authenticate("ALICE@EXAMPLE.TEST", b"s3cret") == "Alice@Example.test"
    assert table.authenticate("alice@example.test", b"S3cret") is None
    assert table.authenticate("bob", b"pw") == "bob"
    assert table.authenticate("nobody", b"pw") is None


def test_a_changed_file_is_read_again_and_a_broken_change_keeps_the_old_table(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("bob:{PLAIN}old\n")
    table = PasswordFile(path)
    assert table.authenticate("bob", b"old") == "bob"
    set_password(path, "bob", "{PLAIN}new")
    assert table.authenticate("bob", b"new") == "bob"
    assert table.authenticate("bob", b"old") is None
    path.write_text("bob:{PLAIN}newer\nbroken line\n")
    assert table.authenticate("bob", b"new") == "bob"  # the last good table
    assert table.take_reload_error() == f"{path}:2: expected \"user:{{SCHEME}}hash\""
    assert table.take_reload_error() is None  # reported once


def test_set_password_adds_replaces_and_keeps_the_rest(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("# users\nalice:{PLAIN}a:1000:1000::/home/alice::\n\nbob:{PLAIN}b\n")
    os.chmod(path, 0o640)
    assert set_password(path, "ALICE", "{PLAIN}A") is True
    assert set_password(path, "carol", "{PLAIN}c") is False
    assert path.read_text() == ("# users\nalice:{PLAIN}A:1000:1000::/home/alice::\n\n"
                                "bob:{PLAIN}b\ncarol:{PLAIN}c\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # an existing file keeps its mode
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # no temporary file left


def test_set_password_creates_a_private_file(tmp_path):
    path = tmp_path / "passwd"
    set_password(path, "alice", "{PLAIN}a")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == "alice:{PLAIN}a\n"


@pytest.mark.parametrize("name", ["", "a:b", "a b", "#alice", "a\tb"])
def test_set_password_refuses_names_a_line_cannot_hold(tmp_path, name):
    with pytest.raises(ValueError, match="bad user name"):
        set_password(tmp_path / "passwd", name, "{PLAIN}x")
    assert not (tmp_path / "passwd").exists()


def test_set_password_refuses_a_file_that_does_not_parse(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("garbage\n")
    with pytest.raises(PasswdFileError, match="passwd:1:"):
        set_password(path, "alice", "{PLAIN}a")
    assert path.read_text() == "garbage\n"


# -- tern passwd -------------------------------------------------------------------------------


def tern_passwd(*args: str, password: str = "", config: Path | None = None):
    command = [sys.executable, "-m", "engine", "passwd", *args]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(command, cwd=REPO, input=password, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("scheme", schemes.WRITABLE)
def test_tern_passwd_writes_an_entry_that_verifies(tmp_path, scheme):
    path = tmp_path / "passwd"
    done = tern_passwd("--scheme", scheme, "--file", str(path), "alice@example.test",
                       password="correct horse\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"added alice@example.test in {path} ({scheme})\n"
    assert "correct horse" not in done.stdout + done.stderr
    assert "correct horse" not in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    table = PasswordFile(path)
    assert table.authenticate("alice@example.test", b"correct horse") == "alice@example.test"
    assert table.authenticate("alice@example.test", b"correct horse\n") is None


def test_tern_passwd_uses_the_configured_file_and_replaces(tmp_path):
    path = tmp_path / "passwd"
    config = tmp_path / "tern.toml"
    config.write_text(f'smtpd_sasl_password_file = "{path}"\n')
    path.write_text("bob:{PLAIN}x\n")
    assert tern_passwd("--scheme", "SHA512-CRYPT", "bob", password="new pw\n",
                       config=config).returncode == 0
    assert load(path)["bob"].scheme == "SHA512-CRYPT"
    assert PasswordFile(path).authenticate("bob", b"new pw") == "bob"


@pytest.mark.parametrize("args, password, message", [
    (("alice",), "pw\n", "name the password file"),
    (("--file", "PATH", "alice"), "\n", "tern: passwd: empty password"),
    (("--file", "PATH", "a:b"), "pw\n", "tern: passwd: bad user name"),
    (("--file", "PATH", "--scheme", "PLAIN", "alice"), "pw\n", "invalid choice"),
])  # fmt: skip
def test_tern_passwd_errors(tmp_path, args, password, message):
    path = tmp_path / "passwd"
    args = tuple(str(path) if arg == "PATH" else arg for arg in args)
    done = tern_passwd(*args, password=password)
    assert done.returncode in (1, 2)
    assert message in done.stderr
    assert not path.exists()


def test_an_unknown_user_costs_a_hash_check_like_a_known_one(tmp_path, monkeypatch):
    """So that timing does not tell which names exist: the check runs against an entry."""
    path = tmp_path / "passwd"
    path.write_text(f"bob:{{SHA512-CRYPT}}{SHA}\n")
    table = PasswordFile(path)
    checked = []
    real_verify = schemes.verify
    monkeypatch.setattr(schemes, "verify",
                        lambda *args: checked.append(args[:2]) or real_verify(*args))
    assert table.authenticate("nobody", b"s3cret") is None
    assert checked == [("SHA512-CRYPT", SHA)]
