"""deploy/: Prometheus config and rules pass promtool, compose and manifests parse and name what exists,
and every metric the dashboard, the alerts and the guard query is one the code defines, with its labels.

Credentials: no password, token or key has a default anywhere; each one flows from one variable (compose)
or one Secret key (Kubernetes) into every component that needs it; the registry is writable only where
something writes it (learner, guard), and really read-only for the workers' read path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from loraloop.metrics import METRIC_NAMES, Metrics
from loraloop.settings import Settings
from services.guard_sources import PrometheusSource

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
LORALOOP_SERVICES = {"worker", "ingester", "learner", "guard", "gateway"}
# Subcommand each loraloop service runs: the first word must be a registered command.
EXPECTED_COMMANDS = {"worker": ["worker"], "ingester": ["feedback", "run"],
                     "learner": ["learner", "--bootstrap", "/bootstrap/labelled.csv"], "guard": ["guard"],
                     "gateway": ["gateway", "--host", "0.0.0.0", "--port", "8000"]}
LORALOOP_IMAGES = {"loraloop", "loraloop-cuda"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels that are not in the code's definitions: added by Prometheus or by histogram exposition.
OUTSIDE_LABELS = {"le", "job", "instance", "pod", "__name__"}


def _promtool() -> str | None:
    path = shutil.which("promtool")
    if path is None and os.environ.get("LORALOOP_REQUIRE_INFRA") == "1":
        pytest.fail("promtool is required (LORALOOP_REQUIRE_INFRA=1) but not installed", pytrace=False)
    return path


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not an object
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def _commands() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["project"]["entry-points"]["loraloop.commands"])


# --- promtool -------------------------------------------------------------------------------------
def test_promtool_checks_the_alert_rules() -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (set LORALOOP_REQUIRE_INFRA=1 to require it)")
    result = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout + result.stderr)


def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path) -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (set LORALOOP_REQUIRE_INFRA=1 to require it)")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # In the container the rules are mounted at /etc/prometheus/alerts.yml: check the real file.
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {f"loraloop-{s}" for s in LORALOOP_SERVICES} <= jobs


def test_promtool_checks_the_kubernetes_prometheus_config(tmp_path: Path) -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (set LORALOOP_REQUIRE_INFRA=1 to require it)")
    configmap = yaml.safe_load((K8S / "prometheus-config.yaml").read_text())
    config = yaml.safe_load(configmap["data"]["prometheus.yml"])
    assert config["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] == "pod"
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    if "field kubernetes_sd_configs not found" in output:  # Debian builds promtool without Kubernetes discovery
        config["scrape_configs"][0].pop("kubernetes_sd_configs")
        config["scrape_configs"][0]["static_configs"] = [{"targets": ["127.0.0.1:9100"]}]
        checked.write_text(yaml.safe_dump(config))
        result = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
    assert result.returncode == 0, output


# --- compose ----------------------------------------------------------------------------------------
def test_compose_has_every_service_with_the_right_images() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"kafka", "redis", "prometheus", "grafana"} | LORALOOP_SERVICES <= set(services)
    assert services["kafka"]["image"].split(":")[0] in {"apache/kafka", "bitnami/kafka"}
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["redis"]["image"].startswith("redis:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in LORALOOP_SERVICES:
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert "loraloop" in service["image"]
        assert service["command"] == EXPECTED_COMMANDS[name]
        assert service["command"][0] in _commands()
        env = service["environment"]
        assert env["LORALOOP_TRANSPORT"] == "kafka" and env["LORALOOP_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
        assert env["LORALOOP_REDIS_URL"].endswith("@redis:6379/0")
        assert env["LORALOOP_METRICS_PORT"] == "9100"
    assert services["worker"]["deploy"]["replicas"] == "${WORKER_REPLICAS:-2}"
    assert int(_rendered()["services"]["worker"]["deploy"]["replicas"]) == 2
    assert int(_rendered({**COMPOSE_VALUES, "WORKER_REPLICAS": "5"})["services"]["worker"]["deploy"]["replicas"]) == 5
    devices = services["learner"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert services["guard"]["environment"]["LORALOOP_PROMETHEUS_URL"] == "http://prometheus:9090"


def test_compose_mounts_files_that_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_every_loraloop_variable_is_a_setting() -> None:
    """A typo in an environment variable would silently fall back to the default."""
    fields = {f"LORALOOP_{name.upper()}" for name in Settings.model_fields}
    used: set[str] = set()
    for service in _compose()["services"].values():
        used |= {k for k in service.get("environment", {}) if k.startswith("LORALOOP_")}
    for doc in _manifests():
        used |= {k for k in (doc.get("data") or {}) | (doc.get("stringData") or {}) if k.startswith("LORALOOP_")}
        for container in _containers(doc):
            used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("LORALOOP_")}
    used |= set(re.findall(r"LORALOOP_[A-Z0-9_]+", (DEPLOY / "Dockerfile").read_text()))
    assert used, "no LORALOOP_ variables found"
    assert used <= fields, f"not settings: {sorted(used - fields)}"


# --- kubernetes -------------------------------------------------------------------------------------
def _containers(doc: dict) -> list[dict]:
    if doc.get("kind") != "Deployment":
        return []
    return doc["spec"]["template"]["spec"]["containers"]


def _is_loraloop(doc: dict) -> bool:
    """A Deployment of a loraloop process (not the bundled Prometheus)."""
    return any(c["image"] in LORALOOP_IMAGES for c in _containers(doc))


def test_manifests_parse_and_cover_the_loop() -> None:
    docs = _manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("ConfigMap", "loraloop-settings"), ("Secret", "loraloop-secrets"),
                     ("Deployment", "loraloop-worker"), ("Deployment", "loraloop-learner"),
                     ("Deployment", "loraloop-ingester"), ("Deployment", "loraloop-guard"),
                     ("Service", "loraloop-worker"), ("ScaledObject", "loraloop-worker")]:
        assert expected in kinds, f"missing {expected}"
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_deployments_have_probes_settings_and_valid_commands() -> None:
    deployments = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "Deployment" and _is_loraloop(d)}
    assert {n.removeprefix("loraloop-") for n in deployments} == LORALOOP_SERVICES
    for name, doc in deployments.items():
        (container,) = _containers(doc)
        assert container["image"] in LORALOOP_IMAGES
        assert container["args"][0] in _commands(), f"{name}: unknown subcommand {container['args']}"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 9100
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"loraloop-settings"}  # secrets come key by key (secretKeyRef), never the whole Secret
        assert doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    learner = _containers(deployments["loraloop-learner"])[0]
    assert learner["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployments["loraloop-learner"]["spec"]["replicas"] == 1
    for name in ("loraloop-worker", "loraloop-ingester", "loraloop-guard", "loraloop-gateway"):
        assert "nvidia.com/gpu" not in str(_containers(deployments[name])[0]["resources"])


def test_workers_scale_on_consumer_lag() -> None:
    (scaled,) = [d for d in _manifests() if d["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "loraloop-worker"
    triggers = {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    settings = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "ConfigMap"}["loraloop-settings"]["data"]
    assert triggers["kafka"]["consumerGroup"] == settings["LORALOOP_WORKER_GROUP"]
    assert triggers["kafka"]["topic"] == settings["LORALOOP_REQUESTS_TOPIC"]
    assert "loraloop_consumer_lag" in triggers["prometheus"]["query"]
    assert scaled["spec"]["minReplicaCount"] >= 1 and scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]


# --- metric names and labels ------------------------------------------------------------------------
_METRIC = re.compile(r"\bloraloop_[a-z0-9_]+")
_SELECTOR = re.compile(r"\b(loraloop_[a-z0-9_]+)\{([^}]*)\}")
_BY = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def _base_name(name: str) -> str:
    if name in METRIC_NAMES:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in METRIC_NAMES:
            return name[: -len(suffix)]
    return name


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def _alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _guard_exprs() -> list[str]:
    return list(PrometheusSource("http://unused", 0.5).queries("v000001").values())


def _exposed_labels() -> dict[str, set[str]]:
    """Label names of every family, read from what ``Metrics()`` really exposes once each child exists."""
    metrics = Metrics(CollectorRegistry())
    for collector in set(_collectors(metrics).values()):
        names = getattr(collector, "_labelnames", ())  # a labelled family exposes nothing until a child exists
        if names:
            collector.labels(*("x" for _ in names))
    labels: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(_base_name(sample.name), set()).update(sample.labels)
    return labels


def _collectors(metrics: Metrics) -> dict[str, object]:
    out = {}
    for collector in vars(metrics).values():
        describe = getattr(collector, "describe", None)
        if describe is None or collector is metrics.registry:
            continue
        for family in describe():
            name = family.name + ("_total" if family.type == "counter" else "")
            name = name + "_info" if family.type == "info" else name
            out[name] = collector
    return out


def test_metric_names_match_the_definitions() -> None:
    """METRIC_NAMES is exactly what Metrics() exposes: a rename must update both (and the tests below)."""
    assert set(_collectors(Metrics(CollectorRegistry()))) == METRIC_NAMES


@pytest.mark.parametrize("source", ["dashboard", "alerts", "guard"])
def test_every_queried_metric_is_defined(source: str) -> None:
    exprs = {"dashboard": _dashboard_exprs, "alerts": _alert_exprs, "guard": _guard_exprs}[source]()
    assert exprs
    names = {m for e in exprs for m in _METRIC.findall(e)}
    unknown = sorted(n for n in names if _base_name(n) not in METRIC_NAMES)
    assert not unknown, f"{source} queries metrics the code does not define: {unknown}"


@pytest.mark.parametrize("source", ["dashboard", "alerts", "guard"])
def test_every_queried_label_is_defined(source: str) -> None:
    """Label matchers and by(...) clauses name only labels the metric has (a renamed label breaks panels)."""
    exprs = {"dashboard": _dashboard_exprs, "alerts": _alert_exprs, "guard": _guard_exprs}[source]()
    labels = _exposed_labels()
    problems = []
    for expr in exprs:
        metrics_in_expr = {_base_name(m) for m in _METRIC.findall(expr)}
        for name, matchers in _SELECTOR.findall(expr):
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                if label not in labels.get(_base_name(name), set()) | OUTSIDE_LABELS:
                    problems.append(f"{name}{{{label}}} in {expr!r}")
        known = set().union(*(labels.get(m, set()) for m in metrics_in_expr)) | OUTSIDE_LABELS
        for group in _BY.findall(expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if metrics_in_expr and label not in known:
                    problems.append(f"by/on ({label}) in {expr!r}")
    assert not problems, "\n".join(problems)


def test_label_sets_of_the_definitions() -> None:
    """The labels the dashboard, alerts and guard group by, pinned per metric."""
    labels = _exposed_labels()
    expected = {
        "loraloop_requests_served_total": {"adapter_version"},
        "loraloop_dead_letters_total": {"source", "reason"},
        "loraloop_end_to_end_seconds": {"adapter_version", "le"},
        "loraloop_prediction_confidence": {"adapter_version", "le"},
        "loraloop_consumer_lag": {"topic", "partition"},
        "loraloop_active_adapter": {"adapter_version"},
        "loraloop_adapter_swaps_total": {"outcome"},
        "loraloop_feedback_events_total": {"kind", "outcome"},
        "loraloop_judged_total": {"adapter_version"},
        "loraloop_correct_total": {"adapter_version"},
        "loraloop_learner_cycles_total": {"trigger", "outcome"},
        "loraloop_feedback_quarantined_total": {"reason"},
        "loraloop_eval_accuracy": {"dataset", "role"},
        "loraloop_promotions_total": {"reason"},
        "loraloop_rollbacks_total": {"reason"},
        "loraloop_guard_decisions_total": {"action", "reason"},
        "loraloop_requests_consumed_total": set(),
        "loraloop_buffer_depth": set(),
        "loraloop_learner_last_cycle_timestamp_seconds": set(),
    }
    for name, label_set in expected.items():
        assert labels[name] == label_set, f"{name}: {labels[name]} != {label_set}"


def test_dashboard_is_provisioned() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "latency", "lag", "correctness", "learner cycles", "buffer"):
        assert topic in titles, f"no panel about {topic}"
    annotations = {a["name"] for a in dashboard["annotations"]["list"]}
    assert {"Promotions", "Rollbacks"} <= annotations
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "loraloop.yml").read_text())
    mounted = [v for v in _compose()["services"]["grafana"]["volumes"] if "dashboard.json" in v]
    assert mounted and mounted[0].split(":")[1].startswith(provider["providers"][0]["options"]["path"])


def test_alerts_fire_on_synthetic_series() -> None:
    """promtool's rule unit tests: correctness drop, stuck learner, dead letters and growing lag fire as meant."""
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (set LORALOOP_REQUIRE_INFRA=1 to require it)")
    result = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- credentials: compose ---------------------------------------------------------------------------
