"""Errors raised by the wire-protocol codec."""

from __future__ import annotations

__all__ = ["INVALID_BSON", "PROTOCOL_ERROR", "WireError"]

PROTOCOL_ERROR = (17, "ProtocolError")
INVALID_BSON = (22, "InvalidBSON")


class WireError(Exception):
    """A message that cannot be decoded.

    ``fatal=True`` means the byte stream cannot be resynchronised: the caller should
    reply (if it can) and then close the connection.  ``code``/``code_name`` are the
    MongoDB server error code and name to put in an error reply.
    """

    errmsg: str
    code: int
    code_name: str
    fatal: bool
    request_id: int | None

    def __init__(
        self,
        errmsg: str,
        *,
        code: int = 17,
        code_name: str = "ProtocolError",
        fatal: bool = False,
        request_id: int | None = None,
    ) -> None:
        super().__init__(errmsg)
        self.errmsg = errmsg
        self.code = code
        self.code_name = code_name
        self.fatal = fatal
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"WireError({self.errmsg!r}, code={self.code}, code_name={self.code_name!r}, "
            f"fatal={self.fatal}, request_id={self.request_id})"
        )
