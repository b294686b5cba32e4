"""``cache:`` section of the configuration (mounted as ``Config.cache``; absent = no cache).

```yaml
cache:
  redis_url: "redis://127.0.0.1:6379/0"   # or several nodes of a Redis Cluster with cluster: true
  cluster: false
  key_prefix: "mp:"
  max_entry_bytes: 1048576                # a larger result is not cached
  compress_min_bytes: 4096                # entries at least this large are zstd-compressed
  timeout_ms: 5                           # lookup/store budget floor; slower = a bypass
  timeout_max_ms: 50                      # its ceiling (the budget follows Redis's p99)
  invalidate_timeout_ms: 100              # a write waits this long for its invalidation
  rules:
    - {match: {collection: "users", command: find}, ttl_s: 600}
    - {match: {class: dashboard}, ttl_s: 30}
```

**Rules** are tried in order; the first whose ``match`` fits the command gives its
``ttl_s``; a command no rule matches is not looked up at all. ``match`` takes every key
of a routing rule's match (``command``, ``database``, ``collection``, ``has_stage``,
``text_search``, ``app_name``, ``comment``, ``user``, ``tenant``, same syntax and
semantics: ``proxy.route.rules``) plus ``class``: the routing class the routing rules
chose for the command (``default`` when none matched). Matching is routing's own
:class:`proxy.route.rules.Matcher`.

**Reload**: ``rules`` are swapped in live with the routing rules (SIGHUP / file change);
every other key needs a restart (the Redis client, its timeouts and the breaker are built
once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, field_validator, model_validator

from proxy.classify import Classification
from proxy.configbase import Strict
from proxy.route.rules import (
    MatchConfig,
    Matcher,
    NameField,
    NamePattern,
    config_errors,
    duplicate_names,
)

__all__ = ["CacheConfig", "CacheMatchConfig", "CacheRuleConfig", "CacheRules"]


class _Strict(Strict):
    """The cache's sections also accept field names where they have an alias."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CacheMatchConfig(MatchConfig):
    """A routing ``match`` plus ``class``: the routing class decided for the command."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_: NameField = Field(default=None, alias="class")  # the routing class chosen

    @field_validator("class_")
    @classmethod
    def _valid_class_pattern(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None:
            NamePattern(value)
        return value

    def routing_match(self) -> MatchConfig:
        """The keys routing knows, for routing's matcher."""
        return MatchConfig.model_validate(self.model_dump(exclude={"class_"}))


class CacheRuleConfig(_Strict):
    match: CacheMatchConfig
    ttl_s: float = Field(gt=0, le=30 * 24 * 3600)  # how long an entry may answer
    # Optional label for /rules and mongoproxy_rule_hits_total (else the rule's index).
    name: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
                             max_length=64)


class BreakerConfig(_Strict):
    # Consecutive failed lookups (refused, reset, garbage) that open the lookup circuit.
    # A lookup that merely timed out is a bypass, not a failure (see proxy.cache.store).
    failures: int = Field(default=3, ge=1)
    # Redis answering nothing at all for this long while lookups time out opens it too.
    stall_ms: int = Field(default=1000, gt=0)
    # While open, Redis is probed (PING) this often; the first good probe closes it.
    # Pending invalidations are retried at the same interval (independently).
    probe_interval_ms: int = Field(default=1000, gt=0)


class CacheConfig(_Strict):
    """The Redis result cache: reads matched by a rule are answered from Redis."""

    redis_url: str = Field(min_length=1)  # redis://, rediss:// or unix:// URL
    # True: redis_url names one node of a Redis Cluster (redis-py's cluster client
    # discovers the others).
    cluster: bool = False
    key_prefix: str = "mp:"  # prefix of every Redis key the cache writes
    max_entry_bytes: int = Field(default=1_048_576, gt=0, le=48_000_000)  # larger: not cached
    # Entries at least this large are stored zstd-compressed.
    compress_min_bytes: int = Field(default=4096, ge=0)
    # Bound on one Redis operation of the read path (a hit's lookup, a store); past it
    # the request goes to MongoDB (a bypass, not a Redis failure). The bound in force
    # follows Redis's measured latency (4 x the p99 of recent round trips), between
    # timeout_ms and timeout_max_ms: see docs/cache.md.
    timeout_ms: float = Field(default=5, gt=0)
    # Ceiling of the lookup budget (none: 10 x timeout_ms).
    timeout_max_ms: float | None = Field(default=None, gt=0)
    # How long a write waits (after MongoDB answered it, before the client gets the
    # reply) for its invalidation to reach Redis; past it the namespace is marked
    # pending (see docs/cache.md). The write has already taken milliseconds at MongoDB.
    invalidate_timeout_ms: float = Field(default=100, gt=0)
    connect_timeout_ms: float = Field(default=200, gt=0)  # connecting to Redis
    # Generation tokens expire after this long without a write (a missing token is
    # simply recreated: safe, see proxy.cache.store).
    generation_ttl_s: int = Field(default=86_400, gt=0)
    breaker: BreakerConfig = BreakerConfig()  # the circuit breaker in front of Redis
    # Tried in order; the first that fits gives the TTL (reloaded live).
    rules: tuple[CacheRuleConfig, ...] = ()

    _compiled: ClassVar[CacheRules]

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _ceiling(self) -> CacheConfig:
        if self.timeout_max_ms is not None and self.timeout_max_ms < self.timeout_ms:
            raise ValueError("timeout_max_ms must be at least timeout_ms")
        return self

    @property
    def lookup_ceiling_ms(self) -> float:
        return self.timeout_max_ms if self.timeout_max_ms is not None else 10 * self.timeout_ms

    @model_validator(mode="wrap")
    @classmethod
    def _compile(cls, data: Any, handler: Callable[[Any], CacheConfig]) -> CacheConfig:
        self = handler(data)
        errors = duplicate_names(self.rules)
        if errors:
            raise config_errors(cls.__name__, errors)
        # Kept in the instance __dict__ (as RoutingConfig does): cheap to reach per request.
        object.__setattr__(self, "_compiled", CacheRules(self.rules))
        return self

    @property
    def compiled(self) -> CacheRules:
        return self._compiled

    def restart_part(self) -> dict[str, Any]:
        """Everything but the rules: a change here needs a restart."""
        return self.model_dump(exclude={"rules"})


class CacheRules:
    """Compiled cache rules: ``ttl_for(classification, route_class)``.

    ``hits[i]`` counts the reads rule ``i`` matched (looked up or bypassed), read at
    scrape time by :mod:`proxy.route.rulehits`."""

    __slots__ = ("hits", "rules")

    def __init__(self, rules: tuple[CacheRuleConfig, ...]) -> None:
        compiled: list[tuple[Matcher, NamePattern | None, float, int]] = []
        for index, rule in enumerate(rules):
            match = rule.match
            klass = None if match.class_ is None else NamePattern(match.class_)
            compiled.append((Matcher(match.routing_match()), klass, rule.ttl_s, index))
        self.rules = tuple(compiled)
        self.hits = [0] * len(compiled)

    def ttl_for(self, c: Classification, route_class: str) -> tuple[float, int] | None:
        """(ttl_s, rule index) of the first rule that fits, else None."""
        for matches, klass, ttl_s, index in self.rules:
            if (klass is None or klass(route_class)) and matches(c):
                self.hits[index] += 1
                return ttl_s, index
        return None