# What compose does with ${...} (https://docs.docker.com/compose/how-tos/environment-variables/variable-interpolation/),
# applied to every string of the parsed file: $$ is a literal $, ${V:?msg} / ${V?msg} fail when V is unset
# (or, with the colon, empty), ${V:-x} / ${V-x} fall back to x.
_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
# Variables that may have a default: image names, never a credential.
DEFAULTS_ALLOWED = {"LORALOOP_IMAGE", "LORALOOP_CUDA_IMAGE", "WORKER_REPLICAS"}
COMPOSE_SECRETS = {"REDIS_PASSWORD": "redis-pw-1f3a", "KAFKA_SASL_PASSWORD": "kafka-pw-77c2",
                   "KAFKA_ADMIN_PASSWORD": "kafka-admin-pw-9e01", "LORALOOP_API_TOKEN": "api-token-5b6d",
                   "GRAFANA_ADMIN_PASSWORD": "grafana-pw-0a0a", "REGISTRY_SIGNING_KEY_FILE": "/keys/signing.pem",
                   "REGISTRY_VERIFY_KEY_FILE": "/keys/verify.pem"}
# Required and not a credential: the labelled CSV the learner bootstraps from.
COMPOSE_VALUES = {**COMPOSE_SECRETS, "BOOTSTRAP_CSV": "/data/labelled.csv"}
READERS = {"worker", "ingester", "gateway"}  # registry read-only
WRITERS = {"learner", "guard"}  # the learner publishes and promotes; the guard rolls back and annotates
_SECRET_NAME = re.compile(r"(PASSWORD|TOKEN|SECRET|_KEY|_AUTH)$")


