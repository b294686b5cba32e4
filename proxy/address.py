"""A server's address, as everything in the proxy names it: (host, port)."""

from __future__ import annotations

Address = tuple[str, int]
