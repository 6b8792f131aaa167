"""deploy/: Prometheus config and rules pass promtool, compose and manifests parse and name what exists,
and every metric the dashboard, the alerts and the guard query is one the code defines, with its labels."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
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
LORALOOP_SERVICES = {"worker", "ingester", "learner", "guard"}
# Subcommand each loraloop service runs: the first word must be a registered command.
EXPECTED_COMMANDS = {"worker": ["worker"], "ingester": ["feedback", "run"], "learner": ["learner"], "guard": ["guard"]}
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
        assert env["LORALOOP_TRANSPORT"] == "kafka" and env["LORALOOP_REDIS_URL"].startswith("redis://redis:")
        assert env["LORALOOP_METRICS_PORT"] == "9100"
    assert services["worker"]["deploy"]["replicas"] >= 2
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
    deployments = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "Deployment"}
    for name, doc in deployments.items():
        (container,) = _containers(doc)
        assert container["image"] in {"loraloop", "loraloop-cuda"}
        assert container["args"][0] in _commands(), f"{name}: unknown subcommand {container['args']}"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 9100
        refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
        assert refs == {"loraloop-settings", "loraloop-secrets"}
        assert doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    learner = _containers(deployments["loraloop-learner"])[0]
    assert learner["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployments["loraloop-learner"]["spec"]["replicas"] == 1
    for name in ("loraloop-worker", "loraloop-ingester", "loraloop-guard"):
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
