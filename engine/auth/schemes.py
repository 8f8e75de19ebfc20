"""Password schemes of Dovecot's passwd-file: verify a stored hash, make a new one.

BLF-CRYPT (bcrypt, the ``bcrypt`` package), SHA512-CRYPT (``$6$``: Drepper's SHA-crypt,
written here from its published specification because Python's only implementation is the
``crypt`` module, deprecated since 3.11 and gone in 3.13), ARGON2I / ARGON2ID (``argon2-cffi``),
and PLAIN / CLEARTEXT, which Dovecot reads but Tern never writes. Trusts the stored hashes (the
administrator's file); the password is the client's and is only ever compared, in constant time.
"""

import hashlib
import hmac
import re
import secrets

#: Schemes ``tern passwd`` writes; BLF-CRYPT first, the default (as ``doveadm pw``'s CRYPT).
WRITABLE = ("BLF-CRYPT", "SHA512-CRYPT", "ARGON2ID")
#: Every scheme a passwd-file entry may name in its ``{SCHEME}`` prefix.
READABLE = frozenset({*WRITABLE, "ARGON2I", "PLAIN", "CLEARTEXT", "CRYPT"})

BCRYPT_COST = 10  # 2^10 rounds: ~50 ms a check, as OWASP's minimum
BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; a longer password cannot be stored faithfully

# -- SHA-crypt (https://www.akkadia.org/drepper/SHA-crypt.txt), the SHA-512 variant -------------

SHA_CRYPT_ROUNDS = 5000  # the specification's default (rounds=… is then left out)
_ROUNDS_MIN, _ROUNDS_MAX = 1000, 999_999_999
_SALT_MAX = 16
_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# The specification's byte order for the 64-byte digest: groups of three, then the last byte.
_SHA512_ORDER = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
                 (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
                 (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16),
                 (59, 17, 38), (18, 39, 60), (40, 61, 19), (62, 20, 41))
_SHA512_CRYPT = re.compile(r"\$6\$(?:rounds=([0-9]+)\$)?([^$]*)(?:\$([./0-9A-Za-z]{86}))?")


def _b64_from_24bit(b2: int, b1: int, b0: int, count: int) -> str:
    word = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(count):
        out.append(_CRYPT_ALPHABET[word & 0x3F])
        word >>= 6
    return "".join(out)


