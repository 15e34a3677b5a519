"""Certificates made in the test, for TLS and mutual-TLS tests (the ``cryptography`` package, test extra).

``write_pki(dir)`` writes a CA, a server certificate for ``localhost`` / ``127.0.0.1`` signed by it, a
client certificate signed by it, and a second, unrelated CA with its own client certificate (for
"signed by someone else" cases). Keys are EC P-256: quick to make, accepted by gRPC's BoringSSL.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing the server trusts
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def write_pki(out: Path) -> Pki:
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for ca_name, prefix in (("test CA", ""), ("other CA", "other_")):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _certificate(ca_name, ca_key, _name(ca_name), ca_key, ca=True)
        files[f"{prefix}ca"] = _write(out / f"{prefix}ca.pem", ca_cert)
        client_key = ec.generate_private_key(ec.SECP256R1())
        files[f"{prefix}client_cert"] = _write(
            out / f"{prefix}client.pem", _certificate(f"{prefix}client", client_key, ca_cert.subject, ca_key)
        )
        files[f"{prefix}client_key"] = _write(out / f"{prefix}client.key", key=client_key)
        if not prefix:
            server_key = ec.generate_private_key(ec.SECP256R1())
            files["server_cert"] = _write(
                out / "server.pem", _certificate("localhost", server_key, ca_cert.subject, ca_key, server=True)
            )
            files["server_key"] = _write(out / "server.key", key=server_key)
    return Pki(**files)
