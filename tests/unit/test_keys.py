"""Signing keys and tokens: real ES256 keys and JWTs (PyJWT + cryptography), verified
against the JWKS the front door gets; rotation and retirement through a real store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from aimesh_servers.runtime.errors import InvalidArgument
from aimesh_servers.tenancy import keys
from aimesh_servers.tenancy.db import make_engine, migrate
from aimesh_servers.tenancy.store import TenantStore


def test_a_token_verifies_with_the_jwks_and_carries_the_agreed_claims():
    key = keys.new_signing_key()
    token, claims = keys.issue_token(key, "acme", ["text", "embedding"], timedelta(hours=1))
    header = jwt.get_unverified_header(token)
    assert header["kid"] == key.id and header["alg"] == "ES256"
    verified = keys.verify_token(token, keys.jwks([key]))
    assert verified == {
        "iss": "aimesh", "aud": "aimesh", "tenant": "acme", "scope": "text embedding",
        "jti": claims.id, "iat": int(claims.issued_at.timestamp()),
        "exp": int(claims.expires_at.timestamp()),
    }
    assert claims.expires_at - claims.issued_at == timedelta(hours=1)
    jwk = keys.jwks([key])["keys"][0]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["kid"] == key.id
    assert "d" not in jwk  # the private part never reaches the JWKS
    json.dumps(keys.jwks([key]))  # a plain JSON document


def test_token_ids_are_unique_and_url_safe():
    key = keys.new_signing_key()
    ids = {keys.issue_token(key, "acme", ["text"], timedelta(minutes=5))[1].id for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) >= 20 and set(i) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
               for i in ids)


def test_an_expired_token_is_refused():
    key = keys.new_signing_key()
    past = datetime.now(UTC) - timedelta(hours=2)
    token, _ = keys.issue_token(key, "acme", ["text"], timedelta(hours=1), now=past)
    with pytest.raises(jwt.ExpiredSignatureError):
        keys.verify_token(token, keys.jwks([key]))


def test_a_token_of_an_unknown_key_a_forged_payload_or_another_audience_is_refused():
    key, other = keys.new_signing_key(), keys.new_signing_key()
    token, _ = keys.issue_token(key, "acme", ["text"], timedelta(hours=1))
    with pytest.raises(jwt.InvalidTokenError, match="unknown key"):
        keys.verify_token(token, keys.jwks([other]))

    # Same kid, other key: the signature does not match.
    impostor = keys.SigningKey(id=key.id, private_pem=other.private_pem,
                               public_jwk=other.public_jwk, created_at=other.created_at)
    forged, _ = keys.issue_token(impostor, "acme", ["admin"], timedelta(hours=1))
    with pytest.raises(jwt.InvalidSignatureError):
        keys.verify_token(forged, keys.jwks([key]))

    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["tenant"] = "someone-else"
    tampered = ".".join([header, jwt.utils.base64url_encode(json.dumps(claims).encode()).decode(),
                         signature])
    with pytest.raises(jwt.InvalidSignatureError):
        keys.verify_token(tampered, keys.jwks([key]))

    with pytest.raises(jwt.InvalidAudienceError):
        keys.verify_token(token, keys.jwks([key]), audience="another-mesh")


def test_a_retired_key_signs_nothing():
    key = keys.new_signing_key()
    retired = keys.SigningKey(id=key.id, private_pem=key.private_pem, public_jwk=key.public_jwk,
                              created_at=key.created_at, retired_at=datetime.now(UTC))
    with pytest.raises(ValueError, match="retired"):
        keys.issue_token(retired, "acme", ["text"], timedelta(hours=1))
    assert keys.jwks([retired]) == {"keys": []}


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'aimesh.db'}")
    migrate(engine)
    store = TenantStore(engine)
    store.create_tenant("acme")
    yield store
    engine.dispose()


def test_rotation_keeps_old_tokens_valid_until_their_key_is_retired(store):
    old_token, old = store.issue_token("acme", ["text"])
    new_key, active = store.rotate_signing_key()
    assert [k.id for k in active] == [old.key_id, new_key.id]
    new_token, new = store.issue_token("acme", ["text"])
    assert new.key_id == new_key.id != old.key_id  # the newest key signs
    for token in (old_token, new_token):
        keys.verify_token(token, store.jwks())

    store.retire_signing_key(old.key_id)
    assert [k["kid"] for k in store.jwks()["keys"]] == [new_key.id]
    with pytest.raises(jwt.InvalidTokenError, match="unknown key"):
        keys.verify_token(old_token, store.jwks())
    keys.verify_token(new_token, store.jwks())
    assert [k.id for k in store.signing_keys(include_retired=True)] == [old.key_id, new_key.id]


def test_rotate_with_retire_old_keeps_only_the_previous_and_the_new_key(store):
    first = store.ensure_signing_key()
    second, _ = store.rotate_signing_key()
    third, active = store.rotate_signing_key(retire_old=True)
    assert [k.id for k in active] == [second.id, third.id]
    assert first.id not in {k["kid"] for k in store.jwks()["keys"]}


def test_the_last_active_key_cannot_be_retired(store):
    only = store.ensure_signing_key()
    assert store.ensure_signing_key() == only  # made once
    with pytest.raises(InvalidArgument) as caught:
        store.retire_signing_key(only.id)
    assert caught.value.field == "key_id"
    with pytest.raises(InvalidArgument):
        store.retire_signing_key("no-such-key")


def test_trusted_issuers_file(tmp_path):
    idp_key = keys.new_signing_key()
    (tmp_path / "idp.json").write_text(json.dumps(keys.jwks([idp_key])))
    path = tmp_path / "issuers.yaml"
    path.write_text(
        "- issuer: https://idp.example.com/\n"
        "  audiences: [aimesh, api]\n"
        "  jwks_file: idp.json\n"
        "  tenant_claim: org\n")
    [issuer] = keys.load_trusted_issuers(path)
    assert issuer.issuer == "https://idp.example.com/" and issuer.audiences == ("aimesh", "api")
    assert issuer.tenant_claim == "org" and issuer.scope_claim == "scope"
    assert issuer.jwks["keys"][0]["kid"] == idp_key.id


@pytest.mark.parametrize(("text", "message"), [
    ("issuer: x\n", "expected a list"),
    ("- audiences: [a]\n", "'issuer' is required"),
    ("- issuer: aimesh\n  jwks: {keys: [{kty: EC}]}\n", "aimesh's own"),
    ("- issuer: https://idp/\n", "give 'jwks'"),
    ("- issuer: https://idp/\n  jwks: {keys: []}\n", "has no keys"),
    ("- issuer: https://idp/\n  jwks: {keys: [{kty: EC, crv: P-256, x: AA, y: AA}]}\n", "bad key"),
])
def test_a_bad_trusted_issuers_file_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "issuers.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        keys.load_trusted_issuers(path)


def test_unknown_fields_in_a_trusted_issuer_are_refused(tmp_path):
    path = tmp_path / "issuers.yaml"
    jwks = json.dumps(keys.jwks([keys.new_signing_key()]))
    path.write_text(f"- issuer: https://idp/\n  jwks: {jwks}\n  tenant_clam: org\n")
    with pytest.raises(ValueError, match="tenant_clam"):
        keys.load_trusted_issuers(path)