class MissingVariable(KeyError):
    pass


def _interpolate(value: object, env: dict[str, str]) -> object:
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":?", "?") and missing:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def _rendered(env: dict[str, str] | None = None) -> dict:
    return _interpolate(_compose(), COMPOSE_VALUES if env is None else env)


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_compose_credentials_have_no_defaults() -> None:
    """Every ${...} of a credential fails when unset; nothing secret is written into the file itself."""
    uses = [m for s in _strings(_compose()) for m in _INTERPOLATION.finditer(s) if m.group(1)]
    with_default = {m.group(1) for m in uses if m.group(2) in (":-", "-")}
    assert with_default <= DEFAULTS_ALLOWED, f"variables with a default: {sorted(with_default - DEFAULTS_ALLOWED)}"
    required = {m.group(1) for m in uses if m.group(2) == ":?"}
    assert {m.group(1) for m in uses} - DEFAULTS_ALLOWED == required, "a bare ${VAR} silently becomes empty"
    assert set(COMPOSE_VALUES) == required
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if _SECRET_NAME.search(key):
                assert "${" in value or value.startswith("/run/secrets/"), f"{name}: {key} is written in the file"
    for name in COMPOSE_VALUES:  # each one alone stops the whole file, as `docker compose` would
        with pytest.raises(MissingVariable, match=name):
            _rendered({k: v for k, v in COMPOSE_VALUES.items() if k != name})
        with pytest.raises(MissingVariable, match=name):
            _rendered({**COMPOSE_VALUES, name: ""})
    example = (DEPLOY / ".env.example").read_text()
    listed = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(listed) - DEFAULTS_ALLOWED == set(COMPOSE_VALUES), "the example must list every credential"
    assert not any(listed[k] for k in COMPOSE_VALUES), "the example must leave every credential empty"


