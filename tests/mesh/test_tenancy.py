"""Tenancy end to end: `aimesh up` with tenancy on (the default), real Envoy, real model
servers; tenants, tokens and limits through the admin API; every call recorded.

The second half runs two front doors (two `aimesh up`, `--front-doors 2`) that share a
real PostgreSQL and a real Redis, as a production deployment would.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aimesh
import grpc
import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import VENV_BIN
from tests.infra import redis_server
from tests.mesh.conftest import Mesh
from tests.polling import poll

pytestmark = pytest.mark.mesh

EMBED = "all-minilm-l6-v2"
TEXT = "smollm2-135m"
HI = [("user", "Say hello.")]


def away_from_window_edge(window_s: int, margin_s: float = 120.0) -> None:
    """Fixed windows are aligned to the epoch: start a window-sensitive test well inside one."""
    poll(lambda: window_s - time.time() % window_s > margin_s, "the next window", margin_s + 10, 1.0)


CONTROL_PLANE = ("usage", "admin", "registry")  # recorded too, but not model calls


def records(admin: aimesh.Client, tenant: str) -> list:
    """The tenant's model calls, as recorded."""
    return [r for r in admin.usage.iter_records(tenant=tenant, timeout=10)
            if r.capability not in CONTROL_PLANE]


def wait_records(admin: aimesh.Client, tenant: str, count: int, timeout: float = 60.0) -> list:
    return poll(lambda: (rows := records(admin, tenant)) and len(rows) >= count and rows,
                f"{count} usage records of {tenant}", timeout)


def new_tenant(admin: aimesh.Client, front: str, tenant: str, scopes: tuple[str, ...] = (),
               **create) -> str:
    """A tenant and a token the front door already knows (no model call spent on it)."""
    admin.tenants.create(tenant, **create)
    token = admin.tenants.issue_token(tenant, scopes).token
    with aimesh.Client(front, token=token, timeout=30, max_attempts=1) as client:
        poll(lambda: _known(client), f"the front door to know {tenant}", 15)
    return token


def _known(client: aimesh.Client) -> bool:
    try:
        client.usage.summary()
    except aimesh.PermissionDeniedError:
        return False
    return True


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(tmp_path_factory.mktemp("tenancy"), only=["text", "embedding"], tenancy=True)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def admin(mesh: Mesh) -> Iterator[aimesh.Client]:
    with aimesh.Client(mesh.front, token=mesh.admin_token, timeout=30) as client:
        yield client


