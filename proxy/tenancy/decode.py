"""Decoding for the policy: BSON documents with duplicate keys are refused.

The server applies every occurrence of a duplicated key (``{tenant_id: "a",
tenant_id: "b"}`` as a filter is two ANDed conditions; ``{$set: {...}, $set: {...}}``
two modifiers; a stored document keeps both fields), while a Python ``dict`` keeps only
the last: the policy would reason about a different document than the server executes.

The request path has already decoded the command body with bson's C decoder into plain
dicts. ``reuse_if_unique`` re-encodes that (also C, about half a decode) and compares it
with the original bytes: equal bytes cannot hold a repeated key, because a dict cannot
encode one; so only when they differ (a repeated key, or one of the deprecated BSON types
that do not round-trip, such as DBPointer or undefined) is the strict, slower decoding
run, and it decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.errors import InvalidBSON

__all__ = ["DuplicateKeyError", "decode_sequences", "decode_strict", "reuse_if_unique"]


class DuplicateKeyError(ValueError):
    """A BSON document has the same key twice."""


class _UniqueKeys(dict[str, Any]):
    __slots__ = ()

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        dict.__setitem__(self, key, value)


_OPTIONS: CodecOptions[Any] = CodecOptions(document_class=_UniqueKeys)


def decode_strict(data: bytes) -> dict[str, Any]:
    """Decode one BSON document; DuplicateKeyError (a ValueError) on a repeated key at
    any depth, bson's InvalidBSON on malformed input."""
    try:
        doc: dict[str, Any] = bson.decode(data, _OPTIONS)
    except InvalidBSON as exc:
        # bson wraps errors raised while decoding a nested document
        if isinstance(exc.__context__, DuplicateKeyError) or "duplicate key" in str(exc):
            raise DuplicateKeyError(str(exc)) from None
        raise
    return doc


def reuse_if_unique(decoded: dict[str, Any], data: bytes) -> dict[str, Any]:
    """``decoded`` (the plain decoding of ``data``) when ``data`` has no repeated key,
    else what ``decode_strict(data)`` does (raise DuplicateKeyError)."""
    if bson.encode(decoded) == data:
        return decoded
    return decode_strict(data)


def _decode_unique(data: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = bson.decode(data)
    return reuse_if_unique(doc, data)


def decode_sequences(
    sequences: Iterable[tuple[str, Iterable[bytes]]],
) -> dict[str, list[dict[str, Any]]]:
    """``{identifier: [decoded documents]}`` from ``(identifier, raw documents)`` pairs
    (e.g. ``(s.identifier, s.documents()) for s in msg.sequences``)."""
    return {ident: [_decode_unique(raw) for raw in docs] for ident, docs in sequences}