def test_every_compose_component_gets_the_redis_password_and_kafka_sasl() -> None:
    from redis.connection import parse_url

    services = _rendered()["services"]
    kafka = services["kafka"]["environment"]
    jaas = kafka["KAFKA_LISTENER_NAME_CLIENT_PLAIN_SASL_JAAS_CONFIG"]
    accounts = dict(re.findall(r'user_([A-Za-z0-9_]+)="([^"]*)"', jaas))
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    for listener in kafka["KAFKA_LISTENERS"].split(","):  # nothing on the network without credentials
        name, address = listener.split("://")
        assert protocols[name].startswith("SASL_") or address.startswith("localhost:"), listener
    assert "PLAIN" in kafka["KAFKA_SASL_ENABLED_MECHANISMS"].split(",")
    advertised = dict(reversed(a.split("://")) for a in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    for name in LORALOOP_SERVICES:
        env = services[name]["environment"]
        assert parse_url(env["LORALOOP_REDIS_URL"])["password"] == COMPOSE_SECRETS["REDIS_PASSWORD"], name
        assert env["LORALOOP_KAFKA_SECURITY_PROTOCOL"] == protocols[advertised[env["LORALOOP_KAFKA_BOOTSTRAP"]]]
        assert env["LORALOOP_KAFKA_SASL_MECHANISM"] in kafka["KAFKA_SASL_ENABLED_MECHANISMS"].split(",")
        assert accounts[env["LORALOOP_KAFKA_SASL_USERNAME"]] == env["LORALOOP_KAFKA_SASL_PASSWORD"], name
        Settings(**{k[len("LORALOOP_"):].lower(): v for k, v in env.items()})  # every value is a valid setting
    redis_env = services["redis"]["environment"]
    assert redis_env["REDIS_PASSWORD"] == redis_env["REDISCLI_AUTH"] == COMPOSE_SECRETS["REDIS_PASSWORD"]
    command = " ".join(services["redis"]["command"])
    assert "requirepass" in command and '"$REDIS_PASSWORD"' in command  # the container's shell expands it
    assert COMPOSE_SECRETS["REDIS_PASSWORD"] not in command, "the password must not be on the command line"
    assert re.search(r"--appendonly yes --appendfsync (everysec|always)\b", command), "the ingester needs AOF"
    assert services["redis"]["user"] == "redis"  # a command starting with sh keeps the entrypoint from dropping root
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == COMPOSE_SECRETS["GRAFANA_ADMIN_PASSWORD"]


def _registry_mode(volumes: list[str]) -> str | None:
    for volume in volumes:
        source, target, *mode = volume.split("#")[0].strip().split(":")
        if source == "registry":
            assert target == "/registry"
            return mode[0] if mode else "rw"
    return None


def test_compose_registry_is_read_only_except_for_its_writers() -> None:
    services = _compose()["services"]
    modes = {name: _registry_mode(s.get("volumes", [])) for name, s in services.items()}
    assert {n for n, m in modes.items() if m is not None} == LORALOOP_SERVICES
    assert {n for n, m in modes.items() if m == "ro"} == READERS
    assert {n for n, m in modes.items() if m == "rw"} == WRITERS
    # The signing key reaches the publisher only; every loraloop process checks signatures.
    for name in LORALOOP_SERVICES:
        service, env = services[name], services[name]["environment"]
        assert "registry_verify_key" in service["secrets"]
        assert env["LORALOOP_REGISTRY_VERIFY_KEY"] == "/run/secrets/registry_verify_key"
        signs = "registry_signing_key" in service["secrets"]
        assert signs == (name == "learner") == ("LORALOOP_REGISTRY_SIGNING_KEY" in env), name
    assert services["learner"]["environment"]["LORALOOP_REGISTRY_SIGNING_KEY"] == "/run/secrets/registry_signing_key"


def test_compose_endpoint_beyond_loopback_requires_the_token() -> None:
    from feedback.http import is_loopback

    services = _rendered()["services"]
    serving = {n: s for n, s in services.items() if int(s.get("environment", {}).get("LORALOOP_FEEDBACK_HTTP_PORT", 0))}
    assert set(serving) == {"ingester"}
    for name, service in serving.items():
        env = service["environment"]
        settings = Settings(**{k[len("LORALOOP_"):].lower(): v for k, v in env.items()})
        published = [p for p in service.get("ports", []) if p.split(":")[-1] == str(settings.feedback_http_port)]
        if published:  # a published port reaches the container's interface, not its loopback
            assert not is_loopback(settings.feedback_http_host), f"{name} publishes a port it does not listen on"
        if not is_loopback(settings.feedback_http_host):
            assert settings.api_token.get_secret_value() == COMPOSE_SECRETS["LORALOOP_API_TOKEN"], name
    gateway = services["gateway"]
    host = gateway["command"][gateway["command"].index("--host") + 1]
    assert not is_loopback(host) and "8000:8000" in gateway["ports"]
    assert gateway["environment"]["LORALOOP_API_TOKEN"] == COMPOSE_SECRETS["LORALOOP_API_TOKEN"]
    for name in ("prometheus", "grafana"):  # no authentication of their own worth the network
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    """`docker-compose config` (when installed) parses, merges and interpolates the file like `up` would."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed")
    for name in ("REGISTRY_SIGNING_KEY_FILE", "REGISTRY_VERIFY_KEY_FILE"):
        (tmp_path / name).write_text("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n")
    (tmp_path / "labelled.csv").write_text("text,label\na,x\nb,y\n")
    env = {**{k: v for k, v in os.environ.items() if k not in COMPOSE_VALUES}, **COMPOSE_VALUES,
           "BOOTSTRAP_CSV": str(tmp_path / "labelled.csv"), "WORKER_REPLICAS": "3",
           "REGISTRY_SIGNING_KEY_FILE": str(tmp_path / "REGISTRY_SIGNING_KEY_FILE"),
           "REGISTRY_VERIFY_KEY_FILE": str(tmp_path / "REGISTRY_VERIFY_KEY_FILE")}
    args = [binary, "--project-directory", str(tmp_path), "-f", str(DEPLOY / "compose.yaml"), "config"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"redis://:{COMPOSE_SECRETS['REDIS_PASSWORD']}@redis:6379/0" in done.stdout
    rendered = yaml.safe_load(done.stdout)["services"]
    assert rendered["worker"]["deploy"]["replicas"] == 3
    assert f"{tmp_path / 'labelled.csv'}:/bootstrap/labelled.csv:ro" in str(rendered["learner"]["volumes"])
    missing = subprocess.run(args, capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in env.items() if k != "REDIS_PASSWORD"})
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stdout + missing.stderr


# --- credentials: kubernetes ------------------------------------------------------------------------
def _deployments() -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix("loraloop-"): d for d in _manifests()
            if d["kind"] == "Deployment" and _is_loraloop(d)}


def _secrets() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "Secret"}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _expanded(container: dict, values: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: $(VAR) of an earlier variable expanded."""
    out: dict[str, str] = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            out[entry["name"]] = values[(ref["name"], ref["key"])]
        else:
            out[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                        lambda m: out.get(m.group(1), m.group(0)), entry["value"])
    return out


def test_kubernetes_secrets_ship_empty_and_are_documented() -> None:
    secrets = _secrets()
    assert {"loraloop-secrets", "loraloop-registry-signing"} <= set(secrets)
    header = (K8S / "secret.yaml").read_text().split("apiVersion")[0]
    for name, secret in secrets.items():
        data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
        for key, value in data.items():
            if _SECRET_NAME.search(key.upper().replace("-", "_")):
                assert value == "", f"Secret {name}: {key} has a value in the repository"
                assert key in (K8S / "secret.yaml").read_text(), f"Secret {name}: {key} is not documented"
    assert {"redis-password", "kafka-sasl-password", "api-token", "registry-verify-key"} <= set(
        secrets["loraloop-secrets"]["stringData"])
    for key in ("redis-password", "kafka-sasl-password", "api-token", "registry-verify-key"):
        assert key in header, f"{key} is not documented in the header of secret.yaml"


def test_every_deployment_gets_the_redis_password_and_kafka_sasl_from_secrets() -> None:
    secrets = _secrets()
    values = {(name, key): f"{name}.{key}.value" for name, s in secrets.items() for key in s["stringData"]}
    settings = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "ConfigMap"}["loraloop-settings"]["data"]
    assert settings["LORALOOP_KAFKA_SECURITY_PROTOCOL"].startswith("SASL_")
    assert settings["LORALOOP_KAFKA_SASL_MECHANISM"] and settings["LORALOOP_KAFKA_SASL_USERNAME"]
    assert "LORALOOP_REDIS_URL" not in settings and "LORALOOP_KAFKA_SASL_PASSWORD" not in settings
    from redis.connection import parse_url

    deployments = _deployments()
    assert set(deployments) == LORALOOP_SERVICES
    for name, doc in deployments.items():
        (container,) = _containers(doc)
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert (ref["name"], ref["key"]) in values, f"{name}: {ref} names no key of a Secret"
        env = _expanded(container, values)
        assert parse_url(env["LORALOOP_REDIS_URL"])["password"] == values[("loraloop-secrets", "redis-password")]
        assert env["LORALOOP_KAFKA_SASL_PASSWORD"] == values[("loraloop-secrets", "kafka-sasl-password")]
        configured = Settings(**{k[len("LORALOOP_"):].lower(): v for k, v in {**settings, **env}.items()
                                 if k.startswith("LORALOOP_")})
        from loraloop.transport.kafka import client_config

        config = client_config(configured)
        assert config["security_protocol"] == settings["LORALOOP_KAFKA_SECURITY_PROTOCOL"]
        assert config["sasl_plain_password"] == values[("loraloop-secrets", "kafka-sasl-password")], name


