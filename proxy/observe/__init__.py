"""Observability: per-operation timing records, query shapes, the query digest, the
slow-query log, Prometheus metrics and the admin endpoints that serve them.

Everything here is sans-IO except :mod:`proxy.observe.slowlog` (writes lines) and
:mod:`proxy.observe.top` (a terminal client of the admin endpoint).
"""