def test_quick_start_token_works_through_sdk_grpcurl_and_curl(mesh: Mesh) -> None:
    assert str(mesh.state_dir / "local.token") in mesh.output  # the banner says where it is
    with aimesh.Client(mesh.front, token=mesh.token, timeout=30) as client:
        assert len(client.embedding.embed(EMBED, ["hello"]).embeddings) == 1
    with aimesh.Client(mesh.front, token="", timeout=30) as anonymous:
        with pytest.raises(aimesh.UnauthenticatedError) as refused:
            anonymous.embedding.embed(EMBED, ["hello"])
        assert refused.value.reason == "UNAUTHENTICATED"
        assert anonymous.registry.list_models()  # the registry stays public
    url = f"http://{mesh.front}/v1/models/{EMBED}:embed"
    assert httpx.post(url, json={"texts": ["hi"]}, timeout=30).status_code == 401
    ok = httpx.post(url, json={"texts": ["hi"]}, timeout=30,
                    headers={"authorization": f"Bearer {mesh.token}"})
    assert ok.status_code == 200 and len(ok.json()["embeddings"]) == 1
    grpcurl = [str(VENV_BIN / "grpcurl"), "-plaintext", "-max-time", "30",
               "-H", f"x-aimesh-model: {EMBED}", "-d", '{"texts": ["hi"]}']
    target = [mesh.front, "aimesh.embedding.v1.EmbeddingService/Embed"]
    served = subprocess.run([*grpcurl, "-H", f"authorization: Bearer {mesh.token}", *target],
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 0, served.stderr
    refused_cli = subprocess.run([*grpcurl, *target], capture_output=True, text=True, timeout=60)
    assert refused_cli.returncode != 0 and "Unauthenticated" in refused_cli.stderr


def test_refused_tokens_are_served_nothing_and_recorded(mesh: Mesh, admin: aimesh.Client) -> None:
    good = new_tenant(admin, mesh.front, "refusals")
    text_only = admin.tenants.issue_token("refusals", ["text"])
    revoked = admin.tenants.issue_token("refusals", ["embedding"])
    admin.tenants.revoke_token(revoked.info.id)
    stranger = jwt.encode({"iss": "aimesh", "aud": "aimesh", "tenant": "refusals", "scope": "embedding",
                           "jti": "x", "exp": int(time.time()) + 600},
                          ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                          headers={"kid": revoked.info.key_id})
    before_revocation_applied: list[bool] = []  # served while the revocation propagated
    with aimesh.Client(mesh.front, token=revoked.token, timeout=30) as client:
        poll(lambda: _refused(client, aimesh.UnauthenticatedError, before_revocation_applied),
             "revocation to reach Envoy", 10)
    for token, error in ((text_only.token, aimesh.PermissionDeniedError),
                         (stranger, aimesh.UnauthenticatedError)):
        with aimesh.Client(mesh.front, token=token, timeout=30) as client:
            with pytest.raises(error):
                client.embedding.embed(EMBED, ["refused"])
    # A caller's own identity headers never count: the call is the verified tenant's.
    channel = grpc.insecure_channel(mesh.front)
    try:
        from aimesh.embedding.v1 import embedding_pb2, embedding_pb2_grpc

        embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
            embedding_pb2.EmbedRequest(model=EMBED, texts=["mine"]), timeout=30,
            metadata=[("authorization", f"Bearer {good}"), ("x-aimesh-tenant", "someone-else"),
                      ("x-aimesh-scopes", "admin")])
    finally:
        channel.close()
    # The stranger's token proves no tenant (its claims are not trusted): its refusal is
    # recorded without one. The revoked and out-of-scope tokens' refusals are the tenant's.
    rows = wait_records(admin, "refusals", 3 + len(before_revocation_applied))
    assert not records(admin, "someone-else")
    served = [r for r in rows if r.status == "OK"]
    assert len(served) == 1 + len(before_revocation_applied)
    assert all(r.origin == "server" and r.input_units > 0 for r in served)
    refused = [r for r in rows if r.status != "OK"]
    assert {r.status for r in refused} >= {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    assert all(r.origin == "edge" and r.input_units == 0 and r.served_model == "" for r in refused)


def _refused(client: aimesh.Client, error: type[Exception], served: list[bool]) -> bool:
    try:
        client.embedding.embed(EMBED, ["probe"])
    except error:
        return True
    served.append(True)
    return False


def test_a_tenant_at_its_limit_never_slows_another(mesh: Mesh, admin: aimesh.Client) -> None:
    limited = new_tenant(admin, mesh.front, "limited")
    free = new_tenant(admin, mesh.front, "unlimited-neighbour")
    away_from_window_edge(3600)
    admin.tenants.set_limit("limited", "embedding", "requests", 3, 3600)
    poll(lambda: _at_limit(mesh, limited), "the request limit to apply", 15)
    results: dict[str, list[object]] = {"limited": [], "free": []}
    start = threading.Barrier(2)

    def calls(token: str, into: list[object]) -> None:
        with aimesh.Client(mesh.front, token=token, timeout=30, max_attempts=1) as client:
            start.wait(timeout=30)
            for _ in range(6):
                try:
                    into.append(client.embedding.embed(EMBED, ["same moment"]))
                except aimesh.AimeshError as exc:
                    into.append(exc)

    threads = [threading.Thread(target=calls, args=(limited, results["limited"])),
               threading.Thread(target=calls, args=(free, results["free"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(not isinstance(r, Exception) for r in results["free"]), results["free"]
    refusals = [r for r in results["limited"] if isinstance(r, Exception)]
    assert len(refusals) == 6  # the window's 3 calls went to _at_limit's probes
    for refusal in refusals:
        assert isinstance(refusal, aimesh.ResourceExhaustedError)
        assert refusal.reason == "RATE_LIMITED" and 0 < refusal.retry_after <= 3600
        assert refusal.quota_violations


def _at_limit(mesh: Mesh, token: str) -> bool:
    with aimesh.Client(mesh.front, token=token, timeout=30, max_attempts=1) as client:
        try:
            client.embedding.embed(EMBED, ["probe"])
        except aimesh.ResourceExhaustedError:
            return True
    return False


def test_token_limit_stops_a_tenant_once_reached_and_only_then(mesh: Mesh, admin: aimesh.Client) -> None:
    token = new_tenant(admin, mesh.front, "tokens")
    limit = 200  # prompt + completion tokens per hour
    away_from_window_edge(3600)
    admin.tenants.set_limit("tokens", "text", "units", limit, 3600)
    used, served = 0.0, 0
    with aimesh.Client(mesh.front, token=token, timeout=60, max_attempts=1) as client:
        with pytest.raises(aimesh.ResourceExhaustedError) as stopped:
            for _ in range(40):
                answer = client.text.generate(TEXT, HI, max_tokens=8)
                used += answer.usage.prompt_tokens + answer.usage.completion_tokens
                served += 1
        assert stopped.value.reason == "RATE_LIMITED"
    # Only then: nothing was refused before the tenant reached its limit. The overshoot
    # is what the calls admitted while the last charge propagated used (see quota.py).
    assert used >= limit
    per_call = used / served
    overshoot_calls = (used - limit) / per_call
    print(f"token limit {limit}: {used:g} used in {served} calls, overshoot {overshoot_calls:.1f} calls")
    assert overshoot_calls <= 6, (used, per_call)


def test_budget_stops_calls_once_spent(mesh: Mesh, admin: aimesh.Client) -> None:
    token = new_tenant(admin, mesh.front, "budget")
    with aimesh.Client(mesh.front, token=token, timeout=60, max_attempts=1) as client:
        client.text.generate(TEXT, HI, max_tokens=4)  # price one call
        first = wait_records(admin, "budget", 1)[0]
        assert first.cost_usd > 0
        admin.tenants.update("budget", monthly_budget_usd=first.cost_usd * 3.5)
        spent, calls = first.cost_usd, 1
        with pytest.raises(aimesh.ResourceExhaustedError) as stopped:
            for _ in range(30):
                client.text.generate(TEXT, HI, max_tokens=4)
                calls += 1
                spent = sum(r.cost_usd for r in wait_records(admin, "budget", calls))
        assert stopped.value.reason == "BUDGET_EXHAUSTED"
    assert spent >= first.cost_usd * 3.5  # not refused before the budget was spent
    summary = admin.usage.summary(tenant="budget")
    assert summary.monthly_budget_usd == pytest.approx(first.cost_usd * 3.5)
    assert summary.month_to_date_cost_usd >= summary.monthly_budget_usd


def test_usage_sums_equal_the_calls_made(mesh: Mesh, admin: aimesh.Client) -> None:
    token = new_tenant(admin, mesh.front, "metered")
    tokens_in = tokens_out = embed_tokens = 0.0
    with aimesh.Client(mesh.front, token=token, timeout=60) as client:
        for _ in range(3):
            answer = client.text.generate(TEXT, HI, max_tokens=6)
            tokens_in += answer.usage.prompt_tokens
            tokens_out += answer.usage.completion_tokens
        for text in ("one", "two words", "three short words"):
            embed_tokens += client.embedding.embed(EMBED, [text]).usage.input_units
        stream = client.text.stream_generate(TEXT, [("user", "Count from one to fifty.")], max_tokens=200)
        received = 0
        for piece in stream:
            received += bool(piece.text_delta)
            if received == 3:
                break  # cancels the call mid-way
    rows = wait_records(admin, "metered", 7)
    assert len(rows) == 7
    cancelled = [r for r in rows if r.method == "StreamGenerate"]
    assert len(cancelled) == 1 and cancelled[0].status == "CANCELLED"
    assert 3 <= cancelled[0].output_units < 200  # what it produced before the cancel
    texts = [r for r in rows if r.method == "Generate"]
    assert sum(r.input_units for r in texts) == tokens_in
    assert sum(r.output_units for r in texts) == tokens_out
    embeds = [r for r in rows if r.capability == "embedding"]
    assert sum(r.input_units for r in embeds) == embed_tokens
    prices = {m.id: m.prices for m in admin.registry.list_models()}
    expected_cost = (tokens_in * prices[TEXT]["input_tokens"] + tokens_out * prices[TEXT]["output_tokens"]
                     + embed_tokens * prices[EMBED]["tokens"])
    text_cost = sum(r.cost_usd for r in rows if r.capability == "text" and r.method == "Generate")
    assert text_cost + sum(r.cost_usd for r in embeds) == pytest.approx(expected_cost)
    summary = admin.usage.summary(tenant="metered", group_by="capability")
    by_capability = {line.capability: line for line in summary.lines}
    assert by_capability["embedding"].calls == 3 and by_capability["text"].calls == 4
    assert summary.total_cost_usd == pytest.approx(sum(r.cost_usd for r in rows))
    with aimesh.Client(mesh.front, token=token, timeout=30) as client:  # a tenant sees only itself
        with pytest.raises(aimesh.PermissionDeniedError):
            client.usage.summary(tenant="budget")


def test_clean_shutdown_loses_no_usage_record(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "state", only=["embedding"], tenancy=True)
    try:
        mesh.wait_ready()
        with aimesh.Client(mesh.front, token=mesh.token, timeout=30) as client:
            for i in range(40):
                client.embedding.embed(EMBED, [f"call {i}"])
    finally:
        assert mesh.stop() == 0
    with sqlite3.connect(tmp_path / "state" / "aimesh.db") as db:
        (count,) = db.execute("select count(*) from usage_records where status = 'OK' "
                              "and capability = 'embedding'").fetchone()
    assert count == 40


# --- two front doors sharing PostgreSQL and Redis -------------------------------------

SHARED_REGISTRY = """
kind: aimesh/registry/v1
models:
  - id: emb
    capability: embedding
    versions: [{version: "1", source: "builtin:all-minilm-l6-v2"}]
    prices: {tokens: 0.001}
    pools:
      - {id: primary, serve: embedding, replicas: 0}
      - {id: secondary, serve: embedding, replicas: 2}
"""


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[str]:
    with redis_server() as url:  # this module's own: a test stops it
        yield url


@pytest.fixture(scope="module")
def two_doors(tmp_path_factory: pytest.TempPathFactory, shared_redis: str,
              postgres_server) -> Iterator[tuple[Mesh, Mesh]]:
    folder = tmp_path_factory.mktemp("two-doors")
    (folder / "registry.yaml").write_text(SHARED_REGISTRY)
    database = postgres_server.create_database("two_doors")
    shared = ["--database", database, "--redis", shared_redis, "--front-doors", "2"]
    meshes = [Mesh(folder / name, registry=folder / "registry.yaml", extra_args=shared, tenancy=True)
              for name in ("one", "two")]
    try:
        for mesh in meshes:
            mesh.wait_ready()
        yield meshes[0], meshes[1]
    finally:
        for mesh in meshes:
            mesh.stop()


def test_limits_hold_across_two_front_doors_and_two_replicas(two_doors: tuple[Mesh, Mesh]) -> None:
    one, two = two_doors
    with aimesh.Client(one.front, token=one.admin_token, timeout=30) as admin:
        token = new_tenant(admin, one.front, "shared")
        away_from_window_edge(3600)
        admin.tenants.set_limit("shared", "embedding", "requests", 4, 3600)
        for mesh in (one, two):  # the other door learns of the change by polling the database
            poll(lambda m=mesh: _published_share(m, "shared") == [2, 3600], "both doors' limits")
        # Both front doors take the tenant's token (one database, one set of keys).
        served = refused = 0
        for _ in range(4):
            for mesh in (one, two):
                with aimesh.Client(mesh.front, token=token, timeout=30, max_attempts=1) as client:
                    answer = poll(lambda c=client: _served_or_limited(c), "tenant known to both doors")
                    served += answer == "served"
                    refused += answer == "limited"
        assert served == 4 and refused == 4  # each door admits half of the limit
        rows = wait_records(admin, "shared", 8)
        ok = [r for r in rows if r.status == "OK"]
        assert len(ok) == 4
        assert all(r.pool == "secondary" and r.fell_back for r in ok)  # primary has no server
        assert sum(r.status == "RESOURCE_EXHAUSTED" for r in rows) == 4


def _published_share(mesh: Mesh, tenant: str) -> list[int] | None:
    """The requests-per-window share a front door's routes (RDS file) carry for a tenant."""
    routes = yaml.safe_load((mesh.state_dir / "rds" / "routes.yaml").read_text())
    for meta in routes["resources"][0]["virtual_hosts"][0]["metadata"]["filter_metadata"].values():
        entry = meta.get("admission", {}).get("tenants", {}).get(tenant)
        if entry:
            return entry["requests"].get("embedding", {}).get("*")
    return None


def _served_or_limited(client: aimesh.Client) -> str | None:
    try:
        client.embedding.embed("emb", ["shared"])
    except aimesh.ResourceExhaustedError:
        return "limited"
    except (aimesh.UnauthenticatedError, aimesh.PermissionDeniedError):
        return None  # the other door has not picked up the new tenant (or key) yet
    return "served"


def test_units_spent_at_one_door_block_the_other(two_doors: tuple[Mesh, Mesh]) -> None:
    one, two = two_doors
    with aimesh.Client(one.front, token=one.admin_token, timeout=30) as admin:
        token = new_tenant(admin, one.front, "units-shared")
        away_from_window_edge(3600)
        admin.tenants.set_limit("units-shared", "embedding", "units", 20, 3600)
    with aimesh.Client(one.front, token=token, timeout=30, max_attempts=1) as client:
        def refused() -> bool:  # units are charged when a call's record is made: keep calling
            try:
                client.embedding.embed("emb", ["several words in this text"])
            except aimesh.ResourceExhaustedError:
                return True
            return False

        poll(refused, "the limit of 20 units to refuse a call at this door", 60)
    with aimesh.Client(two.front, token=token, timeout=30, max_attempts=1) as client:
        poll(lambda: _served_or_limited(client) == "limited", "the other door to refuse", 15)


def test_redis_down_fails_open_to_local_counters(two_doors: tuple[Mesh, Mesh], shared_redis: str) -> None:
    import redis

    one, _ = two_doors
    with aimesh.Client(one.front, token=one.admin_token, timeout=30) as admin:
        token = new_tenant(admin, one.front, "redis-down")
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis.from_url(shared_redis, socket_timeout=5).shutdown(nosave=True)
    with aimesh.Client(one.front, token=token, timeout=30, max_attempts=1) as client:
        for _ in range(3):
            assert client.embedding.embed("emb", ["still served"]).embeddings
    one.wait_line(r"shared counters unavailable", timeout=30)
