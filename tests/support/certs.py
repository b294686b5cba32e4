"""Certificates made at test time with ``trustme`` (never committed): a CA, a server
certificate for 127.0.0.1/localhost, client certificates, and the odd ones (another
CA's, an expired one) the TLS tests need. Everything is written as PEM files."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertFiles:
    """A leaf certificate: ``pem`` holds the key and the chain (pymongo's
    tlsCertificateKeyFile); ``cert`` and ``key`` the same, separately."""

    pem: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA certificate, to verify with
    server: CertFiles  # 127.0.0.1 and localhost
    client: CertFiles  # CN=mongoproxy-client, signed by ca
    other_ca: Path  # a CA that signed nothing here
    foreign_client: CertFiles  # signed by other_ca
    expired_client: CertFiles  # signed by ca, expired yesterday
    localhost_only: CertFiles  # a server certificate for "localhost" only (not 127.0.0.1)


def _write(directory: Path, name: str, leaf: trustme.LeafCert) -> CertFiles:
    files = CertFiles(directory / f"{name}.pem", directory / f"{name}.crt",
                      directory / f"{name}.key")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files.pem))
    leaf.cert_chain_pems[0].write_to_path(str(files.cert))
    leaf.private_key_pem.write_to_path(str(files.key))
    return files


def issue(ca: trustme.CA, directory: Path, name: str, *identities: str,
          common_name: str | None = None,
          not_after: datetime.datetime | None = None) -> CertFiles:
    """Issue one more certificate from ``ca`` into ``directory``."""
    not_before = None if not_after is None else not_after - datetime.timedelta(days=30)
    return _write(directory, name, ca.issue_cert(
        *identities, common_name=common_name, not_before=not_before, not_after=not_after))


def make_pki(directory: Path) -> tuple[PKI, trustme.CA]:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    pki = PKI(
        ca=directory / "ca.pem",
        server=issue(ca, directory, "server", "127.0.0.1", "localhost"),
        client=issue(ca, directory, "client", "mongoproxy-client",
                     common_name="mongoproxy-client"),
        other_ca=directory / "other-ca.pem",
        foreign_client=issue(other, directory, "foreign-client", "foreign-client",
                             common_name="foreign-client"),
        expired_client=issue(ca, directory, "expired-client", "expired-client",
                             common_name="expired-client", not_after=yesterday),
        localhost_only=issue(ca, directory, "localhost-only", "localhost"),
    )
    return pki, ca
