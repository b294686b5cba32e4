"""Tenancy's log lines and metrics for one request: refusals, audit violations and
the unchecked commands of a ``"*"`` identity."""

from __future__ import annotations

import json
import logging

from proxy.observe.metrics import Metrics
from proxy.observe.redact import redact_reason
from proxy.pipeline.session import Session
from proxy.tenancy.gate import Admission

__all__ = ["superuser_event", "tenancy_event"]

log = logging.getLogger("mongoproxy.connection")


def tenancy_event(metrics: Metrics, session: Session, name: str,
                  collection: str | None, admission: Admission, log_values: bool) -> None:
    """One structured log line and one metric per refusal or audit violation; the
    reason's values (the offending tenant, say) only with ``log_values``."""
    mode = "audit" if admission.refused is None else "enforce"
    reason = admission.refused or admission.violation or ""
    log.warning("tenancy %s: %s", "violation" if mode == "audit" else "rejection",
                _line(session, name, admission,
                      reason if log_values else redact_reason(reason)))
    metrics.tenancy_violation(collection or "", _reason_label(reason), mode=mode,
                              tenant=session.tenant)


def superuser_event(session: Session, name: str, admission: Admission) -> None:
    """A "*" user's command passes unchecked: one audit line says who ran what where."""
    log.info("tenancy superuser: %s",
             _line(session, name, admission, "'*' identity: not checked"))


def _line(session: Session, name: str, admission: Admission, reason: str) -> str:
    return json.dumps({
        "tenant": session.tenant,
        "user": session.user,
        "app_name": session.app_name,
        "command": name,
        "namespace": admission.namespace,
        "reason": reason,
        "connection_id": session.connection_id,
    }, default=str)


def _reason_label(reason: str) -> str:
    """A bounded metric label for a refusal reason: its leading words, no values."""
    head = reason.split(":", 1)[-1].strip()
    return " ".join(word for word in head.split()[:4] if '"' not in word and "'" not in word)
