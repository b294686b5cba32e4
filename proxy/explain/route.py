"""``mongoproxy explain-route``: how the proxy treats one command, in words: the
tenancy verdict, the routing class and rule, and the result cache's decision.

Pure: the caller supplies the configuration sections and, optionally, a topology
description (the proxy's current view, or one built for a test); nothing is sent
anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bson import json_util
from bson.errors import InvalidBSON, InvalidDocument
from pymongo.errors import ConfigurationError
from pymongo.read_preferences import _ServerMode, make_read_preference
from pymongo.topology_description import TopologyDescription

from proxy.classify import Classification, ClientContext, classify
from proxy.errors import ProxyError
from proxy.request import Request, request_from_command
from proxy.route.readpref import ReadPreferenceError, from_command
from proxy.route.rules import RouteDecision, RoutingConfig, decide

if TYPE_CHECKING:
    from proxy.cache.config import CacheConfig
    from proxy.config import PlacementConfig
    from proxy.tenancy import TenancyConfig

__all__ = ["ExplainError", "describe_read_preference", "explain_route"]


class ExplainError(ValueError):
    """The command text is not a usable command document."""


def explain_route(
    config: RoutingConfig,
    command_json: str,
    app_name: str | None = None,
    topology_description: TopologyDescription | None = None,
    *,
    tenancy: TenancyConfig | None = None,
    cache: CacheConfig | None = None,
    explain_cache: bool = False,
    user: str | None = None,
    placement: PlacementConfig | None = None,
) -> str:
    """Classify and route ``command_json`` (Extended JSON) and describe the outcome.

    With ``tenancy`` the tenancy verdict comes first (as ``user``, a configured proxy
    user, or unauthenticated); with ``explain_cache`` the result cache's decision
    (``cache`` None: no cache configured) follows the route; with ``placement`` (and
    tenancy) the cluster the command goes to, from the file's directory.

    Raises :class:`ExplainError` for text that is not a JSON object naming a command, a
    ``$readPreference`` the proxy would refuse (BadValue), or an unknown ``user``.
    """
    try:
        command = json_util.loads(command_json)
    except (ValueError, TypeError, InvalidBSON) as exc:
        raise ExplainError(f"not valid (Extended) JSON: {exc}") from None
    if not isinstance(command, Mapping) or not command:
        raise ExplainError("the command must be a non-empty JSON object, e.g. "
                           '\'{"find": "users", "filter": {}, "$db": "app"}\'')
    request = _parse(dict(command))
    name = request.raw_name
    try:
        client = None if request.read_preference is None else from_command(request.command)
    except ReadPreferenceError as exc:
        raise ExplainError(f"$readPreference: {exc}") from None
    from proxy.explain.verdicts import cache_line, tenancy_outcome

    tenant_line: str | None = None
    cluster_line: str | None = None
    bound: Any = None
    forwarded: dict[str, Any] = request.command
    if tenancy is not None:
        try:
            outcome = tenancy_outcome(tenancy, request, user,
                                      placement is not None and placement.enabled)
        except ValueError as exc:
            raise ExplainError(str(exc)) from None
        tenant_line, forwarded = outcome.line, outcome.command
        if outcome.refused:
            c = classify(forwarded, ClientContext(app_name=app_name, user=user), name)
            return "\n".join([f"command:          {_describe_command(c)}",
                              f"features:         {_features(c)}",
                              f"tenancy:          {tenant_line}"]) + "\n"
        bound = next((u.tenant for u in tenancy.users if u.username == user), None)
        if placement is not None and placement.enabled:
            cluster_line = _cluster(placement, request, outcome.tenant, outcome.spans, bound)
    context = ClientContext(app_name=app_name, user=user, tenant=bound)
    classification = classify(forwarded, context, name)
    decision = decide(classification, config, client)
    lines = [
        f"command:          {_describe_command(classification)}",
        f"features:         {_features(classification)}",
        *([f"tenancy:          {tenant_line}"] if tenant_line is not None else []),
        *([f"cluster:          {cluster_line}"] if cluster_line is not None else []),
        f"class:            {decision.class_name}",
        f"rule:             {_rule(decision)}",
    ]
    if decision.deny is not None:
        error = decision.error()
        lines.append(f"refused:          code {error.code} {error.code_name}: {error.errmsg}")
        return "\n".join(lines) + "\n"
    lines.append(f"read preference:  {_read_preference(classification, decision, client)}")
    if decision.max_time_ms is not None:
        lines.append(f"maxTimeMS:        set to {decision.max_time_ms} (class cap)")
    elif classification.max_time_ms is not None:
        lines.append(f"maxTimeMS:        {classification.max_time_ms} (the client's)")
    if explain_cache:
        lines.append(f"cache:            {cache_line(cache, forwarded, classification, decision)}")
    if topology_description is not None:
        lines.append(f"member:           {_member(decision, topology_description)}")
    return "\n".join(lines) + "\n"


def _parse(command: dict[str, Any]) -> Request:
    """The command parsed as the pipeline parses a client's (``proxy.request``): a
    field of the wrong type is the client error the proxy would answer."""
    try:
        return request_from_command(command)
    except ProxyError as exc:
        raise ExplainError(f"the proxy refuses it: code {exc.code} {exc.code_name}: "
                           f"{exc.errmsg}") from None
    except (InvalidDocument, ValueError, OverflowError) as exc:
        raise ExplainError(f"not encodable as BSON: {exc}") from None


def _cluster(placement: PlacementConfig, request: Request, tenant: Any, spans: str | None,
             bound: Any) -> str:
    """Where tenant placement sends the command (the file's directory; the overrides
    of finished moves are in /placement)."""
    from proxy.placement.directory import cluster_of, tenant_key
    from proxy.placement.route import BROADCAST_COMMANDS

    if request.name in ("getMore", "killCursors"):
        return "the cluster of the cursor it continues"
    if spans is not None:
        if request.name in BROADCAST_COMMANDS:
            return "every cluster in turn (an index command of the '*' identity)"
        return (f"every cluster if it can be fanned out (a '*' read naming no single "
                f"tenant: {spans}), else refused")
    if tenant == "*":  # the operator identity's own "tenant": none
        tenant = None
    if tenant is None and bound is not None and bound != "*" and request.collection is None:
        tenant = bound
    if tenant is None:
        return "home (not confined to one tenant: exempt, unscoped or database-level)"
    key = tenant_key(tenant)
    cluster = cluster_of(key, placement.tenants, placement.hash, {})
    how = ("directory" if key in placement.tenants
           else "rendezvous hash" if placement.hash else "not listed: home")
    return f"{cluster} (tenant {key!r}, {how}; a finished move's override wins: /placement)"


def _describe_command(c: Classification) -> str:
    name = f"explain of {c.command}" if c.explain else c.command
    namespace = (c.database or "?") + (f".{c.collection}" if c.collection else "")
    kind = (
        "cursor continuation" if c.is_cursor_continuation
        else "write" if c.is_write
        else "read" if c.is_read
        else "other (not a known read)"
    )
    extra = ", in a transaction" if c.in_transaction else ""
    return f"{name} on {namespace} ({kind}{extra})"


def _features(c: Classification) -> str:
    parts = []
    if c.stages:
        parts.append("stages " + " ".join(sorted(c.stages)))
    if c.text_search:
        parts.append("text search")
    if c.comment is not None:
        parts.append(f"comment {json_util.dumps(c.comment)}")
    if c.app_name is not None:
        parts.append(f"appName {c.app_name!r}")
    if c.is_admin:
        parts.append("admin/handshake command")
    return ", ".join(parts) or "-"


def _rule(decision: RouteDecision) -> str:
    if decision.rule_index is None:
        if decision.pinned == "cursor":
            return "none (cursor continuations are not matched against rules)"
        return "none matched (routing.default)"
    return f"#{decision.rule_index} {decision.rule_text}"


def describe_read_preference(selector: _ServerMode) -> str:
    parts = [f"mode: {selector.mongos_mode}"]
    if selector.tag_sets not in (None, [{}]):
        parts.append(f"tags: {json_util.dumps(selector.tag_sets)}")
    if selector.max_staleness != -1:
        parts.append(f"maxStalenessSeconds: {selector.max_staleness}")
    return "{" + ", ".join(parts) + "}"


def _read_preference(
    c: Classification, decision: RouteDecision, client: _ServerMode | None
) -> str:
    rendered = describe_read_preference(decision.read_preference)
    if decision.pinned == "cursor":
        return "pinned to the server that opened the cursor (primary if the cursor is unknown)"
    if decision.pinned == "transaction":
        return f"{rendered}, then pinned for the rest of the transaction"
    if c.is_write:
        return f"{rendered} (writes always go to the primary)"
    if not c.is_read:
        return f"{rendered} (not a known read command)"
    if client is not None and decision.read_preference is client:
        return f"{rendered} (the client's $readPreference, honoured)"
    if client is not None:
        return f"{rendered} (class {decision.class_name!r}; the client's " \
               f"{describe_read_preference(client)} is overridden)"
    return f"{rendered} (class {decision.class_name!r})"


def _member(decision: RouteDecision, description: TopologyDescription) -> str:
    if decision.pinned == "cursor":
        return "the server that opened the cursor"
    selector = decision.read_preference
    note = ""
    if selector.max_staleness != -1 and any(
        sd.is_server_type_known and sd.last_write_date is None
        for sd in description.server_descriptions().values()
    ):
        # Declared roles: members report no lastWrite, so (as the proxy's
        # DeclaredTopology does) maxStalenessSeconds is not applied.
        selector = make_read_preference(selector.mode, list(selector.tag_sets))
        note = " (maxStalenessSeconds not applied: the members report no lastWrite)"
    try:
        servers = description.apply_selector(selector)
    except ConfigurationError as exc:
        return f"none: {exc}"
    if not servers:
        return (
            f"none: no member is suitable for {describe_read_preference(selector)}; "
            f"topology: {_summary(description)}{note}"
        )
    rendered = [
        f"{sd.address[0]}:{sd.address[1]} ({sd.server_type_name}"
        + (f", rtt {sd.round_trip_time * 1000:.1f} ms" if sd.round_trip_time is not None else "")
        + (f", tags {json_util.dumps(sd.tags)}" if sd.tags else "")
        + ")"
        for sd in sorted(servers, key=lambda s: s.address)
    ]
    if len(rendered) == 1:
        return rendered[0] + note
    return "one of " + ", ".join(rendered) + " (at random, within the latency window)" + note


def _summary(description: TopologyDescription) -> str:
    servers = ", ".join(
        f"{sd.address[0]}:{sd.address[1]} {sd.server_type_name}"
        for sd in description.server_descriptions().values()
    )
    return f"{description.topology_type_name} [{servers}]"
