"""Errors raised by the wire-protocol codec: a :class:`~proxy.errors.ProxyError` that
also says whether the byte stream can go on.

The codes come from the one table in :mod:`proxy.errors`.
"""

from __future__ import annotations

from proxy.errors import INVALID_BSON, PROTOCOL_ERROR, ProxyError

__all__ = ["INVALID_BSON", "PROTOCOL_ERROR", "WireError"]


class WireError(ProxyError):
    """A message that cannot be decoded.

    ``fatal=True`` means the byte stream cannot be resynchronised: the caller should
    reply (if it can) and then close the connection.  ``code``/``code_name`` are the
    MongoDB server error code and name to put in an error reply.
    """

    fatal: bool
    request_id: int | None

    def __init__(
        self,
        errmsg: str,
        *,
        code: int = PROTOCOL_ERROR[0],
        code_name: str = PROTOCOL_ERROR[1],
        fatal: bool = False,
        request_id: int | None = None,
    ) -> None:
        super().__init__((code, code_name), errmsg)
        self.fatal = fatal
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"WireError({self.errmsg!r}, code={self.code}, code_name={self.code_name!r}, "
            f"fatal={self.fatal}, request_id={self.request_id})"
        )