def _mounts(doc: dict) -> dict[str, dict]:
    (container,) = _containers(doc)
    return {m["name"]: m for m in container["volumeMounts"]}


def _mounted_files(doc: dict) -> dict[str, tuple[str, str]]:
    """Path in the container -> (Secret, key) of every file a Secret volume mounts."""
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for name, mount in _mounts(doc).items():
        volume = volumes[name]
        sources = [{"secret": {"name": volume["secret"]["secretName"], "items": volume["secret"]["items"]}}] \
            if "secret" in volume else volume.get("projected", {}).get("sources", [])
        for source in sources:
            for item in source["secret"]["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (source["secret"]["name"], item["key"])
    return files


def test_kubernetes_registry_is_read_only_except_for_its_writers_and_keys_reach_whom_they_should() -> None:
    secrets = _secrets()
    for name, doc in _deployments().items():
        registry = _mounts(doc)["registry"]
        assert registry["mountPath"] == "/registry"
        assert registry.get("readOnly", False) == (name in READERS), f"{name}: registry readOnly"
        (container,) = _containers(doc)
        env = _env(container)
        files = _mounted_files(doc)
        assert files[env["LORALOOP_REGISTRY_VERIFY_KEY"]["value"]] == ("loraloop-secrets", "registry-verify-key")
        signing = env.get("LORALOOP_REGISTRY_SIGNING_KEY")
        assert (signing is not None) == (name == "learner"), f"{name}: only the learner signs"
        signing_files = {p for p, ref in files.items() if ref[0] == "loraloop-registry-signing"}
        assert signing_files == ({signing["value"]} if signing else set()), f"{name} mounts the signing key"
        for key_file in files.values():
            assert key_file[1] in secrets[key_file[0]]["stringData"]
        assert all(m.get("readOnly") for n, m in _mounts(doc).items() if n != "registry")


def test_kubernetes_endpoint_beyond_loopback_requires_the_token() -> None:
    from feedback.http import is_loopback

    settings = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "ConfigMap"}["loraloop-settings"]["data"]
    for name, doc in _deployments().items():
        (container,) = _containers(doc)
        env = _env(container)
        port = int(env.get("LORALOOP_FEEDBACK_HTTP_PORT", {}).get("value", settings.get("LORALOOP_FEEDBACK_HTTP_PORT", 0)))
        if not port:
            continue
        host = env.get("LORALOOP_FEEDBACK_HTTP_HOST", {}).get("value", "127.0.0.1")
        assert not is_loopback(host), f"{name}: a Service cannot reach an endpoint on the pod's loopback"
        assert port in {p["containerPort"] for p in container["ports"]}
        assert env["LORALOOP_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "loraloop-secrets",
                                                                          "key": "api-token"}, name
    (gateway,) = _containers(_deployments()["gateway"])
    host = gateway["args"][gateway["args"].index("--host") + 1]
    assert not is_loopback(host) and int(gateway["args"][gateway["args"].index("--port") + 1]) in {
        p["containerPort"] for p in gateway["ports"]}
    assert _env(gateway)["LORALOOP_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "loraloop-secrets",
                                                                                "key": "api-token"}


