"""The Redis result cache: eligible reads answered from Redis, invalidated by writes
through any proxy instance (see docs/cache.md).

Modules: ``config`` (the ``cache:`` section, rules compiled with routing's matcher),
``key`` (canonical form and digest), ``eligibility`` (what may be looked up, stored,
and what a write invalidates), ``entry`` (the stored bytes), ``store`` (Redis, the
generation protocol and the circuit breaker: the only I/O), ``flight`` (single flight),
``layer`` (what the request path calls), ``metrics``, ``budget`` (the lookup budget,
from Redis's measured latency), ``pending`` (a write's invalidation and what happens
when Redis cannot be told: docs/cache.md).
"""
