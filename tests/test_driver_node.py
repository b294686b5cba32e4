"""The official Node.js driver (tests/node/crud.js) through the proxy.

Needs `node` on PATH and tests/node/node_modules (`make node`); missing either is a
failure, not a skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.collection import Collection

from tests.support import REPO_ROOT, FerretDBProcess, ProxyProcess

NODE_DIR = REPO_ROOT / "tests" / "node"


def run_crud(uri: str, db: str) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node.js >= 20", pytrace=False)
    if not (NODE_DIR / "node_modules" / "mongodb").is_dir():
        pytest.fail(f"{NODE_DIR}/node_modules/mongodb missing; run `make node`", pytrace=False)
    proc = subprocess.run(
        [node, str(NODE_DIR / "crud.js"), uri, db],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"crud.js exited {proc.returncode}:\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_node_driver_crud_through_proxy(
    proxy: ProxyProcess, ferretdb: FerretDBProcess, db_name: str
) -> None:
    pname, dname = f"{db_name}_p", f"{db_name}_d"
    direct: MongoClient[dict[str, Any]] = MongoClient(ferretdb.uri, directConnection=True)
    with direct:
        for name in (pname, dname):
            direct.drop_database(name)
        try:
            via_proxy = run_crud(proxy.uri, pname)
            reference = run_crud(f"{ferretdb.uri}?directConnection=true", dname)

            assert via_proxy["hello"]["msg"] == "isdbgrid"
            assert isinstance(via_proxy["hello"]["connectionId"], int)
            assert via_proxy["hello"]["maxWireVersion"] == reference["hello"]["maxWireVersion"]
            # Every operation's result equals the direct connection's (hello aside).
            del via_proxy["hello"], reference["hello"]
            assert via_proxy == reference

            assert via_proxy["insertOne"] == {"acknowledged": True, "insertedId": "first"}
            assert via_proxy["insertMany"] == {"insertedCount": 120}
            assert via_proxy["find"] == {"count": 60, "firstN": 2, "lastN": 120}
            assert via_proxy["findOne"] == {"_id": 7, "kind": "odd", "n": 7, "grp": 3}
            assert via_proxy["updateOne"] == {"matchedCount": 1, "modifiedCount": 1}
            assert via_proxy["updateMany"] == {"matchedCount": 30, "modifiedCount": 30}
            assert via_proxy["deleteOne"] == {"deletedCount": 1}
            assert via_proxy["aggregate"] == [
                {"_id": "even", "total": sum(range(2, 121, 2))},
                {"_id": "odd", "total": sum(range(3, 121, 2))},
                {"_id": "one", "total": 42},
            ]
            assert via_proxy["aggregateCount"] == [{"_id": "odd", "docs": 29}]  # _id 1 deleted
            assert via_proxy["countDocuments"] == {"all": 120, "flagged": 30}
            assert via_proxy["duplicate"] == {"code": 11000, "name": "MongoServerError"}

            # The data the Node driver wrote through the proxy, read directly.
            coll: Collection[dict[str, Any]] = direct[pname]["items"]
            assert coll.count_documents({}) == 120
            assert coll.find_one({"_id": "first"}) == {
                "_id": "first", "kind": "one", "n": 42, "bumps": 1,
            }
            assert coll.find_one({"_id": 1}) is None
            assert coll.count_documents({"flagged": True}) == 30
            flagged = coll.find({"grp": 0}, sort=[("n", 1)])
            assert [d["_id"] for d in flagged] == list(range(4, 121, 4))
        finally:
            for name in (pname, dname):
                direct.drop_database(name)