# --- a read-only registry is enough for a worker ------------------------------------------------------
_READER = '''
import json, sys
from pathlib import Path
from tests.test_worker_memory import Stack, serve_until

work, base, registry, verify_key, active, other = sys.argv[1:]
stack = Stack(Path(work), Path(base), registry_url=registry, registry_pointer="file", registry_verify_key=verify_key)
ids = stack.requests(5)
with stack.worker() as worker:
    serve_until(worker, lambda: len(stack.predictions()) == 5, timeout=60)
out = {"served": sorted({(p.adapter_version, p.label) for p in stack.predictions()}), "ids": len(ids)}
try:
    stack.registry.promote(other)
    out["promote"] = "accepted"
except Exception as e:
    out["promote"] = f"{type(e).__name__}: {e}"
try:
    Path(registry, "probe").write_bytes(b"x")
    out["write"] = "accepted"
except OSError as e:
    out["write"] = e.strerror
print(json.dumps(out))
'''


def test_a_worker_serves_from_a_read_only_registry_and_cannot_write_it(tmp_path: Path) -> None:
    """The manifests mount the registry read-only for workers: the worker's whole read path (pointer,
    signature check, fetch, serving) works on a read-only bind mount, and a write there fails."""
    from pydantic import SecretStr

    from loraloop.registry import make_registry
    from loraloop.registry.signing import generate_key_pair
    from loraloop.testing import build_constant_adapter, save_tiny_base_model

    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root, unshare and mount")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode != 0:
        pytest.skip("no mount namespaces here (unshare -m refused)")
    base = save_tiny_base_model(tmp_path / "base")
    private, public = generate_key_pair(tmp_path / "keys")
    settings = Settings(base_model=str(base), registry_url=str(tmp_path / "registry"), registry_pointer="file",
                        registry_signing_key=SecretStr(str(private)), label_capacity=8)
    publisher = make_registry(settings)  # the learner's side, read-write
    labels = ["a", "b", "c"]
    active = publisher.promote(publisher.publish(build_constant_adapter(settings, labels, "b", tmp_path / "b"))).version
    other = publisher.publish(build_constant_adapter(settings, labels, "c", tmp_path / "c", seed=1))
    (tmp_path / "worker").mkdir()
    registry = str(tmp_path / "registry")
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", registry,
         sys.executable, "-c", _READER, str(tmp_path / "worker"), str(base), registry, str(public), active, other],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["served"] == [[active, "b"]] and out["ids"] == 5
    assert out["write"] == "Read-only file system"
    assert out["promote"] != "accepted" and "read-only" in out["promote"].lower(), out["promote"]
    assert publisher.active().version == active and not (tmp_path / "registry" / "probe").exists()


