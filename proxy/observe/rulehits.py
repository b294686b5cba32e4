"""Which routing and cache rules fire: ``GET /rules`` and the metric
``mongoproxy_rule_hits_total{kind, rule}``.

The counting is done where the decision is made (a list of ints per compiled rule set:
``proxy.route.rules._Compiled.hits``, ``proxy.cache.config.CacheRules.hits``); this
module only reads those lists, at scrape or request time, from the *live*
configuration. A reload compiles new rules with new counters, so the series restart at
0 (Prometheus treats that as a counter reset; ``rate()`` is unaffected).

``rule`` is the rule's ``name`` when it has one, else its index in its list; routing's
``rule="(default)"`` counts the commands no routing rule matched. Cursor continuations
(``getMore``) are not matched against rules and not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from proxy.admin.http import Handler, Reply, json_response
from proxy.route.rules import DEFAULT_CLASS, rule_label

if TYPE_CHECKING:
    from proxy.config import Config

__all__ = ["NO_RULE", "RuleHits", "rule_rows", "rules_handler"]

# The routing row of commands no rule matched (no rule name can contain parentheses).
NO_RULE = "(default)"


def rule_rows(config: Config) -> dict[str, list[dict[str, Any]]]:
    """The live rules with their hit counts, by kind (``routing``, ``cache``)."""
    routing = config.routing
    hits = routing._compiled.hits
    rows: dict[str, list[dict[str, Any]]] = {"routing": [
        {"index": i, "rule": rule_label(i, rule.name), "class": rule.class_,
         "match": rule.match.model_dump(exclude_none=True), "hits": hits[i]}
        for i, rule in enumerate(routing.rules)
    ]}
    rows["routing"].append({"index": None, "rule": NO_RULE, "class": DEFAULT_CLASS,
                            "match": None, "hits": hits[-1]})
    cache = config.cache
    if cache is not None:
        cache_hits = cache.compiled.hits
        rows["cache"] = [
            {"index": i, "rule": rule_label(i, rule.name), "ttl_s": rule.ttl_s,
             "match": rule.match.model_dump(exclude_none=True, by_alias=True),
             "hits": cache_hits[i]}
            for i, rule in enumerate(cache.rules)
        ]
    else:
        rows["cache"] = []
    return rows


def rules_handler(config: Callable[[], Config]) -> Handler:
    """``GET /rules``: ``{"routing": [...], "cache": [...]}`` (see :func:`rule_rows`)."""

    def handle(_query: dict[str, list[str]]) -> Reply:
        return json_response(200, rule_rows(config()))

    return handle


class RuleHits(Collector):
    """``mongoproxy_rule_hits_total{kind="routing"|"cache", rule}``, read at scrape time."""

    def __init__(self, config: Callable[[], Config], registry: CollectorRegistry) -> None:
        self._config = config
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "mongoproxy_rule_hits",
            "Commands a routing rule decided or a cache rule matched, since the rules "
            "were loaded (rule: its name or index; routing rule (default): none matched)",
            labels=["kind", "rule"],
        )
        for kind, rows in rule_rows(self._config()).items():
            for row in rows:
                family.add_metric([kind, row["rule"]], row["hits"])
        yield family
