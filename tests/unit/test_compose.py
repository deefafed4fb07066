"""The deployment pieces no Docker engine runs here: compose.yml validated by the real
docker-compose (apt, installed by scripts/setup.sh), its services checked against the
compose registry, and deploy/Dockerfile's install kept in step with scripts/setup.sh."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aimesh_servers.registry.schema import Registry, load_registry

from tests.conftest import ROOT

COMPOSE = ROOT / "compose.yml"
REGISTRY = ROOT / "deploy" / "registry.yaml"


ENV_EXAMPLE = ROOT / ".env.example"


def docker_compose_config(path: Path, env_file: Path | None = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: scripts/setup.sh installs it (apt)"
    env = ["--env-file", str(env_file)] if env_file else []
    return subprocess.run([binary, "-f", str(path), *env, "config"], capture_output=True, text=True,
                          check=False, timeout=60, cwd=path.parent)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved like compose does


def test_docker_compose_accepts_the_file_and_rejects_a_broken_one(tmp_path):
    valid = docker_compose_config(COMPOSE)
    assert valid.returncode == 0, valid.stderr
    assert {"consul", "mesh", "redis", "postgres", "text"} <= set(yaml.safe_load(valid.stdout)["services"])
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on:\n      b: {condition: bogus}\n")
    assert docker_compose_config(broken).returncode != 0  # the validation is not a rubber stamp


def _without_replicas(registry: Registry) -> list[dict]:
    return [{**model.model_dump(), "pools": [p.model_dump(exclude={"replicas"}) for p in model.pools]}
            for model in registry.models]


def test_compose_registry_is_the_builtin_one_with_no_servers_started():
    compose_registry = load_registry(REGISTRY)
    assert all(pool.replicas == 0 for model in compose_registry.models for pool in model.pools)
    assert _without_replicas(compose_registry) == _without_replicas(load_registry())


def test_every_registered_model_has_a_server_that_registers_with_consul(compose):
    services = compose["services"]
    for model in load_registry(REGISTRY).models:
        for pool in model.pools:
            [name] = [n for n, s in services.items()
                      if s.get("command", [])[:3] == ["aimesh", "serve", pool.serve]]
            server = services[name]
            assert server["command"][3:] == ["--model", model.id]
            assert server["environment"] == {
                "AIMESH_CONSUL_HTTP_ADDR": "consul:8500", "AIMESH_HOST": "0.0.0.0",
                "AIMESH_PORT": "50051", "AIMESH_POOL": pool.id, "AIMESH_ADVERTISE_HOST": name,
                "AIMESH_METRICS_PORT": "9100", "AIMESH_OTLP_ENDPOINT": "jaeger:4317",
                "AIMESH_CONSUL_TOKEN": _from_env_file("AIMESH_CONSUL_SERVER_TOKEN"),
                "AIMESH_MESH_SECRET": _from_env_file("AIMESH_MESH_SECRET"),
                "AIMESH_TLS_CERT": "/certs/model-server/cert.pem",
                "AIMESH_TLS_KEY": "/certs/model-server/key.pem", "AIMESH_TLS_CA": "/certs/ca-bundle.pem"}
            # Registers once the ACL set-up made its token, serves with the certificates made.
            assert server["depends_on"]["consul-acl"]["condition"] == "service_completed_successfully"
            assert server["depends_on"]["certs"]["condition"] == "service_completed_successfully"
            assert {"model-cache:/cache", "certs:/certs:ro"} <= set(server["volumes"])
            assert "ssl_channel_credentials" in server["healthcheck"]["test"][3]  # checked over mTLS


def test_mesh_discovers_through_consul_and_stateful_services_are_checked(compose):
    services = compose["services"]
    mesh = services["mesh"]
    command = " ".join(mesh["command"])
    assert "aimesh up --consul consul:8500 --listen 0.0.0.0" in command
    assert "--mtls --certs-dir /certs" in command and "certs:/certs:ro" in mesh["volumes"]
    assert mesh["depends_on"]["certs"] == {"condition": "service_completed_successfully"}
    assert "./deploy/registry.yaml:/etc/aimesh/registry.yaml:ro" in mesh["volumes"]
    assert "--registry /etc/aimesh/registry.yaml" in command
    assert mesh["build"]["dockerfile"] == "deploy/Dockerfile" and mesh["ports"] == ["8080:8080"]
    for name, image in (("consul", "hashicorp/consul:"), ("redis", "redis:"), ("postgres", "postgres:")):
        assert services[name]["image"].startswith(image) and services[name]["healthcheck"]["test"]
        assert any(":/" in v and not v.startswith(".") for v in services[name]["volumes"]), name
        assert {"condition": "service_healthy"} == mesh["depends_on"][name]
    assert "./consul/agent.hcl:/consul/config/agent.hcl:ro" in services["consul"]["volumes"]
    assert mesh["depends_on"]["consul-acl"] == {"condition": "service_completed_successfully"}
    assert mesh["environment"]["AIMESH_CONSUL_TOKEN"] == _from_env_file("AIMESH_CONSUL_DISCOVERY_TOKEN")


def _from_env_file(name: str) -> str:
    """How compose.yml takes a secret: from the env file, refusing to start without it."""
    return f"${{{name}:?set it in .env (see .env.example)}}"


def _env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "initial_management")


def test_no_secret_is_written_in_compose_and_each_comes_from_the_env_file(compose):
    text = COMPOSE.read_text()
    referenced = set(re.findall(r"\$\{(\w+):\?", text))
    assert referenced == set(_env_example()), "every secret compose reads is in .env.example, and only those"
    assert all(value.startswith("replace-") for value in _env_example().values())  # placeholders only
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word.lower() in f"{key} {value}".lower() for word in SECRET_WORDS):
                assert "${" in str(value), f"{name}: {key} is written in compose.yml"
    assert "aimesh:aimesh@" not in text and "password: aimesh" not in (
        GRAFANA / "provisioning" / "datasources" / "aimesh.yml").read_text()
    assert re.search(r"^\.env$", (ROOT / ".gitignore").read_text(), re.MULTILINE)
    # Without the env file compose refuses to start rather than run with empty secrets.
    missing = docker_compose_config(COMPOSE, env_file=None)
    assert missing.returncode != 0 and "set it in .env" in missing.stderr
    rendered = yaml.safe_load(docker_compose_config(COMPOSE).stdout)
    assert rendered["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "replace-me"


def test_consul_denies_by_default_and_is_reachable_from_this_host_only(compose):
    consul = compose["services"]["consul"]
    assert consul["ports"] == ["127.0.0.1:8500:8500"]
    agent = (ROOT / "consul" / "agent.hcl").read_text()
    acl = re.search(r"^acl \{(.*?)^\}", agent, re.MULTILINE | re.DOTALL).group(1)
    assert re.search(r'default_policy\s*=\s*"deny"', acl) and re.search(r"enabled\s*=\s*true", acl)
    assert re.search(r"enable_token_persistence\s*=\s*true", acl)
    assert "initial_management" in consul["environment"]["CONSUL_LOCAL_CONFIG"]
    init = compose["services"]["consul-acl"]
    assert "./consul/acl-init.sh:/acl-init.sh:ro" in init["volumes"]
    assert init["depends_on"]["consul"]["condition"] == "service_healthy"
    policies = {p.stem: p.read_text() for p in (ROOT / "consul" / "policies").glob("*.hcl")}
    assert re.search(r'service "aimesh-model-server" \{\s*policy = "write"', policies["model-server"])
    assert re.search(r'service "aimesh-model-server" \{\s*policy = "read"', policies["discovery"])
    assert "write" not in policies["discovery"]
    script = (ROOT / "consul" / "acl-init.sh").read_text()
    for variable in ("AIMESH_CONSUL_SERVER_TOKEN", "AIMESH_CONSUL_DISCOVERY_TOKEN", "CONSUL_AGENT_TOKEN"):
        assert f'"${variable}"' in script and variable in init["environment"]
    checked = subprocess.run(["sh", "-n", str(ROOT / "consul" / "acl-init.sh")], capture_output=True,
                             text=True, check=False, timeout=30)
    assert checked.returncode == 0, checked.stderr


def _setup_sh_list(name: str) -> list[str]:
    """Every word of NAME=(...) and NAME+=(...) in scripts/setup.sh."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    return [word for group in re.findall(rf"^{name}\+?=\(([^)]*)\)", setup, re.MULTILINE)
            for word in group.split()]


