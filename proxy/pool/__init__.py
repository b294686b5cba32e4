"""Upstream connections and the per-server pools that multiplex clients onto them."""
