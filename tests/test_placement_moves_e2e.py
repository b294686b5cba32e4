"""Online move end to end: two real proxies sharing one Redis in front of two real
FerretDB clusters, pymongo clients of three tenants writing continuously through both
proxies, and ``python -m proxy move-tenant`` moving one tenant under that load.

Afterwards, over direct connections: the target holds exactly the moving tenant's
acknowledged writes, the source none of them, the other tenants exactly theirs on the
source; the other tenants never saw an error; both proxies send the tenant to its new
cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.support import FerretDBFactory, ProxyFactory, ProxyProcess, RedisFactory

ROOT = Path(__file__).resolve().parent.parent
DB = "shop"
Doc = dict[str, Any]


@dataclass
class TenantWriter:
    """One client of one tenant, alternating between the proxies: inserts, updates and
    deletes by _id; ``model`` is what was acknowledged."""

    tenant: str
    clients: list[MongoClient[Doc]]
    model: dict[str, Doc] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            coll = self.clients[i % len(self.clients)][DB].orders
            key = f"{self.tenant}-{i}"
            started = time.monotonic()
            try:
                if i % 4 == 3 and self.model:
                    victim = next(iter(self.model))
                    coll.delete_one({"_id": victim, "tenant_id": self.tenant})
                    del self.model[victim]
                elif i % 4 == 2 and self.model:
                    target = next(reversed(self.model))
                    coll.update_one({"_id": target, "tenant_id": self.tenant},
                                    {"$inc": {"n": 1}})
                    self.model[target]["n"] += 1
                else:
                    doc = {"_id": key, "tenant_id": self.tenant, "n": 0}
                    coll.insert_one(doc)
                    self.model[key] = doc
            except PyMongoError as exc:  # the proxy answered without sending it
                self.errors.append(str(exc))
            self.latencies.append(time.monotonic() - started)
            i += 1


def _placement(home: str, eu: str, redis_url: str) -> Doc:
    return {"upstream": {"uri": home},
            "tenancy": {"mode": "enforce", "field": "tenant_id"},
            "placement": {"clusters": {"eu": {"uri": eu}}, "redis_url": redis_url,
                          "key_prefix": "e2e:", "refresh_ms": 50, "lease_ms": 1000,
                          "hold_timeout_ms": 8000}}


def test_move_under_load_through_two_proxies(
        ferretdb_factory: FerretDBFactory, redis_factory: RedisFactory,
        proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    home, eu, redis = ferretdb_factory(), ferretdb_factory(), redis_factory()
    config = _placement(home.uri, eu.uri, redis.url)
    proxies: list[ProxyProcess] = [proxy_factory(home.uri, config) for _ in range(2)]
    path = tmp_path / "mover.yaml"
    path.write_text(yaml.safe_dump(config))
    direct = {"home": MongoClient(home.uri), "eu": MongoClient(eu.uri)}
    # Some history of the moving tenant before the move.
    direct["home"][DB].orders.insert_many(
        [{"_id": f"old-{n}", "tenant_id": "a", "n": n} for n in range(300)])
    clients = [MongoClient(p.uri) for p in proxies]
    writers = {t: TenantWriter(t, clients) for t in ("a", "b", "c")}
    writers["a"].model.update(
        {f"old-{n}": {"_id": f"old-{n}", "tenant_id": "a", "n": n} for n in range(300)})
    threads = [threading.Thread(target=w.run) for w in writers.values()]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        before = {t: len(w.latencies) for t, w in writers.items()}
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "move-tenant", "--config", str(path), "a",
             "--to", "eu", "--batch", "50"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        time.sleep(1.0)  # writes after the switch, through both proxies
    finally:
        for w in writers.values():
            w.stop.set()
        for thread in threads:
            thread.join()
    try:
        a, b, c = writers["a"], writers["b"], writers["c"]
        assert all(len(w.latencies) > before[t] + 20 for t, w in writers.items())
        assert b.errors == [] and c.errors == []
        assert all("189" in e or "PrimarySteppedDown" in e or "being moved" in e
                   for e in a.errors), a.errors

        def docs(cluster: str, tenant: str) -> dict[str, Doc]:
            return {d["_id"]: d for d in direct[cluster][DB].orders.find({"tenant_id": tenant})}
        assert docs("eu", "a") == a.model
        assert docs("home", "a") == {}
        assert docs("home", "b") == b.model and docs("eu", "b") == {}
        assert docs("home", "c") == c.model and docs("eu", "c") == {}
        # Both proxies now send tenant a to eu.
        for n, client in enumerate(clients):
            client[DB].orders.insert_one({"_id": f"after-{n}", "tenant_id": "a"})
            assert direct["eu"][DB].orders.count_documents({"_id": f"after-{n}"}) == 1
        pause = max(a.latencies)
        print(f"moving tenant's longest write: {pause * 1000:.0f} ms; "
              f"errors: {len(a.errors)}")
    finally:
        for client in [*clients, *direct.values()]:
            client.close()

