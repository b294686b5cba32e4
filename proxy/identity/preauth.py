"""What a connection may do before it has authenticated, when users are configured.

Only the handshake (answered by the pipeline), the authentication commands and a short
allowlist answered by the proxy itself: nothing that names a database or a collection
is answered, and nothing is forwarded upstream (an unauthenticated client must not be
able to reach, or upset, the servers: see docs/security.md). MongoDB itself answers
``buildInfo`` in full before login; here it is reduced to the version fields drivers
and shells read.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["PREAUTH_LOCAL", "message_limit", "preauth_decision", "preauth_reply", "refusal"]

# Answered by the proxy before login (the handshake and authentication commands are
# handled before this check).
PREAUTH_LOCAL = frozenset({"ping", "buildInfo", "buildinfo"})

# The server version a wire version stands for (the last release that introduced it).
_VERSIONS = ((25, "8.0.0"), (21, "7.0.0"), (17, "6.0.0"), (13, "5.0.0"), (0, "4.4.0"))

Decision = Literal["pass", "local", "refuse"]


def preauth_decision(name: str, *, users_configured: bool, authenticated: bool) -> Decision:
    """``pass``: handle as usual; ``local``: answer with :func:`preauth_reply`;
    ``refuse``: answer Unauthorized (code 13), forward nothing."""
    if authenticated or not users_configured:
        return "pass"
    return "local" if name in PREAUTH_LOCAL else "refuse"


def message_limit(max_bytes: int, preauth_max_bytes: int, *, before_login: bool) -> int:
    """The largest message (compressed or, once inflated, not) a connection may send:
    ``listen.max_preauth_message_bytes`` before login, when users are configured."""
    return min(preauth_max_bytes, max_bytes) if before_login else max_bytes


def preauth_reply(name: str, max_wire_version: int) -> dict[str, Any]:
    """The proxy's own answer to an allowlisted command before login."""
    if name == "ping":
        return {"ok": 1.0}
    version = next(v for wire, v in _VERSIONS if max_wire_version >= wire)
    return {
        "version": version,
        "versionArray": [int(part) for part in version.split(".")] + [0],
        "ok": 1.0,
    }


def refusal(name: str) -> str:
    """The errmsg of a refused command (names nothing but the command)."""
    return (f"command {name} requires authentication: this proxy binds every "
            "connection to a user; authenticate first")
