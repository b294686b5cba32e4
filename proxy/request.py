"""One client request, parsed once: :class:`Request`.

The session loop frames a message; :func:`parse_request` decodes its command document
(the body only: sequences and reply bodies stay raw) and reads, once, every field the
proxy decides by: command name (canonical), database, collection, cursor ids, session
and transaction fields, ``$readPreference``, ``maxTimeMS``, the flags. Each of these is
checked for type here, and a wrong type is a client error (:class:`ProxyError` with the
server's code: TypeMismatch, InvalidNamespace, BadValue, ...) whose message names the
field, never an internal error further down. Later stages read the fields, never the
document's first key again.
"""

from __future__ import annotations

from typing import Any

import bson
from bson.binary import Binary

from proxy.commands import ALIASES, COLLECTION_COMMANDS, CONTINUATIONS
from proxy.errors import (
    BAD_VALUE,
    COMMAND_NOT_FOUND,
    INVALID_NAMESPACE,
    TYPE_MISMATCH,
    ProxyError,
)
from proxy.wire import (
    FLAG_CHECKSUM_PRESENT,
    FLAG_EXHAUST_ALLOWED,
    FLAG_MORE_TO_COME,
    DocumentSequence,
    OpMsg,
    WireError,
    decode_body,
    encode_op_msg,
    parse_op_msg,
)

__all__ = [
    "STRIPPED_FLAGS", "Request", "bson_type_name", "request_from_command", "request_from_op_msg",
]

# Flags the upstream must not see: exhaust replies would stream several messages into a
# pooled connection (the client falls back to plain getMore), moreToCome would leave the
# exchange without a reply to wait for (the proxy reads and drops it instead), and the
# checksum would be wrong once any flag changes.
STRIPPED_FLAGS = FLAG_EXHAUST_ALLOWED | FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME

# Commands whose value may be something else than a collection name: ``aggregate: 1``
# (database-level); the others of COLLECTION_COMMANDS need a string, as on the server.
_DATABASE_LEVEL_OK = frozenset({"aggregate"})


