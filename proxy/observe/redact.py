"""Values out of log lines when ``observability.log_values`` is false.

Tenancy refusal reasons quote the offending tenant value for the client (it sent it),
e.g. ``filter has tenant_id "acme", connection is bound to "globex"``; the proxy's own
log gets the same sentence with every value replaced by ``?``.
"""

from __future__ import annotations

import re

__all__ = ["redact_reason"]

# A value follows these words and runs to the next clause of the sentence (or its end).
_VALUE = re.compile(
    r"(?P<lead>\bhas (?!no )\S+ |\bbound to |\bcommand has |\bcursor id )"
    r"(?P<value>.+?)"
    r"(?=, connection is|, another part|: not a single|: one command| is not an|$)"
)
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'")


def redact_reason(reason: str) -> str:
    """``reason`` with tenant values (and any quoted literal) replaced by ``?``."""
    return _QUOTED.sub("?", _VALUE.sub(r"\g<lead>?", reason))
