"""A development identity provider: an RSA key kept in a local file, and a helper that mints tokens with it.

For development and the examples only. There is one key per user: ``dev_key()`` loads it from ``$SA_DEV_KEY``
when set, else from ``$XDG_CONFIG_HOME/sa-middleware/dev-key.pem`` (``~/.config/sa-middleware/dev-key.pem``), and
creates it (mode 0600) on first use, saying so on stderr with its path. ``sa-middleware token`` mints tokens with the
same file from any directory, so an app that trusts ``dev_key().public_pem`` accepts them. In production, trust
your identity provider's keys (``jwks_url=``) instead.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import ConfigurationError
from .tokens import generate_rsa_key, mint_token

__all__ = ["DEV_AUDIENCE", "DEV_ISSUER", "DevKey", "default_dev_key_path", "dev_key"]

DEV_ISSUER = "https://sa-middleware.dev.local"
DEV_AUDIENCE = "workbench"


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


def default_dev_key_path() -> Path:
    """Where the development key lives: ``$SA_DEV_KEY``, else ``$XDG_CONFIG_HOME/sa-middleware/dev-key.pem``
    (``~/.config/sa-middleware/dev-key.pem`` when ``XDG_CONFIG_HOME`` is unset)."""
    explicit = os.environ.get("SA_DEV_KEY")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "sa-middleware" / "dev-key.pem"


def dev_key(path: str | os.PathLike[str] | None = None, *, announce: bool = True) -> DevKey:
    """The development key at ``path`` (default: :func:`default_dev_key_path`), created if missing.

    A new key is announced on stderr with its path (``announce=False`` keeps quiet), so a key made by mistake in
    another place does not go unnoticed. Creation is atomic (a temporary file linked into place), so processes
    that start together share one key.
    """
    target = Path(path).expanduser() if path else default_dev_key_path()
    if not target.exists():
        private_key, _ = generate_rsa_key()
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        try:
            os.link(tmp, target)  # fails if another process created the key first: theirs wins
        except FileExistsError:
            pass
        else:
            if announce:
                print(f"sa-middleware: created a new development key at {target} (set SA_DEV_KEY to use another)",
                      file=sys.stderr)
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
