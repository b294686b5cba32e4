"""Tenant placement's pure parts: the directory (overrides, listed tenants, rendezvous
hash, home), the configuration's checks, how a ``"*"`` command is admitted for
placement, and the router's table (cursors, transactions, fan-out, broadcast)."""

from __future__ import annotations

from typing import Any

import bson
import pytest
from bson import Int64, ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, PlacementConfig, UpstreamConfig, parse_config
from proxy.placement.clusters import Clusters
from proxy.placement.directory import (
    EMPTY_STATE,
    PlacementState,
    cluster_of,
    rendezvous,
    tenant_key,
)
from proxy.placement.route import PlacementRouter
from proxy.pool.config import PoolConfig
from proxy.pool.registry import Pools
from proxy.request import request_from_command
from proxy.route.cursors import CursorTable
from proxy.route.topology import make_topology
from proxy.tenancy import TenancyConfig, TenantPolicy
from proxy.tenancy.gate import Admission, admit
from proxy.upstream.roundtrip import Roundtrip

TENANTS = st.text(min_size=1, max_size=12)
NAMES = st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=1,
                 max_size=6, unique=True)


# -- the directory ------------------------------------------------------------------------

def test_an_override_wins_over_the_file_which_wins_over_the_hash() -> None:
    tenants = {"acme": "eu"}
    assert cluster_of("acme", tenants, ("home", "big"), {"acme": "big"}) == "big"
    assert cluster_of("acme", tenants, ("home", "big"), {}) == "eu"
    assert cluster_of("other", tenants, ("big",), {}) == "big"
    assert cluster_of("other", tenants, (), {}) == "home"


def test_tenant_values_have_one_directory_key() -> None:
    oid = ObjectId()
    assert tenant_key("acme") == "acme"
    assert tenant_key(42) == "42"
    assert tenant_key(oid) == str(oid)


@given(TENANTS, NAMES)
def test_rendezvous_is_stable_and_picks_a_listed_cluster(key: str, clusters: list[str]) -> None:
    chosen = rendezvous(key, tuple(clusters))
    assert chosen in clusters
    assert rendezvous(key, tuple(reversed(clusters))) == chosen  # order does not matter


@settings(max_examples=200)
@given(TENANTS, NAMES, st.data())
def test_removing_a_cluster_moves_only_its_own_tenants(key: str, clusters: list[str],
                                                        data: st.DataObject) -> None:
    if len(clusters) < 2:
        return
    removed = data.draw(st.sampled_from(clusters))
    before = rendezvous(key, tuple(clusters))
    after = rendezvous(key, tuple(c for c in clusters if c != removed))
    assert after == before or before == removed


def test_rendezvous_spreads_tenants_over_the_clusters() -> None:
    counts: dict[str, int] = {}
    for i in range(3000):
        cluster = rendezvous(f"tenant-{i}", ("home", "eu", "big"))
        counts[cluster] = counts.get(cluster, 0) + 1
    assert set(counts) == {"home", "eu", "big"}
    assert min(counts.values()) > 800  # 1000 each expected


# -- configuration ------------------------------------------------------------------------

BASE = {"upstream": {"uri": "mongodb://127.0.0.1:1"}, "tenancy": {"mode": "enforce"}}


