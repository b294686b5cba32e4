"""Stored SCRAM-SHA-256 credentials of the proxy's own users (never plain passwords).

The configuration holds, per user, the PostgreSQL-style stored form::

    SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>

which is everything a SCRAM server needs (RFC 5802 section 3) and nothing from which the
password can be recovered short of a brute-force search. ``mongoproxy hash-password``
prints it (:func:`hash_password`).

The keys are MongoDB's SCRAM-SHA-256 keys: ``SaltedPassword = PBKDF2-HMAC-SHA-256(
SASLprep(password), salt, iterations)`` on the SASLprep'd plain password (RFC 7677),
unlike MongoDB's SCRAM-SHA-1, which hashes the MD5 digest ``user:mongo:password``. So a
driver given the same password (pymongo SASLpreps it the same way) proves knowledge of
it against these keys. Key derivation and SASLprep are ``scramp``'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass, field

from scramp import ScramException, ScramMechanism

MECHANISM = "SCRAM-SHA-256"
PREFIX = MECHANISM + "$"
#: MongoDB's default ``scramIterationCount`` for SCRAM-SHA-256.
DEFAULT_ITERATIONS = 15000
#: The lowest count drivers accept for SCRAM-SHA-256 (pymongo refuses less; so does scramp).
MIN_ITERATIONS = 4096
#: An upper bound against configuration mistakes (and scramp's own DoS guard).
MAX_ITERATIONS = 10_000_000
#: scramp refuses shorter salts; RFC 5802 wants them random and unique per user.
MIN_SALT_BYTES = 12
#: MongoDB's SCRAM-SHA-256 salt length.
DEFAULT_SALT_BYTES = 28
KEY_BYTES = hashlib.sha256().digest_size  # 32

FORMAT = f"{PREFIX}<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>"


class CredentialError(ValueError):
    """A stored credential that cannot be used; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """The server-side secrets of one SCRAM-SHA-256 user (keys left out of ``repr``)."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> StoredCredential:
        return parse(text)

    def __str__(self) -> str:
        return (
            f"{PREFIX}{self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    def auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        """``(salt, stored_key, server_key, iterations)``: what scramp's ``auth_fn`` returns."""
        return self.salt, self.stored_key, self.server_key, self.iterations


def parse(text: str) -> StoredCredential:
    """Parse the stored form strictly; raises CredentialError saying what is wrong.

    Strict means: the exact ``SCRAM-SHA-256$`` prefix, a decimal iteration count within
    [4096, 10000000] without sign or leading zero, canonical padded base64 everywhere, a
    salt of at least 12 bytes and keys of exactly 32 bytes. Never echoes the keys.
    """
    if not isinstance(text, str):
        raise CredentialError(f"a stored credential must be a string, not {type(text).__name__}")
    if not text.startswith(PREFIX):
        mechanism = text.split("$", 1)[0] if "$" in text else None
        if mechanism:
            raise CredentialError(
                f"mechanism {mechanism!r} is not supported: expected {FORMAT} "
                "(from `mongoproxy hash-password`)"
            )
        raise CredentialError(
            f"not a stored credential: expected {FORMAT} (from `mongoproxy hash-password`); "
            "plain passwords are not accepted"
        )
    parts = text[len(PREFIX):].split("$")
    if len(parts) != 2:
        raise CredentialError(f"expected exactly three '$'-separated parts: {FORMAT}")
    salt_part, keys_part = parts
    iterations_text, sep, salt_text = salt_part.partition(":")
    if not sep:
        raise CredentialError(f"missing ':' between iterations and salt: {FORMAT}")
    stored_text, sep, server_text = keys_part.partition(":")
    if not sep:
        raise CredentialError(f"missing ':' between StoredKey and ServerKey: {FORMAT}")
    iterations = _iterations(iterations_text)
    salt = _b64decode(salt_text, "salt")
    if len(salt) < MIN_SALT_BYTES:
        raise CredentialError(
            f"salt is {len(salt)} bytes; at least {MIN_SALT_BYTES} are required"
        )
    stored_key = _b64decode(stored_text, "StoredKey")
    server_key = _b64decode(server_text, "ServerKey")
    for name, key in (("StoredKey", stored_key), ("ServerKey", server_key)):
        if len(key) != KEY_BYTES:
            raise CredentialError(
                f"{name} is {len(key)} bytes; SCRAM-SHA-256 keys are {KEY_BYTES} bytes"
            )
    return StoredCredential(iterations, salt, stored_key, server_key)


def hash_password(
    password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """The stored form for ``password`` (SASLprep'd, as MongoDB does for SCRAM-SHA-256).

    ``salt`` defaults to 28 random bytes. Raises ValueError for an empty password, one
    that SASLprep prohibits (control characters, unassigned code points...), an
    iteration count out of range or a salt shorter than 12 bytes.
    """
    if not isinstance(password, str):
        raise TypeError("password must be a str")
    if password == "":
        raise ValueError("the password is empty")
    _check_iterations(iterations)
    if salt is None:
        salt = secrets.token_bytes(DEFAULT_SALT_BYTES)
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(f"salt is {len(salt)} bytes; at least {MIN_SALT_BYTES} are required")
    try:
        info = ScramMechanism(MECHANISM).make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
    except ScramException as exc:  # SASLprep refused the password
        raise ValueError(f"the password cannot be used with {MECHANISM}: {exc}") from None
    salt_out, stored_key, server_key, iterations_out = info
    return str(StoredCredential(int(iterations_out), bytes(salt_out), bytes(stored_key),
                                bytes(server_key)))


def _iterations(text: str) -> int:
    if not text or not (text.isascii() and text.isdigit()):
        raise CredentialError(
            f"iterations {text!r} is not a decimal number: {FORMAT}"
        )
    if text[0] == "0":
        raise CredentialError(f"iterations {text!r} must not start with 0")
    value = int(text)
    try:
        _check_iterations(value)
    except ValueError as exc:
        raise CredentialError(str(exc)) from None
    return value


def _check_iterations(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("iterations must be an integer")
    if not MIN_ITERATIONS <= value <= MAX_ITERATIONS:
        raise ValueError(
            f"iterations {value} out of range [{MIN_ITERATIONS}, {MAX_ITERATIONS}] "
            "(drivers refuse fewer than 4096 for SCRAM-SHA-256)"
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    if not text:
        raise CredentialError(f"{what} is empty")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise CredentialError(f"{what} is not valid base64") from None
    if _b64(data) != text:
        raise CredentialError(f"{what} is not canonical padded base64")
    return data
