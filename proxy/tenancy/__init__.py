"""Tenant isolation: configuration, strict decoding and the sans-IO policy.

See ``proxy.tenancy.policy`` for what "confined" means and ``proxy.tenancy.config`` for
the configuration.
"""

from proxy.tenancy.config import (
    SCRAM_SHA256_STORED,
    SUPERUSER_TENANT,
    NamespacePatterns,
    TenancyConfig,
    TenancyMode,
    UserConfig,
)
from proxy.tenancy.decode import DuplicateKeyError, decode_sequences, decode_strict
from proxy.tenancy.policy import (
    SAFE_DATABASE_COMMANDS,
    UNAUTHORIZED,
    CheckContext,
    TenantPolicy,
    Verdict,
)

__all__ = [
    "SAFE_DATABASE_COMMANDS",
    "SCRAM_SHA256_STORED",
    "SUPERUSER_TENANT",
    "UNAUTHORIZED",
    "CheckContext",
    "DuplicateKeyError",
    "NamespacePatterns",
    "TenancyConfig",
    "TenancyMode",
    "TenantPolicy",
    "UserConfig",
    "Verdict",
    "decode_sequences",
    "decode_strict",
]
