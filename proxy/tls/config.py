"""The TLS sections of the configuration.

``listen.tls`` (applications -> proxy)::

    listen:
      tls:
        cert_file: /etc/mongoproxy/server.pem    # certificate chain (and key, if no key_file)
        key_file: /etc/mongoproxy/server.key
        ca_file: /etc/mongoproxy/clients-ca.pem  # verifies client certificates
        client_certificates: none                # none | optional | required
        min_version: TLS1.2                      # TLS1.2 | TLS1.3
        allow_plaintext: false                   # true: also serve plaintext clients (migrations)
        handshake_timeout_ms: 10000
        max_pending_handshakes: 1000             # then accepting waits (backlog) until one ends

``upstream.members[].tls`` (proxy -> a declared member), when the member's TLS differs
from the ``tls*`` options of ``upstream.uri`` (absent: the uri's options apply)::

    tls: {enabled: true, ca_file: ..., certificate_key_file: ..., allow_invalid_hostnames: false}

The files are read at validation time, so ``check-config`` refuses a certificate that
does not load (and says why).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["ListenTLSConfig", "MemberTLSConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenTLSConfig(_Strict):
    """TLS for applications; reloaded on SIGHUP and when the files change."""

    # PEM certificate chain, leaf first (and the key, when key_file is not given).
    cert_file: str = Field(min_length=1)
    key_file: str | None = None  # PEM private key of cert_file
    # PEM CA certificates that verify client certificates.
    ca_file: str | None = None
    # Ask for a client certificate (optional) or require one (required); needs ca_file.
    client_certificates: Literal["none", "optional", "required"] = "none"
    min_version: Literal["TLS1.2", "TLS1.3"] = "TLS1.2"  # lowest TLS version accepted
    # Like mongod's preferTLS: a client whose first byte is not a TLS ClientHello is
    # served in plaintext instead of refused.
    allow_plaintext: bool = False
    # A client must finish its handshake (and, with allow_plaintext, send its first
    # byte) within this time.
    handshake_timeout_ms: int = Field(default=10_000, gt=0)
    # Clients between accept and the end of their handshake; beyond it the proxy stops
    # accepting (the kernel's backlog holds the next ones) until one finishes.
    max_pending_handshakes: int = Field(default=1_000, gt=0)

    @model_validator(mode="after")
    def _loads(self) -> ListenTLSConfig:
        if self.client_certificates != "none" and self.ca_file is None:
            raise ValueError(
                f"client_certificates: {self.client_certificates} needs ca_file "
                "(the CA that signs the client certificates)")
        from proxy.tls.server import build_server_context, describe_tls_error

        try:
            build_server_context(self)
        except (OSError, ValueError) as exc:
            raise ValueError(describe_tls_error(exc)) from None
        return self


class MemberTLSConfig(_Strict):
    """A declared member's TLS, in the meaning of the uri options of the same names."""

    enabled: bool = True  # TLS to this member (tls)
    ca_file: str | None = None  # CAs that verify the member (tlsCAFile)
    # The proxy's client certificate and key, PEM (tlsCertificateKeyFile).
    certificate_key_file: str | None = None
    # Password of an encrypted key (tlsCertificateKeyFilePassword).
    certificate_key_file_password: SecretStr | None = None
    # Skip the host-name check (tlsAllowInvalidHostnames).
    allow_invalid_hostnames: bool = False
    # Skip verifying the member's certificate: tests only (tlsAllowInvalidCertificates).
    allow_invalid_certificates: bool = False

    def uri_options(self) -> dict[str, Any]:
        """The same settings as (lower-case) connection-string options, for pymongo."""
        options: dict[str, Any] = {"tls": self.enabled}
        if not self.enabled:
            return options
        if self.ca_file is not None:
            options["tlscafile"] = self.ca_file
        if self.certificate_key_file is not None:
            options["tlscertificatekeyfile"] = self.certificate_key_file
        if self.certificate_key_file_password is not None:
            options["tlscertificatekeyfilepassword"] = (
                self.certificate_key_file_password.get_secret_value())
        if self.allow_invalid_hostnames:
            options["tlsallowinvalidhostnames"] = True
        if self.allow_invalid_certificates:
            options["tlsallowinvalidcertificates"] = True
        return options

    @model_validator(mode="after")
    def _loads(self) -> MemberTLSConfig:
        from proxy.tls.client import context_from_options

        context_from_options(self.uri_options())  # ValueError says what does not load
        return self
