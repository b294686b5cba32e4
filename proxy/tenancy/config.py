"""Tenancy configuration (mounted as ``Config.tenancy``).

```yaml
tenancy:
  field: tenant_id
  mode: enforce            # enforce | audit | inject | off (default off)
  collections: ["*"]       # tenant-scoped collections (names or globs)
  exempt: ["tenants", "system.*", "admin.*", "config.*", "local.*"]
  users:
    - {username: acme_app, password_sha256: "SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>",
       tenant: acme}
    - {username: ops_admin, password_sha256: "...", tenant: "*"}
```

**Namespace patterns** (``collections``, ``exempt``): ``|``-free shell globs (``*`` any
run of characters, ``?`` one character, ``[abc]`` a set), case-sensitive like MongoDB
names. A pattern matches a namespace when it matches *either* the collection name alone
(``tasks``, ``system.*``) *or* the full ``db.collection`` (``admin.*``,
``acme.tasks``). So ``admin.*`` also matches a collection literally named ``admin.x``
in any database, and ``system.*`` every ``system.`` collection of every database.
``exempt`` wins over ``collections``. Whatever the lists say, collections of the
``admin``, ``config`` and ``local`` databases and every ``system.*`` collection are
*operator-only* (see ``proxy.tenancy.policy``).

**Field**: a top-level field name (no dots, no ``$`` prefix, no NUL): the policy
reasons about top-level equality only.

**Users**: ``password_sha256`` is the stored SCRAM-SHA-256 credential, in PostgreSQL's
format ``SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>``
(shape validated here; ``proxy.identity`` parses it). ``tenant: "*"`` is the superuser
identity: it may cross tenants (its commands are not checked; the caller audits them).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SCRAM_SHA256_STORED",
    "SUPERUSER_TENANT",
    "NamespacePatterns",
    "TenancyConfig",
    "TenancyMode",
    "UserConfig",
]

SUPERUSER_TENANT = "*"
TenancyMode = Literal["enforce", "audit", "inject", "off"]

# SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>  (PostgreSQL's format)
_B64 = r"[A-Za-z0-9+/]+={0,2}"
SCRAM_SHA256_STORED = re.compile(
    rf"SCRAM-SHA-256\$(?P<iterations>[1-9][0-9]{{0,9}}):(?P<salt>{_B64})"
    rf"\$(?P<stored_key>{_B64}):(?P<server_key>{_B64})\Z"
)
_MIN_ITERATIONS = 4096
_FIELD = re.compile(r"[^.$\x00][^.\x00]*\Z")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


class UserConfig(_Strict):
    """A proxy-side identity: SCRAM-SHA-256 stored credential and the tenant it is bound to."""

    username: str = Field(min_length=1)  # the name clients authenticate with
    # The stored credential printed by `mongoproxy hash-password`, never a password.
    password_sha256: str
    tenant: str = Field(min_length=1)  # the tenant it is bound to; "*" may cross tenants

    @field_validator("password_sha256")
    @classmethod
    def _stored_credential(cls, value: str) -> str:
        m = SCRAM_SHA256_STORED.match(value)
        if m is None:
            raise ValueError(
                "expected a stored SCRAM-SHA-256 credential "
                "'SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>' "
                "(print one with `mongoproxy hash-password`), not a password"
            )
        if int(m["iterations"]) < _MIN_ITERATIONS:
            raise ValueError(f"iterations must be at least {_MIN_ITERATIONS}")
        try:
            salt, stored, server = (_b64(m[k]) for k in ("salt", "stored_key", "server_key"))
        except (binascii.Error, ValueError):
            raise ValueError("salt, StoredKey and ServerKey must be valid base64") from None
        if not salt:
            raise ValueError("the salt is empty")
        if len(stored) != 32 or len(server) != 32:
            raise ValueError("StoredKey and ServerKey must be 32 bytes (SHA-256) each")
        return value

    @property
    def is_superuser(self) -> bool:
        return self.tenant == SUPERUSER_TENANT


class NamespacePatterns:
    """Compiled ``collections``/``exempt`` patterns (see the module docstring)."""

    __slots__ = ("_exact", "_match", "source")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        exact: set[str] = set()
        globs: list[str] = []
        for p in patterns:
            if frozenset("*?[").intersection(p):
                globs.append(fnmatch.translate(p))
            else:
                exact.add(p)
        self._exact = frozenset(exact)
        self._match = re.compile("|".join(f"(?:{g})" for g in globs)).match if globs else None
        self.source = patterns

    def __call__(self, db: str, coll: str) -> bool:
        if coll in self._exact:
            return True
        ns = f"{db}.{coll}"
        if ns in self._exact:
            return True
        m = self._match
        return m is not None and (m(coll) is not None or m(ns) is not None)


class TenancyConfig(_Strict):
    """Tenant isolation: every command on a scoped collection confined to one tenant."""

    field: str = "tenant_id"  # the top-level field that names a document's tenant
    # enforce: refuse what is not provably confined; audit: log and count only;
    # inject: add the condition for connections bound to a tenant; off.
    mode: TenancyMode = "off"
    collections: tuple[str, ...] = ("*",)  # scoped collections: names or globs
    # Readable by everyone, writable by "*" users only; wins over collections.
    exempt: tuple[str, ...] = ("tenants", "system.*", "admin.*", "config.*", "local.*")
    users: tuple[UserConfig, ...] = ()  # proxy-side SCRAM-SHA-256 identities

    @field_validator("field")
    @classmethod
    def _top_level_field(cls, value: str) -> str:
        if not _FIELD.match(value):
            raise ValueError(
                f"{value!r} is not a top-level field name (no dots, no leading '$', not empty)"
            )
        return value

    @field_validator("collections", "exempt")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for p in value:
            if not p:
                raise ValueError("an empty pattern matches nothing")
            if "[" in p and "]" not in p[p.index("[") :]:
                raise ValueError(f"unclosed '[' in pattern {p!r}")
        return value

    @model_validator(mode="after")
    def _unique_users(self) -> TenancyConfig:
        names = [u.username for u in self.users]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"users: username {dup[0]!r} is listed twice")
        return self

    def scoped_patterns(self) -> NamespacePatterns:
        return NamespacePatterns(self.collections)

    def exempt_patterns(self) -> NamespacePatterns:
        return NamespacePatterns(self.exempt)

    def user(self, username: str) -> UserConfig | None:
        for u in self.users:
            if u.username == username:
                return u
        return None