# --- schemas, topics, bootstrap -----------------------------------------------------------------------
KUBERNETES_VERSION = "1.30"
# KEDA's kinds are CRDs, in no Kubernetes schema: the parts of KEDA v2's CRD schemas (keda.sh_scaledobjects,
# keda.sh_triggerauthentications) that these manifests use, with their required fields and types.
_KEDA_SCHEMAS = {
    "ScaledObject": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                     "properties": {
                         "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {
                             "name": {"type": "string"}, "kind": {"type": "string"},
                             "apiVersion": {"type": "string"}}, "additionalProperties": False},
                         "minReplicaCount": {"type": "integer", "minimum": 0},
                         "maxReplicaCount": {"type": "integer", "minimum": 1},
                         "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                         "advanced": {"type": "object", "properties": {
                             "horizontalPodAutoscalerConfig": {"type": "object", "properties": {
                                 "behavior": {"type": "object"}, "name": {"type": "string"}}}}},
                         "triggers": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                             "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                            "metadata": {"type": "object",
                                                         "additionalProperties": {"type": "string"}},
                                            "authenticationRef": {"type": "object", "required": ["name"]},
                                            "metricType": {"type": "string"}}}}}}}},
    "TriggerAuthentication": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "TriggerAuthentication"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {"type": "object", "additionalProperties": False, "properties": {
                "secretTargetRef": {"type": "array", "items": {
                    "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                    "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                                   "key": {"type": "string"}}}}}}}},
}


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_every_kubernetes_manifest_validates_against_the_schema(path: str) -> None:
    """Strict validation (unknown fields refused) against the bundled Kubernetes OpenAPI schemas (offline)."""
    import jsonschema
    import kubernetes_validate

    for doc in (d for d in yaml.safe_load_all((K8S / path).read_text()) if d is not None):
        if doc["kind"] in _KEDA_SCHEMAS:
            jsonschema.validate(doc, _KEDA_SCHEMAS[doc["kind"]])
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_refuses_a_broken_manifest() -> None:
    import kubernetes_validate

    (worker,) = [d for d in _manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "loraloop-worker"]
    broken = json.loads(json.dumps(worker))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(worker))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_prometheus_runs_the_scrape_config_and_the_alert_rules() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    alerts = docs[("ConfigMap", "loraloop-alerts")]["data"]
    assert yaml.safe_load(alerts["loraloop-alerts.yml"]) == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    prometheus = docs[("Deployment", "loraloop-prometheus")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in prometheus["volumes"] if "configMap" in v}
    (container,) = prometheus["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_file = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--config.file="))
    assert volumes["config"] == "loraloop-prometheus" and config_file == f"{mounts['config']}/prometheus.yml"
    config = yaml.safe_load(docs[("ConfigMap", "loraloop-prometheus")]["data"]["prometheus.yml"])
    assert volumes["rules"] == "loraloop-alerts"
    assert any(Path(f).parent == Path(mounts["rules"]) and Path("loraloop-alerts.yml").match(Path(f).name)
               for f in config["rule_files"])
    assert prometheus["serviceAccountName"] in {n for k, n in docs if k == "ServiceAccount"}
    role = docs[("Role", "loraloop-prometheus")]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
    service = docs[("Service", "loraloop-prometheus")]
    url = f"http://{service['metadata']['name']}.loraloop.svc:{service['spec']['ports'][0]['port']}"
    settings = docs[("ConfigMap", "loraloop-settings")]["data"]
    assert settings["LORALOOP_PROMETHEUS_URL"] == url  # the guard reads this Prometheus
    (scaled,) = [d for d in _manifests() if d["kind"] == "ScaledObject"]
    assert {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}["prometheus"]["serverAddress"] == url


