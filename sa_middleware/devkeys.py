"""A development identity provider: an RSA key kept in a local file, and a helper that mints tokens with it.

For development and the examples only. ``dev_key()`` loads the key from ``$SA_DEV_KEY`` (default
``./.sa-dev-key.pem``) and creates it (mode 0600) on first use; ``sa-middleware token`` mints tokens with the same
file, so an example app that trusts ``dev_key().public_pem`` accepts them. In production, trust your identity
provider's keys (``jwks_url=``) instead.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import ConfigurationError
from .tokens import generate_rsa_key, mint_token

__all__ = ["DEV_AUDIENCE", "DEV_ISSUER", "DevKey", "dev_key"]

DEV_ISSUER = "https://sa-middleware.dev.local"
DEV_AUDIENCE = "workbench"
DEFAULT_PATH = ".sa-dev-key.pem"


@dataclass(frozen=True)
class DevKey:
    """A development signing key: mint tokens with ``mint``; verify them with ``public_pem`` (RS256)."""

    path: Path
    private_key: rsa.RSAPrivateKey
    public_pem: str
    kid: str
    issuer: str = DEV_ISSUER

    def mint(self, sub: str, *, audience: str = DEV_AUDIENCE, ttl: int = 600, **claims: Any) -> str:
        """A signed RS256 access token for ``sub`` (``iat`` now, ``exp`` in ``ttl`` s, a fresh ``jti``)."""
        now = int(time.time())
        payload: dict[str, Any] = {"iss": self.issuer, "aud": audience, "sub": sub, "iat": now, "exp": now + ttl,
                                   "jti": uuid.uuid4().hex}
        payload.update({k: v for k, v in claims.items() if v is not None})
        return mint_token(self.private_key, "RS256", payload, {"kid": self.kid})


def dev_key(path: str | os.PathLike[str] | None = None) -> DevKey:
    """The development key at ``path`` (default ``$SA_DEV_KEY`` or ``./.sa-dev-key.pem``), created if missing.

    Creation is atomic (a temporary file linked into place), so processes that start together share one key.
    """
    target = Path(path or os.environ.get("SA_DEV_KEY") or DEFAULT_PATH)
    if not target.exists():
        private_key, _ = generate_rsa_key()
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        try:
            os.link(tmp, target)  # fails if another process created the key first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        loaded = serialization.load_pem_private_key(target.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"development key {str(target)!r} is not a readable PEM private key") from exc
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ConfigurationError(f"development key {str(target)!r} is not an RSA key")
    public_pem = loaded.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    kid = "dev-" + uuid.uuid5(uuid.NAMESPACE_URL, public_pem).hex[:12]
    return DevKey(target, loaded, public_pem, kid)