def _repeat_to(block: bytes, length: int) -> bytes:
    """``block`` repeated, then cut to ``length`` bytes (the specification's P and S strings)."""
    return (block * (length // len(block) + 1))[:length]


def sha512_crypt(password: bytes, setting: str) -> str:
    """crypt(3) with a ``$6$[rounds=N$]salt[$…]`` setting: the full ``$6$…$hash`` string.

    Follows the specification step by step (its step numbers in the comments); the salt is cut
    to 16 characters and the rounds clamped to [1000, 999999999], as the specification says."""
    m = _SHA512_CRYPT.fullmatch(setting)
    if not m:
        raise ValueError("not a SHA512-CRYPT ($6$) setting")
    rounds_text, salt_text = m.group(1), m.group(2)[:_SALT_MAX]
    rounds = SHA_CRYPT_ROUNDS
    if rounds_text is not None:
        rounds = min(max(int(rounds_text), _ROUNDS_MIN), _ROUNDS_MAX)
    salt = salt_text.encode("utf-8", "surrogateescape")
    key = password
    # steps 4-8: digest B = key salt key
    digest_b = hashlib.sha512(key + salt + key).digest()
    # steps 1-3, 9-12: digest A = key salt, B once per 64 bytes of key, then B or key per bit
    a = hashlib.sha512(key + salt + _repeat_to(digest_b, len(key)))
    length = len(key)
    while length:
        a.update(digest_b if length & 1 else key)
        length >>= 1
    digest_a = a.digest()
    # steps 13-16: P, from the key repeated once per key byte
    p_bytes = _repeat_to(hashlib.sha512(key * len(key)).digest(), len(key)) if key else b""
    # steps 17-20: S, from the salt repeated 16 + A[0] times
    s_bytes = _repeat_to(hashlib.sha512(salt * (16 + digest_a[0])).digest(), len(salt)) \
        if salt else b""
    # step 21: the rounds
    c = digest_a
    for i in range(rounds):
        block = p_bytes if i & 1 else c
        if i % 3:
            block += s_bytes
        if i % 7:
            block += p_bytes
        block += c if i & 1 else p_bytes
        c = hashlib.sha512(block).digest()
    # step 22: the output string
    encoded = "".join(_b64_from_24bit(c[x], c[y], c[z], 4) for x, y, z in _SHA512_ORDER)
    encoded += _b64_from_24bit(0, 0, c[63], 2)
    prefix = f"$6$rounds={rounds}$" if rounds_text is not None else "$6$"
    return f"{prefix}{salt_text}${encoded}"


def _sha512_crypt_salt() -> str:
    return "".join(secrets.choice(_CRYPT_ALPHABET) for _ in range(_SALT_MAX))


# -- the schemes ---------------------------------------------------------------------------


def scheme_of(value: str) -> tuple[str, str]:
    """``{SCHEME}hash`` → (SCHEME, hash). A value without a prefix is Dovecot's default CRYPT,
    resolved here by its crypt(3) prefix. Raises ValueError for an unknown scheme or form."""
    if value.startswith("{"):
        scheme, brace, stored = value[1:].partition("}")
        scheme = scheme.upper()
        if not brace or scheme not in READABLE:
            raise ValueError(f"unknown password scheme {{{scheme}}}")
    else:
        scheme, stored = "CRYPT", value
    if scheme == "CRYPT":
        scheme = _crypt_scheme(stored)
    _check_form(scheme, stored)
    return scheme, stored


def _crypt_scheme(stored: str) -> str:
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        return "BLF-CRYPT"
    if stored.startswith("$6$"):
        return "SHA512-CRYPT"
    if stored.startswith("$argon2id$"):
        return "ARGON2ID"
    if stored.startswith("$argon2i$"):
        return "ARGON2I"
    raise ValueError("no {SCHEME} prefix, and not a bcrypt, $6$ or argon2 crypt hash")


_FORMS = {
    "BLF-CRYPT": re.compile(r"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}"),
    "SHA512-CRYPT": re.compile(r"\$6\$(?:rounds=[0-9]{1,9}\$)?[^$:\s]{0,16}\$[./0-9A-Za-z]{86}"),
    "ARGON2ID": re.compile(r"\$argon2id\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[^$:]+\$[^$:]+"),
    "ARGON2I": re.compile(r"\$argon2i\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[^$:]+\$[^$:]+"),
}


def _check_form(scheme: str, stored: str) -> None:
    form = _FORMS.get(scheme)
    if form is not None and not form.fullmatch(stored):
        raise ValueError(f"malformed {scheme} hash")


def verify(scheme: str, stored: str, password: bytes) -> bool:
    """Does ``password`` match the stored hash? Constant time in the comparison."""
    if scheme in ("PLAIN", "CLEARTEXT"):
        return hmac.compare_digest(stored.encode("utf-8", "surrogateescape"), password)
    if scheme == "SHA512-CRYPT":
        computed = sha512_crypt(password, stored)
        return hmac.compare_digest(computed.encode("utf-8", "surrogateescape"),
                                   stored.encode("utf-8", "surrogateescape"))
    if scheme == "BLF-CRYPT":
        import bcrypt

        # bcrypt uses the first 72 bytes, as crypt(3) does for hashes made elsewhere
        return bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], stored.encode("ascii"))
    if scheme in ("ARGON2ID", "ARGON2I"):
        import argon2

        try:
            return argon2.PasswordHasher().verify(stored, password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    raise ValueError(f"unknown password scheme {scheme}")


def make_hash(scheme: str, password: bytes) -> str:
    """A new ``{SCHEME}hash`` for a passwd-file entry, with a fresh random salt."""
    if scheme == "SHA512-CRYPT":
        stored = sha512_crypt(password, f"$6${_sha512_crypt_salt()}")
    elif scheme == "BLF-CRYPT":
        import bcrypt

        if len(password) > BCRYPT_MAX_BYTES:
            raise ValueError(f"BLF-CRYPT uses only the first {BCRYPT_MAX_BYTES} bytes of a "
                             "password: choose SHA512-CRYPT or ARGON2ID for a longer one")
        stored = bcrypt.hashpw(password, bcrypt.gensalt(BCRYPT_COST)).decode()  # $2b$
    elif scheme == "ARGON2ID":
        import argon2

        stored = argon2.PasswordHasher().hash(password)
    else:
        raise ValueError(f"cannot write password scheme {scheme} (choose from "
                         f"{', '.join(WRITABLE)})")
    return f"{{{scheme}}}{stored}"