def test_topics_are_created_by_the_brokers_own_tool() -> None:
    defaults = {Settings.model_fields[f].default for f in ("requests_topic", "predictions_topic", "feedback_topic",
                                                           "dead_letter_topic")}
    compose = _compose()["services"]
    init = compose["kafka-init"]
    script = " ".join(init["command"])
    assert init["image"] == compose["kafka"]["image"] and "/opt/kafka/bin/kafka-topics.sh" in script
    assert "--create --if-not-exists" in script
    assert all(re.search(rf"(?<![\w.-]){re.escape(t)}(?![\w.-])", script) for t in defaults), defaults
    for name in LORALOOP_SERVICES - {"guard"}:  # the guard talks to Prometheus and the registry only
        assert compose[name]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully", name
    (job,) = [d for d in _manifests() if d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["command"])
    assert "/opt/kafka/bin/kafka-topics.sh" in script and "--create --if-not-exists" in script
    settings = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "ConfigMap"}["loraloop-settings"]["data"]
    for key in ("LORALOOP_REQUESTS_TOPIC", "LORALOOP_PREDICTIONS_TOPIC", "LORALOOP_FEEDBACK_TOPIC",
                "LORALOOP_DEAD_LETTER_TOPIC", "LORALOOP_KAFKA_BOOTSTRAP", "LORALOOP_KAFKA_SASL_USERNAME"):
        assert f"${key}" in script and key in settings
    assert container["envFrom"] == [{"configMapRef": {"name": "loraloop-settings"}}]
    assert _env(container)["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "kafka-sasl-password"
    assert "$KAFKA_SASL_PASSWORD" in script and settings["LORALOOP_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert "ScramLoginModule" in script


def test_the_learner_bootstraps_from_a_mounted_csv_or_does_not_start() -> None:
    learner = _compose()["services"]["learner"]
    path = learner["command"][learner["command"].index("--bootstrap") + 1]
    assert any(v.endswith(f":{path}:ro") and v.startswith("${BOOTSTRAP_CSV:?") for v in learner["volumes"])
    doc = _deployments()["learner"]
    (container,) = _containers(doc)
    path = container["args"][container["args"].index("--bootstrap") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}[mounts[str(Path(path).parent)]]
    assert volume["configMap"]["optional"] is False and volume["configMap"]["name"] == "loraloop-bootstrap"
    assert "loraloop-bootstrap" in (K8S / "kustomization.yaml").read_text()  # how to create it is documented


def test_the_image_ships_every_component_package() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        name = pattern.rstrip("*")
        assert f"COPY {name} ./{name}" in dockerfile, f"the image lacks {name}/"