@pytest.mark.parametrize(("placement", "tenancy_mode", "error"), [
    ({"tenants": {"acme": "eu"}}, "enforce", "unknown cluster 'eu'"),
    ({"hash": ["home", "nowhere"]}, "enforce", "hash: unknown cluster 'nowhere'"),
    ({"hash": ["home", "home"]}, "enforce", "listed twice"),
    ({"clusters": {"home": {"uri": "mongodb://h:1"}}}, "enforce", "upstream section"),
    ({"clusters": {"9x": {"uri": "mongodb://h:1"}}}, "enforce", "starting with a letter"),
    ({"tenants": {"acme": "home"}}, "off", "placement needs tenancy.mode enforce or inject"),
    ({"tenants": {"acme": "home"}}, "audit", "placement needs tenancy.mode"),
    ({"redis_url": "http://x"}, "enforce", "redis://"),
])
def test_the_configuration_check_refuses(placement: dict[str, Any], tenancy_mode: str,
                                         error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config({**BASE, "tenancy": {"mode": tenancy_mode}, "placement": placement})


def test_a_valid_placement_and_its_live_part() -> None:
    config = parse_config({**BASE, "tenancy": {"mode": "inject"}, "placement": {
        "clusters": {"eu": {"members": [{"host": "h:1", "role": "primary"}],
                            "pool": {"max_size": 5}}},
        "tenants": {"acme": "eu"}, "hash": ["home", "eu"]}})
    placement = config.placement
    assert placement.enabled and placement.cluster_names() == ("home", "eu")
    assert "tenants" not in placement.restart_part()
    assert not PlacementConfig().enabled


# -- admission of a "*" command for placement ----------------------------------------------

POLICY = TenantPolicy(TenancyConfig(mode="enforce"))


def _admit(command: dict[str, Any], bound: str | None = "*") -> Admission:
    request = request_from_command(command)
    return admit(POLICY, request.raw_name, request.command, request.msg.body,
                 request.sequences, bound_tenant=bound, cursor_tenant=lambda _: (False, None),
                 placement=True)


@pytest.mark.parametrize(("command", "tenant", "spans"), [
    ({"find": "tasks", "filter": {"tenant_id": "acme"}, "$db": "d"}, "acme", False),
    ({"insert": "tasks", "documents": [{"tenant_id": 7}], "$db": "d"}, 7, False),
    ({"find": "tasks", "filter": {}, "$db": "d"}, None, True),
    ({"update": "tasks", "updates": [{"q": {}, "u": {"$set": {"a": 1}}}], "$db": "d"},
     None, True),
    ({"insert": "tasks", "documents": [{"tenant_id": "a"}, {"tenant_id": "b"}], "$db": "d"},
     None, True),
    ({"find": "tenants", "filter": {}, "$db": "d"}, None, False),  # exempt: home
    ({"insert": "tenants", "documents": [{"_id": 1}], "$db": "d"}, None, False),
    ({"dropDatabase": 1, "$db": "d"}, None, False),  # database-level: home
    ({"find": "system.views", "$db": "d"}, None, False),  # operator-only: home
])
def test_a_star_command_is_placed_by_the_tenant_it_names(command: dict[str, Any],
                                                        tenant: Any, spans: bool) -> None:
    admission = _admit(command)
    assert admission.refused is None and admission.superuser
    assert admission.tenant == tenant
    assert (admission.spans is not None) is spans


# -- the router -----------------------------------------------------------------------------

def _roundtrip(port: int) -> Roundtrip:
    config = UpstreamConfig(
        members=({"host": f"127.0.0.1:{port}", "role": "primary"},))  # type: ignore[arg-type]
    return Roundtrip(make_topology(config), Pools(PoolConfig()), CursorTable(), 1000)


@pytest.fixture
def router() -> PlacementRouter:
    home = _roundtrip(1)
    clusters = Clusters(home, {"eu": UpstreamConfig(
        members=({"host": "127.0.0.1:2", "role": "primary"},))})  # type: ignore[arg-type]
    return PlacementRouter(clusters, home.cursors)


PLACEMENT = PlacementConfig(clusters={"eu": UpstreamConfig(uri="mongodb://127.0.0.1:2")},
                            tenants={"acme": "eu"})
LSID = {"id": bson.Binary(b"\x01" * 16, 4)}


def _place(router: PlacementRouter, command: dict[str, Any], admission: Admission,
           bound: str | None = None, state: PlacementState = EMPTY_STATE) -> Any:
    return router.place(request_from_command({**command, "$db": "d"}), admission, bound,
                        PLACEMENT, state)


def test_a_confined_command_goes_to_its_tenants_cluster(router: PlacementRouter) -> None:
    placed = _place(router, {"find": "t"}, Admission(tenant="acme"))
    assert (placed.cluster, placed.key) == ("eu", "acme")
    assert placed.roundtrip is router.clusters.by_name["eu"]
    assert _place(router, {"find": "t"}, Admission(tenant="zeta")).cluster == "home"
    moved = PlacementState(1, {"zeta": "eu"}, {})
    assert _place(router, {"find": "t"}, Admission(tenant="zeta"), state=moved).cluster == "eu"
    # A bound connection's database-level commands go to its tenant's cluster.
    assert _place(router, {"listCollections": 1}, Admission(), bound="acme").cluster == "eu"
    assert _place(router, {"find": "tenants"}, Admission(), bound="acme").cluster == "home"


def test_continuations_follow_their_cursor(router: PlacementRouter) -> None:
    eu = router.clusters.by_name["eu"]

    class _Conn:
        def cursor_opened(self) -> None: ...

        def cursor_closed(self) -> None: ...

    router.cursors.add(77, ("127.0.0.1", 2), "d.t", 1, _Conn(), "acme", "eu")  # type: ignore[arg-type]
    placed = _place(router, {"getMore": Int64(77), "collection": "t"}, Admission())
    assert placed.roundtrip is eu
    placed = _place(router, {"killCursors": "t", "cursors": [Int64(78)]}, Admission())
    assert placed.cluster == "home"  # unknown: the server answers CursorNotFound
    router.fanout_owns = lambda cursor_id: cursor_id == 99
    assert _place(router, {"getMore": Int64(99), "collection": "t"}, Admission()).fanout


def test_spanning_commands_fan_out_broadcast_or_are_refused(router: PlacementRouter) -> None:
    spans = Admission(superuser=True, spans="tenant_id equality required")
    placed = _place(router, {"find": "t"}, spans)
    assert placed.fanout and placed.refused == "tenant_id equality required"
    assert _place(router, {"createIndexes": "t", "indexes": []}, spans).broadcast
    assert router.placed == {"*": 2}


def test_a_transaction_stays_on_one_cluster(router: PlacementRouter) -> None:
    txn = {"lsid": LSID, "txnNumber": Int64(1), "autocommit": False}
    first = _place(router, {"insert": "t", **txn, "startTransaction": True},
                   Admission(tenant="acme"))
    assert first.cluster == "eu"
    assert _place(router, {"find": "t", **txn}, Admission(tenant="acme")).cluster == "eu"
    other = _place(router, {"find": "t", **txn}, Admission(tenant="zeta"))
    assert other.roundtrip is None and other.code[0] == 263
    assert "a transaction stays on one cluster" in (other.refused or "")
    commit = _place(router, {"commitTransaction": 1, **txn}, Admission(superuser=True),
                    bound="*")
    assert (commit.cluster, commit.key) == ("eu", "acme")  # the move agent's record
    spanning = _place(router, {"find": "t", **txn}, Admission(superuser=True, spans="x"))
    assert spanning.code[0] == 263


# -- explain-route names the cluster ---------------------------------------------------------

def test_explain_route_names_the_cluster() -> None:
    from proxy.explain.route import explain_route
    from proxy.identity.credentials import hash_password
    from proxy.route.rules import RoutingConfig

    tenancy = TenancyConfig(mode="enforce", users=[  # type: ignore[arg-type]
        {"username": "ops", "password_sha256": hash_password("x", iterations=4096),
         "tenant": "*"}])

    def cluster_line(command: str) -> str:
        text = explain_route(RoutingConfig(), command, tenancy=tenancy, user="ops",
                             placement=PLACEMENT)
        return next(line for line in text.splitlines() if line.startswith("cluster:"))

    assert "eu (tenant 'acme', directory" in cluster_line(
        '{"find": "t", "filter": {"tenant_id": "acme"}, "$db": "d"}')
    assert "home (tenant 'zeta', not listed" in cluster_line(
        '{"find": "t", "filter": {"tenant_id": "zeta"}, "$db": "d"}')
    assert "every cluster if it can be fanned out" in cluster_line(
        '{"find": "t", "filter": {}, "$db": "d"}')
    assert "every cluster in turn" in cluster_line(
        '{"createIndexes": "t", "indexes": [{"key": {"a": 1}, "name": "a"}], "$db": "d"}')
    assert "home (not confined" in cluster_line('{"find": "tenants", "$db": "d"}')


# -- a fan-out read during a move counts the moving tenant once -------------------------------

def test_a_fan_out_skips_a_moving_tenants_copy_where_it_is_not_served(
        router: PlacementRouter) -> None:
    from proxy.config import Config
    from proxy.pipeline.placed import Placement

    placement = Placement(router.clusters)

    class _Agent:
        state = PlacementState(3, {"done": "eu"}, {"acme": {"phase": "copy"},
                                                   "zeta": {"phase": "verify"}})

    placement.agent = _Agent()  # type: ignore[assignment]
    snapshot = Config.model_validate({"upstream": {"uri": "mongodb://127.0.0.1:1"},
                                      "tenancy": {"mode": "enforce"},
                                      "placement": PLACEMENT.model_dump()})
    excluded = placement._moving_elsewhere(snapshot)
    # acme is served by eu (the directory) until its move switches: skipped on home;
    # zeta (no override yet, so home) is skipped on eu. "done" has finished: not skipped.
    assert excluded == {"home": ["acme"], "eu": ["zeta"]}
    placement.agent = None
    assert placement._moving_elsewhere(snapshot) is None


@pytest.mark.parametrize(("upstream", "narrowed"), [
    ({"find": "t", "filter": {"a": 1}},
     {"find": "t", "filter": {"$and": [{"a": 1}, {"tenant_id": {"$nin": ["x", 7]}}]}}),
    ({"find": "t"}, {"find": "t", "filter": {"tenant_id": {"$nin": ["x", 7]}}}),
    ({"count": "t", "query": {}}, {"count": "t", "query": {"tenant_id": {"$nin": ["x", 7]}}}),
    ({"distinct": "t", "key": "k"},
     {"distinct": "t", "key": "k", "query": {"tenant_id": {"$nin": ["x", 7]}}}),
    ({"aggregate": "t", "pipeline": [{"$group": {"_id": "$tenant_id"}}]},
     {"aggregate": "t", "pipeline": [{"$match": {"tenant_id": {"$nin": ["x", 7]}}},
                                     {"$group": {"_id": "$tenant_id"}}]}),
])
def test_a_fan_out_command_narrowed_by_excluded_tenants(upstream: dict[str, Any],
                                                        narrowed: dict[str, Any]) -> None:
    from proxy.placement.fanout import _excluding

    assert _excluding(upstream, "tenant_id", ["x", 7]) == narrowed
    assert _excluding(upstream, "tenant_id", None) is upstream
