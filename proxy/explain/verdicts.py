"""The tenancy verdict and the cache decision for ``mongoproxy explain-route``.

The same calls the request path makes (``proxy.tenancy.gate.admit``, the cache rules'
``ttl_for`` and ``proxy.cache.eligibility``), described in words. What explain-route
cannot know is said so: cursor ownership (the running proxy's cursor table), Redis
state, whether an entry is stored.
"""

from __future__ import annotations

from typing import Any

from proxy.cache.config import CacheConfig
from proxy.cache.eligibility import read_bypass, written_namespaces
from proxy.classify import Classification
from proxy.identity.preauth import preauth_decision, refusal
from proxy.request import Request
from proxy.route.rules import RouteDecision, rule_label
from proxy.tenancy import TenancyConfig, TenantPolicy
from proxy.tenancy.gate import admit

__all__ = ["TenancyOutcome", "cache_line", "tenancy_outcome"]


class TenancyOutcome:
    """``line`` for the output; ``refused``: stop there; ``command``: what is forwarded
    (rewritten in inject mode); ``tenant``: the tenant the command was admitted for."""

    __slots__ = ("command", "line", "refused", "spans", "tenant")

    def __init__(self, line: str, command: dict[str, Any], refused: bool = False,
                 tenant: Any = None, spans: str | None = None) -> None:
        self.line = line
        self.command = command
        self.refused = refused
        self.tenant = tenant
        self.spans = spans  # with placement: a "*" command naming no single tenant


def tenancy_outcome(
    tenancy: TenancyConfig, request: Request, user: str | None, placement: bool = False
) -> TenancyOutcome:
    """Run the tenancy policy on ``request`` (parsed by ``proxy.request``, as the
    pipeline parses it) as ``user`` (a configured proxy user) would send it. Raises
    ValueError for a user the configuration does not have."""
    command = request.command
    bound: str | None = None
    if user is not None:
        found = next((u for u in tenancy.users if u.username == user), None)
        if found is None:
            known = ", ".join(u.username for u in tenancy.users) or "none configured"
            raise ValueError(f"--user {user!r} is not a configured proxy user ({known})")
        bound = found.tenant
    name = request.raw_name
    # Before login the proxy answers or refuses every command itself, whatever the mode.
    before_login = preauth_decision(name, users_configured=bool(tenancy.users),
                                    authenticated=user is not None)
    if before_login == "local":
        return TenancyOutcome("answered by the proxy before login (not forwarded)",
                              command, True)
    if before_login == "refuse":
        return TenancyOutcome(
            f"refused unauthenticated: code 13 Unauthorized: {refusal(name)}", command, True)
    if tenancy.mode == "off":
        return TenancyOutcome("off (tenancy.mode: off): not checked", command)
    admission = admit(
        TenantPolicy(tenancy), name, command, request.msg.body, request.sequences,
        bound_tenant=bound,
        cursor_tenant=lambda _cursor: (False, None),
        placement=placement,
    )
    who = f"as {user!r} (tenant {bound!r})" if user is not None else "unauthenticated"
    if admission.refused is not None:
        return TenancyOutcome(
            f"refused {who}: code 13 Unauthorized: {admission.refused}", command, True)
    tenant = admission.tenant if admission.tenant is not None else bound
    if admission.violation is not None:
        verdict = f"audit violation {who} (forwarded, logged and counted): " \
                  f"{admission.violation}"
    elif admission.superuser:
        verdict = f"allowed {who}: '*' identity, not checked (audited)"
    else:
        verdict = f"allowed {who}, mode {tenancy.mode}"
        if tenant is not None and tenant != bound:
            verdict += f", for tenant {tenant!r}"
    forwarded = command
    if admission.command is not None:
        forwarded = admission.command
        verdict += "; the tenant condition is injected"
    if name in ("getMore", "killCursors"):
        verdict += "; cursor ownership is checked against the running proxy's cursors"
    return TenancyOutcome(verdict, forwarded, tenant=tenant, spans=admission.spans)


def cache_line(
    cache: CacheConfig | None,
    command: dict[str, Any],
    c: Classification,
    decision: RouteDecision,
) -> str:
    """What the result cache does with the command (as it would be forwarded)."""
    if cache is None:
        return "not configured (no cache: section)"
    if c.is_write:
        targets = written_namespaces(command, c)
        if not targets:
            return "a write that changes no cached collection: nothing to invalidate"
        where = ", ".join([*targets.namespaces, *(f"{d}.*" for d in targets.databases)])
        when = "at the transaction's commit" if c.in_transaction else "before the reply"
        return f"a write: invalidates {where} {when}"
    if not c.is_read:
        return "not a read: not cached"
    found = cache.compiled.ttl_for(c, decision.class_name)
    if found is None:
        return "no cache rule matches: not looked up"
    ttl_s, index = found
    rule = cache.rules[index]
    label = f"#{index}" if rule.name is None else f"#{index} ({rule_label(index, rule.name)})"
    reason = read_bypass(command, c, has_sequences=False)
    if reason is not None:
        return f"rule {label} matches, but bypass:{reason} (not looked up)"
    return f"looked up: rule {label}, TTL {ttl_s:g} s (a hit is served without the upstream)"
