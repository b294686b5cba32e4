"""Where the tenancy policy meets one request: identity, strict decoding, cursors.

``admit`` is the one call the request path makes. It decides with the connection's
identity (bound tenant, ``"*"`` superuser, or none), makes sure the command has no
repeated key (it would make the policy judge a different document than the server runs),
checks cursor continuations against the tenant that opened the cursor, and returns
what to forward. Pure: the cursor table is consulted through a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.tenancy.core import _SCOPED as SCOPED
from proxy.tenancy.decode import DuplicateKeyError, decode_sequences, reuse_if_unique
from proxy.tenancy.policy import TenantPolicy, Verdict
from proxy.wire import DocumentSequence, WireError

# cursor id -> (known to the proxy, tenant that opened it)
CursorTenant = Callable[[int], tuple[bool, Any]]


@dataclass(slots=True)  # not frozen, for speed (see Verdict); never mutated
class Admission:
    """``refused``: the reason to answer code 13 with (nothing is forwarded).
    ``violation``: audit mode: forwarded, but logged and counted. ``command`` /
    ``sequences``: what to forward when inject mode rewrote them (else None)."""

    refused: str | None = None
    violation: str | None = None
    namespace: str | None = None
    tenant: Any = None
    command: dict[str, Any] | None = None
    sequences: dict[str, list[dict[str, Any]]] | None = None
    superuser: bool = False
    # With tenant placement, for a "*" command on a scoped collection that is not
    # confined to one tenant: why not (``tenant`` is the one it names, if it does).
    spans: str | None = None


_PASS = Admission()


def admit(
    policy: TenantPolicy,
    name: str,
    decoded: dict[str, Any],
    body: bytes,
    raw_sequences: Sequence[DocumentSequence],
    *,
    bound_tenant: str | None,
    cursor_tenant: CursorTenant,
    placement: bool = False,
) -> Admission:
    if policy.mode == "off":
        return _PASS
    # Before login (users configured) nothing reaches here: the pipeline answers or
    # refuses every command first (proxy.identity.preauth), whatever the mode.
    audit = policy.mode == "audit"
    superuser = bound_tenant == "*"
    try:
        command = reuse_if_unique(decoded, body)
        sequences = decode_sequences((s.identifier, s.documents()) for s in raw_sequences)
    except DuplicateKeyError as exc:
        return _refuse_or_audit(audit, f"{name}: {exc}; refused as ambiguous", None)
    except Exception as exc:  # bson raises several types; framing was checked, content not
        raise WireError(
            f"{name}: a document of an OP_MSG document sequence is invalid BSON "
            f"({type(exc).__name__}: {exc})", code=22, code_name="InvalidBSON") from None
    verdict = policy.check(command, sequences, None if superuser else bound_tenant, superuser,
                           name)
    if verdict.allowed and verdict.needs_cursor_owner_check and not superuser:
        verdict = _check_cursor_owner(name, command, bound_tenant, cursor_tenant, audit)
    admission = _admission(verdict)
    if placement and superuser and verdict.allowed and not verdict.needs_cursor_owner_check:
        _place_superuser(policy, command, sequences, name, admission)
    return admission


def _place_superuser(policy: TenantPolicy, command: dict[str, Any],
                     sequences: dict[str, list[dict[str, Any]]], name: str,
                     admission: Admission) -> None:
    """Tenant placement routes a "*" command by the one tenant it is confined to, as a
    tenant's own command would be proven: checked as if it came from no identity."""
    probe = policy.check(command, sequences, None, False, name)
    if probe.allowed:
        admission.tenant = probe.tenant  # None: not a scoped collection (home)
        return
    namespace = probe.namespace or ""
    db, dot, coll = namespace.partition(".")
    if dot and policy.namespace_kind(db, coll) == SCOPED:
        admission.spans = probe.reason or "not confined to one tenant"


def _check_cursor_owner(
    name: str,
    command: Mapping[str, Any],
    bound_tenant: str | None,
    cursor_tenant: CursorTenant,
    audit: bool,
) -> Verdict:
    ids = [command.get("getMore")] if name == "getMore" else command.get("cursors")
    if not isinstance(ids, list) or not ids:
        return _verdict(audit, f"{name}: no cursor ids")
    for cursor_id in ids:
        if not isinstance(cursor_id, int):
            return _verdict(audit, f"{name}: cursor id {cursor_id!r} is not an integer")
        known, tenant = cursor_tenant(cursor_id)
        if not known:
            return _verdict(audit, f"{name}: cursor {cursor_id} was not opened through "
                                   "this proxy")
        if bound_tenant is not None and tenant != bound_tenant:
            return _verdict(audit, f"{name}: cursor {cursor_id} belongs to another tenant")
    return Verdict(True)


def _verdict(audit: bool, reason: str) -> Verdict:
    return Verdict(True, violation=reason) if audit else Verdict(False, reason)


def _refuse_or_audit(audit: bool, reason: str, namespace: str | None) -> Admission:
    if audit:
        return Admission(violation=reason, namespace=namespace)
    return Admission(refused=reason, namespace=namespace)


def _admission(verdict: Verdict) -> Admission:
    if not verdict.allowed:
        return Admission(refused=verdict.reason, namespace=verdict.namespace)
    return Admission(
        violation=verdict.violation,
        namespace=verdict.namespace,
        tenant=verdict.tenant,
        command=verdict.rewritten,
        sequences=verdict.rewritten_sequences,
        superuser=verdict.superuser,
    )
