"""``GET /advice?limit=N&window=S`` on the admin port (see docs/advice.md)."""

from __future__ import annotations

from proxy.admin.http import BadQuery, Handler, json_response, query_limit
from proxy.advice.advisor import Advisor

__all__ = ["MAX_ADVICE_LIMIT", "advice_routes"]

MAX_ADVICE_LIMIT = 1000


def advice_routes(advisor: Advisor, default_limit: int = 50) -> dict[str, Handler]:
    def handle(query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        try:
            limit = query_limit(query, default_limit, MAX_ADVICE_LIMIT)
        except BadQuery as exc:
            return json_response(400, {"error": str(exc)})
        values = query.get("window")
        raw = values[-1] if values else None
        try:
            window = None if raw is None else float(raw)
            if window is not None and not window > 0:
                raise ValueError
        except ValueError:
            return json_response(400, {"error": f"window must be a positive number of "
                                                f"seconds, got {raw!r}"})
        return json_response(200, advisor.report(limit, window))

    return {"/advice": handle}
