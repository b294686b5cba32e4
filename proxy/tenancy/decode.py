"""Decoding for the policy: BSON documents with duplicate keys are refused.

The server applies every occurrence of a duplicated key (``{tenant_id: "a",
tenant_id: "b"}`` as a filter is two ANDed conditions; ``{$set: {...}, $set: {...}}``
two modifiers; a stored document keeps both fields), while a Python ``dict`` keeps only
the last: the policy would reason about a different document than the server executes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.errors import InvalidBSON

__all__ = ["DuplicateKeyError", "decode_sequences", "decode_strict"]


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


def decode_sequences(
    sequences: Iterable[tuple[str, Iterable[bytes]]],
) -> dict[str, list[dict[str, Any]]]:
    """``{identifier: [decoded documents]}`` from ``(identifier, raw documents)`` pairs
    (e.g. ``(s.identifier, s.documents()) for s in msg.sequences``)."""
    return {ident: [decode_strict(raw) for raw in docs] for ident, docs in sequences}