def test_dockerfile_installs_what_setup_sh_installs():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in dockerfile
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    for package in _setup_sh_list("MODEL_PACKAGES"):
        assert package in dockerfile, f"{package} (scripts/setup.sh) is not installed by the image"
    for package in set(_setup_sh_list("APT_PACKAGES")) - {"docker-compose"}:  # the image needs no compose
        assert package in dockerfile, f"apt {package} (scripts/setup.sh) is not installed by the image"


# --- metrics and dashboards ----------------------------------------------------------------

GRAFANA = ROOT / "deploy" / "grafana"


def _model_servers(services: dict) -> list[str]:
    return [name for name, service in services.items() if service.get("command", [])[:2] == ["aimesh", "serve"]]


def test_prometheus_scrapes_every_model_server(compose):
    services = compose["services"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:9100" for name in _model_servers(services)}
    promtool = shutil.which("promtool")  # the prometheus package (scripts/setup.sh)
    if promtool:
        checked = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                                 capture_output=True, text=True, check=False, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "aimesh.json").read_text())


def _targets(datasource_uid: str) -> list[dict]:
    return [t for panel in _dashboard()["panels"] for t in panel["targets"]
            if t["datasource"]["uid"] == datasource_uid]


def test_grafana_is_provisioned_with_the_dashboard_and_its_data_sources(compose):
    grafana = compose["services"]["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "aimesh.yml").read_text())
    by_uid = {s["uid"]: s for s in sources["datasources"]}
    assert by_uid["prometheus"]["url"] == "http://prometheus:9090"
    assert by_uid["usage"]["url"] == "postgres:5432"  # the compose PostgreSQL the mesh writes usage to
    [provider] = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "aimesh.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    used = {t["datasource"]["uid"] for panel in _dashboard()["panels"] for t in panel["targets"]}
    assert used == set(by_uid)
    titles = " ".join(panel["title"] for panel in _dashboard()["panels"]).lower()
    for topic in ("calls/s", "p95", "error", "fallback", "units", "cost by tenant", "cost by model"):
        assert topic in titles, topic


def _exposed_metric_names() -> set[str]:
    """Every sample name a model server's /metrics can show (runtime/metrics.py)."""
    from aimesh_servers.runtime.admission import Admission
    from aimesh_servers.runtime.metrics import ServerMetrics

    metrics = ServerMetrics(Admission(slots=1, max_queue=1, queue_timeout_s=1.0))
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum"))
    return names


def test_dashboard_queries_name_metrics_that_exist():
    exposed = _exposed_metric_names()
    exprs = [t["expr"] for t in _targets("prometheus")]
    assert exprs
    for expr in exprs:
        named = set(re.findall(r"\baimesh_[a-z_]+", expr))
        assert named and named <= exposed, f"{expr}: {sorted(named - exposed)} not in runtime/metrics.py"


def test_dashboard_usage_queries_run_against_the_usage_table(tmp_path):
    """The SQL panels, Grafana's macros replaced by plain SQL, on a real (SQLite) usage database."""
    import sqlalchemy as sa
    from aimesh_servers.tenancy.db import make_engine, migrate, sqlite_url

    engine = make_engine(sqlite_url(tmp_path))
    migrate(engine)
    queries = [t["rawSql"] for t in _targets("usage")]
    assert len(queries) >= 3
    with engine.connect() as db:
        for query in queries:
            plain = re.sub(r"\$__timeGroupAlias\((\w+), '[^']+'\)", r"\1 AS time", query)
            plain = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= '2000-01-01'", plain)
            assert "$__" not in plain, plain
            db.execute(sa.text(plain)).fetchall()


# --- mutual TLS ------------------------------------------------------------------------

def _certs_volume_path(path: str, certs: Path) -> Path:
    return certs / Path(path).relative_to("/certs")


def test_certs_service_makes_the_certificates_once(compose, tmp_path):
    """The certs service's own command, run for real on a folder standing for the volume:
    a CA and every certificate the first time, nothing touched the second."""
    from aimesh_servers.mesh.certs import CertStore

    service = compose["services"]["certs"]
    assert service["volumes"] == ["certs:/certs"] and service["restart"] == "no"
    script = service["command"][2].replace("/certs", str(tmp_path / "certs"))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def run_certs_service() -> bytes:
        made = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False,
                              timeout=120, env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        return CertStore(tmp_path / "certs").ca_path.read_bytes()

    assert run_certs_service() == run_certs_service()


def test_consul_checks_servers_with_its_own_mesh_certificate(compose, tmp_path):
    from aimesh_servers.mesh.certs import CONSUL_AGENT, MODEL_SERVER, CertSettings, CertStore
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    consul = compose["services"]["consul"]
    assert {"./consul/tls.hcl:/consul/config/tls.hcl:ro", "certs:/certs:ro"} <= set(consul["volumes"])
    assert consul["depends_on"]["certs"] == {"condition": "service_completed_successfully"}
    assert consul["environment"]["CONSUL_GID"] == "10001"  # reads its 0640 key as the aimesh group
    assert "groupadd --gid 10001 aimesh" in (ROOT / "deploy" / "Dockerfile").read_text()
    tls = (ROOT / "consul" / "tls.hcl").read_text()
    assert re.search(r"^enable_agent_tls_for_checks\s*=\s*true", tls, re.MULTILINE)
    files = dict(re.findall(r'(ca_file|cert_file|key_file)\s*=\s*"([^"]+)"', tls))
    # Those paths are what `aimesh certs init` writes for the consul-agent identity.
    store = CertStore(tmp_path / "certs")
    store.init(CertSettings())
    assert _certs_volume_path(files["ca_file"], store.root) == store.bundle_path
    assert _certs_volume_path(files["cert_file"], store.root) == store.cert_path(CONSUL_AGENT)
    assert _certs_volume_path(files["key_file"], store.root) == store.key_path(CONSUL_AGENT)
    assert store.key_path(CONSUL_AGENT).stat().st_mode & 0o777 == 0o640
    agent = store.leaf(CONSUL_AGENT)
    assert list(agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    # Every model server is checked at its compose name: the server certificate carries it.
    names = store.leaf(MODEL_SERVER).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(_model_servers(compose["services"])) <= set(names.get_values_for_type(x509.DNSName))
    # No private key is in the repository's deployment files: the CA key stays in the volume.
    for folder in ("consul", "deploy"):
        for path in (ROOT / folder).rglob("*"):
            assert not path.is_file() or b"PRIVATE KEY" not in path.read_bytes(), path
