"""pymongo clients the integration tests share."""

from __future__ import annotations

from typing import Any

from pymongo import MongoClient

from tests.support.procs import FerretDBProcess

Doc = dict[str, Any]


def strict_client(uri: str, **kwargs: Any) -> MongoClient[Doc]:
    """A client of the proxy with no driver retries, so every proxy error is visible;
    the socket timeout stays above the tests' hang bounds, so a hang shows up as a slow
    operation rather than a client timeout. ``kwargs`` override any option."""
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": 5000,
        "connectTimeoutMS": 5000,
        "socketTimeoutMS": 15_000,
        "retryReads": False,
        "retryWrites": False,
    }
    options.update(kwargs)
    return MongoClient(uri, **options)


def direct_client(fdb: FerretDBProcess) -> MongoClient[Doc]:
    """A client straight to one FerretDB server, bypassing the proxy."""
    return MongoClient(fdb.uri, directConnection=True, serverSelectionTimeoutMS=5000)
