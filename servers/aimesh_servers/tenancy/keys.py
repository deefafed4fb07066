"""ES256 signing keys, the JWKS the front door verifies with, and tokens (JWTs).

aimesh signs every token it issues with its newest active key (header `kid`); the
JWKS lists the public half of every active key, so after a rotation tokens signed
with an older key keep working until that key is retired.

Tokens of an external identity provider can be trusted too: `aimesh up --trust-issuer
FILE` takes a YAML list, one entry per issuer (see `load_trusted_issuers`):

    - issuer: https://idp.example.com/
      audiences: [aimesh]
      jwks_file: idp-jwks.json     # the provider's public keys (relative to FILE)
      tenant_claim: org            # claim naming the tenant (default "tenant")
      scope_claim: scope           # claim holding the scopes (default "scope")

The front door verifies those tokens with the provider's keys and copies the named
claims into the same trusted headers as aimesh's own.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ISSUER = "aimesh"
AUDIENCE = "aimesh"
ALGORITHM = "ES256"


@dataclass(frozen=True)
class SigningKey:
    id: str  # the `kid`
    private_pem: str
    public_jwk: dict[str, Any]
    created_at: datetime
    retired_at: datetime | None = None
    algorithm: str = ALGORITHM

    @property
    def active(self) -> bool:
        return self.retired_at is None


def new_signing_key(now: datetime | None = None) -> SigningKey:
    """A fresh P-256 key; its kid sorts by creation day and is unique."""
    now = now or datetime.now(UTC)
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    kid = f"{now:%Y%m%d}-{secrets.token_hex(6)}"
    jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid, alg=ALGORITHM, use="sig")
    return SigningKey(id=kid, private_pem=pem, public_jwk=jwk, created_at=now)


def jwks(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """The JWKS document of the active keys (what Envoy's jwt_authn is given)."""
    return {"keys": [key.public_jwk for key in keys if key.active]}


@dataclass(frozen=True)
class TokenClaims:
    id: str  # jti
    tenant: str
    scopes: tuple[str, ...]
    key_id: str
    issued_at: datetime
    expires_at: datetime

    def as_jwt_claims(self) -> dict[str, Any]:
        return {
            "iss": ISSUER, "aud": AUDIENCE, "tenant": self.tenant,
            "scope": " ".join(self.scopes), "jti": self.id,
            "iat": int(self.issued_at.timestamp()), "exp": int(self.expires_at.timestamp()),
        }


def issue_token(key: SigningKey, tenant: str, scopes: Sequence[str], ttl: timedelta,
                now: datetime | None = None) -> tuple[str, TokenClaims]:
    """A signed JWT for `tenant` with `scopes`, valid for `ttl`, and its claims."""
    if not key.active:
        raise ValueError(f"signing key {key.id} is retired")
    # Whole seconds: JWT times are integers, and the stored claims must match the token's.
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    claims = TokenClaims(
        id=secrets.token_urlsafe(16), tenant=tenant, scopes=tuple(scopes), key_id=key.id,
        issued_at=issued, expires_at=issued + ttl,
    )
    token = jwt.encode(claims.as_jwt_claims(), key.private_pem, algorithm=ALGORITHM,
                       headers={"kid": key.id})
    return token, claims


def verify_token(token: str, jwks_document: dict[str, Any], *, issuer: str = ISSUER,
                 audience: str = AUDIENCE, leeway_s: float = 0) -> dict[str, Any]:
    """The claims of a token signed by one of the JWKS's keys, else jwt.InvalidTokenError
    (ExpiredSignatureError, InvalidSignatureError, PyJWKError for an unknown kid, ...).
    The front door does this in Envoy; this is the same check in Python."""
    kid = jwt.get_unverified_header(token).get("kid")
    keys = {jwk.get("kid"): jwk for jwk in jwks_document.get("keys", [])}
    if kid not in keys:
        raise jwt.InvalidTokenError(f"token signed by unknown key {kid!r}")
    key = jwt.PyJWK(keys[kid])
    return jwt.decode(token, key.key, algorithms=[ALGORITHM], issuer=issuer, audience=audience,
                      leeway=leeway_s, options={"require": ["exp", "iat", "jti", "iss", "aud"]})


@dataclass(frozen=True)
class TrustedIssuer:
    """An external identity provider whose tokens the front door accepts."""

    issuer: str
    audiences: tuple[str, ...]
    jwks: dict[str, Any]
    tenant_claim: str = "tenant"
    scope_claim: str = "scope"


def load_trusted_issuers(path: str | Path) -> list[TrustedIssuer]:
    """Reads a `--trust-issuer` YAML file; ValueError says what is wrong where."""
    path = Path(path)
    entries = yaml.safe_load(path.read_text()) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of issuers")  # noqa: TRY004 (bad file, not a bad argument)
    issuers = []
    for index, entry in enumerate(entries):
        where = f"{path}: issuer #{index + 1}"
        if not isinstance(entry, dict) or not entry.get("issuer"):
            raise ValueError(f"{where}: 'issuer' is required")
        if entry["issuer"] == ISSUER:
            raise ValueError(f"{where}: issuer {ISSUER!r} is aimesh's own")
        audiences = entry.get("audiences") or [AUDIENCE]
        if "jwks" in entry:
            document = entry["jwks"]
        elif "jwks_file" in entry:
            document = json.loads((path.parent / entry["jwks_file"]).read_text())
        else:
            raise ValueError(f"{where}: give 'jwks' (inline) or 'jwks_file'")
        if not isinstance(document, dict) or not document.get("keys"):
            raise ValueError(f"{where}: the JWKS has no keys")
        for jwk in document["keys"]:
            try:
                jwt.PyJWK(jwk)
            except (jwt.PyJWKError, jwt.InvalidKeyError) as exc:
                raise ValueError(f"{where}: bad key {jwk.get('kid', '?')!r}: {exc}") from None
        known = {"issuer", "audiences", "jwks", "jwks_file", "tenant_claim", "scope_claim"}
        if unknown := sorted(set(entry) - known):
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        issuers.append(TrustedIssuer(
            issuer=entry["issuer"], audiences=tuple(audiences), jwks=document,
            tenant_claim=entry.get("tenant_claim", "tenant"),
            scope_claim=entry.get("scope_claim", "scope"),
        ))
    return issuers
