"""Password schemes: SHA-crypt against its specification's vectors and openssl, bcrypt and
argon2 through their libraries, PLAIN; every one refuses a wrong password."""

import secrets
import shutil
import subprocess

import pytest

from engine.auth import schemes

# The SHA-512 test vectors of Drepper's "Unix crypt using SHA-256 and SHA-512" specification.
SPEC_VECTORS = [
    ("$6$saltstring", "Hello world!",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfa"
     "S35inz1"),
    ("$6$rounds=10000$saltstringsaltstring", "Hello world!",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOu"
     "ZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("$6$rounds=5000$toolongsaltstring", "This is just a test",
     "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxd"
     "Ycz/e1JSbq3y6JMxxl8audkUEm0"),
    ("$6$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t"
     "0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
    ("$6$rounds=77777$short", "we have a short salt string but not a short password",
     "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtl"
     "cGZelFl5CxtgfiAc0"),
    ("$6$rounds=123456$asaltof16chars..", "a short string",
     "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK2"
     "5fs2xXgMNrCzIMVcgEJAstJeonj1"),
    ("$6$rounds=10$roundstoolow", "the minimum number is still observed",
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQ"
     "pyUNGc0dqbpBYYBaHHrsX."),
]  # fmt: skip


@pytest.mark.parametrize("setting, key, expected", SPEC_VECTORS)
def test_sha512_crypt_specification_vectors(setting, key, expected):
    assert schemes.sha512_crypt(key.encode(), setting) == expected
    assert schemes.verify("SHA512-CRYPT", expected, key.encode())
    assert not schemes.verify("SHA512-CRYPT", expected, key.encode() + b"x")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("password", ["password", "p\u00e4ss w\u00f6rd:with$signs",
                                      "x" * 200])
def test_sha512_crypt_matches_openssl_passwd_6(password):
    salt = secrets.token_urlsafe(12)[:16].replace("-", ".").replace("_", "/")
    made = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                          input=password + "\n", capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()
    assert made.startswith(f"$6${salt}$")
    assert schemes.sha512_crypt(password.encode(), f"$6${salt}") == made
    assert schemes.verify("SHA512-CRYPT", made, password.encode())


def test_openssl_accepts_what_tern_writes():
    """The other direction: openssl recomputes a hash Tern wrote, from its salt."""
    written = schemes.make_hash("SHA512-CRYPT", b"correct horse")
    stored = written.removeprefix("{SHA512-CRYPT}")
    salt = stored.split("$")[2]
    again = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                           input="correct horse\n", capture_output=True, text=True, timeout=10,
                           check=True).stdout.strip()
    assert again == stored


@pytest.mark.parametrize("scheme", schemes.WRITABLE)
def test_round_trip_and_wrong_password(scheme):
    written = schemes.make_hash(scheme, "s\u00e9cret".encode())
    assert written.startswith(f"{{{scheme}}}")
    parsed_scheme, stored = schemes.scheme_of(written)
    assert parsed_scheme == scheme
    assert schemes.verify(scheme, stored, "s\u00e9cret".encode())
    assert not schemes.verify(scheme, stored, b"secret")
    assert not schemes.verify(scheme, stored, b"")


def test_each_hash_has_its_own_salt():
    assert schemes.make_hash("SHA512-CRYPT", b"x") != schemes.make_hash("SHA512-CRYPT", b"x")
    assert schemes.make_hash("BLF-CRYPT", b"x") != schemes.make_hash("BLF-CRYPT", b"x")


def test_bcrypt_writes_2b_and_reads_2y_as_dovecot_writes_it():
    import bcrypt

    assert schemes.make_hash("BLF-CRYPT", b"pw").startswith("{BLF-CRYPT}$2b$10$")
    made = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    dovecot = made.replace("$2b$", "$2y$", 1)  # doveadm pw -s BLF-CRYPT's form: same algorithm
    assert schemes.scheme_of(dovecot) == ("BLF-CRYPT", dovecot)  # crypt(3) form, no prefix
    assert schemes.verify("BLF-CRYPT", dovecot, b"pw")
    assert not schemes.verify("BLF-CRYPT", dovecot, b"pW")


def test_bcrypt_refuses_to_write_a_password_it_would_truncate():
    with pytest.raises(ValueError, match="72 bytes"):
        schemes.make_hash("BLF-CRYPT", b"x" * 73)


def test_argon2i_hashes_are_read():
    import argon2

    stored = argon2.PasswordHasher(type=argon2.Type.I, memory_cost=1024, time_cost=1).hash("pw")
    assert schemes.scheme_of("{ARGON2I}" + stored) == ("ARGON2I", stored)
    assert schemes.verify("ARGON2I", stored, b"pw")
    assert not schemes.verify("ARGON2I", stored, b"px")


@pytest.mark.parametrize("value, scheme", [
    ("{PLAIN}hunter2", "PLAIN"),
    ("{cleartext}hunter2", "CLEARTEXT"),
])  # fmt: skip
def test_plain_entries_are_read_as_dovecot_does(value, scheme):
    parsed, stored = schemes.scheme_of(value)
    assert (parsed, stored) == (scheme, "hunter2")
    assert schemes.verify(parsed, stored, b"hunter2")
    assert not schemes.verify(parsed, stored, b"hunter")


def test_plain_is_never_written():
    with pytest.raises(ValueError, match="cannot write"):
        schemes.make_hash("PLAIN", b"x")


@pytest.mark.parametrize("value, problem", [
    ("{MD5}abc", "unknown password scheme {MD5}"),
    ("{SHA512-CRYPT", "unknown password scheme"),
    ("$1$abc$def", "no {SCHEME} prefix"),
    ("{SHA512-CRYPT}$6$salt$tooshort", "malformed SHA512-CRYPT hash"),
    ("{BLF-CRYPT}$2y$10$short", "malformed BLF-CRYPT hash"),
    ("{ARGON2ID}$argon2i$v=19$m=1024,t=1,p=1$c2FsdA$aGFzaA", "malformed ARGON2ID hash"),
])  # fmt: skip
def test_unknown_or_malformed_values(value, problem):
    with pytest.raises(ValueError, match=problem.replace("{", r"\{").replace("$", r"\$")):
        schemes.scheme_of(value)
