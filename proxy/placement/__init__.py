"""Tenant placement: which cluster holds each tenant, commands routed there, reads that
span tenants fanned out and merged, and tenants moved between clusters online
(docs/placement.md)."""
