"""Helpers for the token-reuse tests: DPoP key holders that make proofs (RFC 9449) and a throw-away certificate
authority for TLS client certificates (RFC 8705). Plain helpers, no fixtures."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from sa_middleware.dpop import access_token_hash, certificate_thumbprint, jwk_thumbprint

_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Holder:
    """A DPoP client: a key pair of ``alg``'s family, its public JWK and RFC 7638 thumbprint (``jkt``)."""

    def __init__(self, alg: str = "ES256", *, rsa_bits: int = 2048) -> None:
        self.alg = alg
        if alg in _CURVES:
            self.private_key: Any = ec.generate_private_key(_CURVES[alg]())
            self.jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        elif alg == "EdDSA":
            self.private_key = ed25519.Ed25519PrivateKey.generate()
            self.jwk = OKPAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        else:
            self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
            self.jwk = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        self.jkt = jwk_thumbprint(self.jwk)

    def proof(self, method: str, url: str, token: str | None, *, header: dict[str, Any] | None = None,
              drop: tuple[str, ...] = (), **claims: Any) -> str:
        """A DPoP proof for ``method url`` presenting ``token`` (``ath``); ``claims`` override or add claims,
        ``header`` overrides header parameters, ``drop`` removes claims."""
        payload: dict[str, Any] = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time())}
        if token is not None:
            payload["ath"] = access_token_hash(token)
        payload.update(claims)
        for name in drop:
            payload.pop(name, None)
        headers: dict[str, Any] = {"typ": "dpop+jwt", "jwk": self.jwk, **(header or {})}
        with warnings.catch_warnings():  # the deliberately weak keys of the refusal tests
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            return jwt.encode(payload, self.private_key, algorithm=self.alg, headers=headers)


def unsigned_proof(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS built by hand (for ``alg: none`` and other things a JWT library refuses to make)."""
    parts = [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)]
    return ".".join(parts)


def hs256_proof(secret: bytes, payload: dict[str, Any]) -> str:
    """A DPoP "proof" MAC'ed with a shared secret (RFC 9449 forbids symmetric algorithms)."""
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": b64(secret)}}
    return jwt.encode(payload, secret, algorithm="HS256", headers=header)


# -- certificates (RFC 8705) -------------------------------------------------------------------------------------

@dataclass
class Issued:
    """A certificate and its key, as PEM text (and written to files for ``ssl`` contexts)."""

    cert_pem: str
    key_pem: str
    cert_file: Path
    key_file: Path

    @property
    def x5t(self) -> str:
        return certificate_thumbprint(self.cert_pem)


class Authority:
    """A throw-away CA issuing a server certificate for 127.0.0.1 and client certificates."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sa-middleware test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_file = directory / "ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_text(cert_pem)
        key_file.write_text(key_pem)
        return Issued(cert_pem, key_pem, cert_file, key_file)

    def server_context(self, server: Issued) -> ssl.SSLContext:
        """A server context that asks for a client certificate issued by this CA (and accepts none)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server.cert_file, server.key_file)
        ctx.load_verify_locations(self.cert_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self, client: Issued | None) -> ssl.SSLContext:
        """A client context trusting this CA, presenting ``client``'s certificate (or none)."""
        ctx = ssl.create_default_context(cafile=str(self.cert_file))
        if client is not None:
            ctx.load_cert_chain(client.cert_file, client.key_file)
        return ctx