class Request:
    """One OP_MSG command as the proxy understands it (read-only once built)."""

    __slots__ = (
        "autocommit", "collection", "command", "compressor", "cursor_ids", "db", "flags",
        "max_time_ms", "message", "more_to_come", "msg", "name", "raw_name",
        "read_preference", "request_id", "session_id", "start_transaction", "txn_number",
    )

    def __init__(
        self,
        message: bytes,
        msg: OpMsg,
        command: dict[str, Any],
        compressor: str | None = None,
    ) -> None:
        self.message = message      # the whole (uncompressed) message, as received
        self.msg = msg
        self.command = command      # the decoded body: a reference, never copied
        self.compressor = compressor
        self.request_id = msg.request_id
        self.flags = msg.flags
        self.more_to_come = bool(msg.flags & FLAG_MORE_TO_COME)
        raw = next(iter(command), None)
        if raw is None:
            raise WireError("OP_MSG body is an empty document: no command",
                            code=COMMAND_NOT_FOUND[0], code_name=COMMAND_NOT_FOUND[1],
                            request_id=msg.request_id)
        self.raw_name: str = raw
        name = self.name = ALIASES.get(raw, raw)
        db = command.get("$db")
        if db is not None and type(db) is not str:  # bson's Code is a str subclass
            raise ProxyError(INVALID_NAMESPACE, f"{raw}: $db must be a string, not "
                                                f"{bson_type_name(db)}")
        self.db: str | None = db
        value = command[raw]
        self.collection: str | None = None
        self.cursor_ids: tuple[int, ...] = ()
        if name in COLLECTION_COMMANDS:
            if type(value) is str:
                self.collection = value
            elif name not in _DATABASE_LEVEL_OK:
                raise ProxyError(INVALID_NAMESPACE, f"{raw}: collection name has invalid "
                                                    f"type {bson_type_name(value)}")
        if name in CONTINUATIONS:
            self._continuation(raw, value)
        self._session_fields(command)
        pref = command.get("$readPreference")
        if pref is not None and not isinstance(pref, dict):
            raise _type_error(raw, "$readPreference", pref, "object")
        self.read_preference: dict[str, Any] | None = pref
        self.max_time_ms = _max_time_ms(raw, command.get("maxTimeMS"))

    def _continuation(self, raw: str, value: Any) -> None:
        if raw == "getMore":
            if not _is_int(value):
                raise _type_error(raw, "getMore", value, "long")
            collection = self.command.get("collection")
            if type(collection) is not str:
                raise _type_error(raw, "collection", collection, "string")
            self.collection = collection
            self.cursor_ids = (value,)
            return
        ids = self.command.get("cursors")
        if not isinstance(ids, list):
            raise _type_error(raw, "cursors", ids, "array")
        for cursor_id in ids:
            if not _is_int(cursor_id):
                raise _type_error(raw, "cursors", cursor_id, "long")
        self.cursor_ids = tuple(ids)

    def _session_fields(self, command: dict[str, Any]) -> None:
        raw = self.raw_name
        lsid = command.get("lsid")
        self.session_id: bytes | None = None
        if lsid is not None:
            if not isinstance(lsid, dict):
                raise _type_error(raw, "lsid", lsid, "object")
            sid = lsid.get("id")
            if not isinstance(sid, bytes):  # Binary (subtype 4) decodes to a bytes subclass
                raise _type_error(raw, "lsid.id", sid, "binData")
            self.session_id = bytes(sid)
        txn = command.get("txnNumber")
        if txn is not None and not _is_int(txn):
            raise _type_error(raw, "txnNumber", txn, "long")
        self.txn_number: int | None = txn
        autocommit = command.get("autocommit")
        if autocommit is not None and not isinstance(autocommit, bool):
            raise _type_error(raw, "autocommit", autocommit, "bool")
        self.autocommit: bool | None = autocommit
        start = command.get("startTransaction")
        if start is not None and not isinstance(start, bool):
            raise _type_error(raw, "startTransaction", start, "bool")
        self.start_transaction: bool | None = start

    @property
    def sequences(self) -> tuple[DocumentSequence, ...]:
        return self.msg.sequences

    @property
    def in_transaction(self) -> bool:
        """A statement of a multi-statement transaction (``autocommit: false``)."""
        return self.autocommit is False

    @property
    def transaction_key(self) -> tuple[bytes, int] | None:
        """(session id, txnNumber) of a statement inside a multi-statement transaction."""
        if self.autocommit is not False or self.session_id is None or self.txn_number is None:
            return None
        return self.session_id, self.txn_number

    @property
    def namespace(self) -> str:
        """``db.collection`` (``db.$cmd.<name>`` for database-level commands): where a
        cursor it opens lives."""
        target = self.collection
        if self.name == "listCollections" or target is None:
            target = f"$cmd.{self.raw_name}"
        return f"{self.db or 'admin'}.{target}"

    @property
    def forward_flags(self) -> int:
        return self.flags & ~STRIPPED_FLAGS


def request_from_op_msg(message: bytes, msg: OpMsg, compressor: str | None) -> Request:
    """Decode the body of a parsed OP_MSG and read its fields (see :class:`Request`)."""
    return Request(message, msg, decode_body(msg), compressor)


def request_from_command(command: dict[str, Any], flags: int = 0) -> Request:
    """A :class:`Request` for a command document given as such (``explain-route``,
    tests): encoded as the OP_MSG a client would send, then parsed as the pipeline
    parses one, so both share one parse (and its client errors)."""
    message = encode_op_msg(0, 0, bson.encode(command), flags=flags)
    return request_from_op_msg(message, parse_op_msg(message), None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_time_ms(name: str, value: Any) -> int | float | None:
    """``maxTimeMS`` as sent, when it is a number (the server's check: BadValue else)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProxyError(BAD_VALUE, f"{name}: maxTimeMS must be a number, not "
                                    f"{bson_type_name(value)}")
    return value


def _type_error(command: str, field: str, value: Any, expected: str) -> ProxyError:
    return ProxyError(TYPE_MISMATCH, f"BSON field '{command}.{field}' is the wrong type "
                                     f"'{bson_type_name(value)}', expected type '{expected}'")


_TYPE_NAMES = {
    float: "double", str: "string", dict: "object", list: "array", bool: "bool",
    type(None): "null", int: "int", bytes: "binData", Binary: "binData",
}


def bson_type_name(value: Any) -> str:
    """The server's name for a decoded BSON value's type (as in its error messages)."""
    name = _TYPE_NAMES.get(type(value))
    if name is not None:
        return name
    kind = type(value).__name__
    return {"Int64": "long", "ObjectId": "objectId", "datetime": "date", "Regex": "regex",
            "Code": "javascript", "Timestamp": "timestamp", "Decimal128": "decimal",
            "MinKey": "minKey", "MaxKey": "maxKey", "DBRef": "dbPointer", "UUID": "binData",
            "SON": "object"}.get(kind, kind)
