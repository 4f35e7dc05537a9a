"""Deployment artefacts, checked offline: every k8s/ manifest against the Kubernetes JSON schemas (CRDs against the
structure the Prometheus Operator needs), and the Dockerfile, the Deployment, the ConfigMap and the service's own
defaults agreeing with each other (user, ports, probes, entrypoint, drain timing, metric names)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

import service.telemetry  # registers the service's metrics
from agent.v1 import agent_pb2
from service.config import Config, load_config
from tools import load_tools

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.30"
DRAIN_TAIL_S = 3  # service.rpc.server.Service.drain after the grace: up to 2 s for streams to flush, 1 s server stop


def manifests() -> dict[str, dict[str, Any]]:
    """Every k8s/ resource by kind (one resource per file)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path.name}: one resource per file"
        found[docs[0]["kind"]] = docs[0] | {"__file__": path.name}
    return found


def resource(kind: str) -> dict[str, Any]:
    doc = dict(manifests()[kind])
    doc.pop("__file__")
    return doc


def container() -> dict[str, Any]:
    containers = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def port_of(address: str) -> int:
    port = urlsplit(f"//{address}").port
    assert port is not None
    return port


def config_from_configmap(tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(resource("ConfigMap")["data"]["config.yaml"])
    return load_config(path)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def one(instructions: list[tuple[str, str]], op: str) -> str:
    values = [arg for o, arg in instructions if o == op]
    assert len(values) == 1, f"exactly one {op} in the final stage"
    return values[0]


# --- k8s manifests against the schemas ---------------------------------------------------------------------------

CORE_KINDS = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}

# What the Prometheus Operator needs of its two CRDs (kubernetes-validate has no schema for them).
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": {"type": "object", "minProperties": 1}},
                    },
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scheme": {"enum": ["http", "https"]},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr", "labels", "annotations"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": {"type": "string", "pattern": "^[0-9]+(s|m|h)$"},
                                            "labels": {
                                                "type": "object",
                                                "required": ["severity"],
                                                "additionalProperties": {"type": "string"},
                                            },
                                            "annotations": {
                                                "type": "object",
                                                "required": ["summary"],
                                                "additionalProperties": {"type": "string"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    found = manifests()
    assert set(found) == CORE_KINDS | set(CRD_SCHEMAS) | {"Kustomization"}
    for kind in CORE_KINDS:
        # strict: unknown fields (a typo such as `readinessprobe`) are errors too.
        kubernetes_validate.validate(resource(kind), KUBERNETES_VERSION, strict=True)
    for kind in CRD_SCHEMAS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(resource(kind), KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_prometheus_operator_resources_have_the_structure_the_operator_needs(kind: str) -> None:
    jsonschema.validate(resource(kind), CRD_SCHEMAS[kind])


def test_the_schema_check_catches_a_broken_manifest() -> None:
    deployment = resource("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = resource("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = resource("Kustomization")["resources"]
    files = {doc["__file__"] for doc in manifests().values()} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(files)


# --- the pieces agree --------------------------------------------------------------------------------------------


def test_selectors_tie_the_resources_to_the_pods() -> None:
    pod_labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert resource("Deployment")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert resource("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert resource("NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    target = resource("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", resource("Deployment")["metadata"]["name"])
    service = resource("Service")
    monitor = resource("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_service_is_headless_for_client_side_grpc_balancing() -> None:
    service = resource("Service")
    assert service["spec"]["clusterIP"] == "None"
    assert "long-lived HTTP/2" in (K8S / "service.yaml").read_text()  # the reason is written where it is decided
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == port_of(Config().listen) and grpc_port["appProtocol"] == "kubernetes.io/h2c"


def test_ports_and_probes_match_the_service_defaults(tmp_path: Path) -> None:
    grpc_port, metrics_port = port_of(Config().listen), port_of(Config().metrics_listen)
    config = config_from_configmap(tmp_path)
    assert (port_of(config.listen), port_of(config.metrics_listen)) == (grpc_port, metrics_port)
    assert config.http_listen is not None  # the manifests turn the HTTP face on (off by default)
    http_port = port_of(config.http_listen)
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
    service_ports = {p["name"]: p["port"] for p in resource("Service")["spec"]["ports"]}
    assert service_ports == ports
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
    service_name = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    assert c["readinessProbe"]["grpc"]["service"] == service_name
    policy_ports = {p["port"] for rule in resource("NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert policy_ports == {grpc_port, http_port, metrics_port}


def test_drain_fits_in_the_termination_grace_period(tmp_path: Path) -> None:
    config = config_from_configmap(tmp_path)
    pod = resource("Deployment")["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    # then, at exit, the spans still queued get their bounded flush
    drain_s = pre_stop_s + config.shutdown_grace_s + DRAIN_TAIL_S + service.telemetry.SHUTDOWN_FLUSH_S
    assert drain_s <= pod["terminationGracePeriodSeconds"]
    assert config.shutdown_grace_s >= 10, "the drain grace is for in-flight runs, not a token"
    # A draining pod reports NOT_SERVING: liveness must not restart it before the drain is over.
    liveness = container()["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pre_stop_s + config.shutdown_grace_s


def test_configmap_config_is_accepted_by_the_service(tmp_path: Path) -> None:
    config = config_from_configmap(tmp_path)
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert str(config.data_dir) in mounts and "/tmp" in mounts
    tools = load_tools(tmp_path, config.tools)  # tool options too: unknown tools or options would fail here
    report = tools["shipment_report"]
    assert str(report.sandbox.options.tmp_dir) in mounts  # type: ignore[attr-defined]
    args = container()["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert str(config_path.parent) in mounts and mounts[str(config_path.parent)] == "config"


def test_pod_is_locked_down() -> None:
    pod = resource("Deployment")["spec"]["template"]["spec"]
    sc = container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    resources = container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    key = next(e for e in container()["env"] if e["name"] == "ANTHROPIC_API_KEY")
    assert "value" not in key, "the API key comes from a Secret, never from the manifest"
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True  # the offline demo starts without the Secret


def test_a_fleet_shares_its_state_and_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two or more replicas must share run state (Redis) and records (PostgreSQL), or GetRun, WatchRun and CancelRun
    land on a pod that never saw the run: the URLs come from the Secret, required, and the service reads them."""
    assert resource("Deployment")["spec"]["replicas"] >= 2
    env = {e["name"]: e for e in container()["env"]}
    for name, key in (("AGENT_STATE_URL", "state-url"), ("AGENT_RECORDS_URL", "records-url")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == key and not ref.get("optional", False), name
    egress = {p["port"] for rule in resource("NetworkPolicy")["spec"]["egress"] for p in rule["ports"]}
    assert {6379, 5432} <= egress
    monkeypatch.setenv("AGENT_STATE_URL", "redis://:secret@redis-master.data:6379/0")
    monkeypatch.setenv("AGENT_RECORDS_URL", "postgresql://agent@agent-pg-rw.data:5432/agent")
    config = config_from_configmap(tmp_path)
    assert config.state.shared and config.state.url.startswith("redis://")
    assert config.records.url == "postgresql://agent@agent-pg-rw.data:5432/agent"


def test_every_replica_signs_the_audit_chain_with_the_key_from_one_secret(tmp_path: Path) -> None:
    """With records on PostgreSQL the service refuses to start without a given key: the ConfigMap names the file,
    and the Deployment mounts it there from a Secret (required, readable by the pod's group only)."""
    key_file = config_from_configmap(tmp_path).audit.key_file
    assert key_file is not None
    mount = next(m for m in container()["volumeMounts"] if m["mountPath"] == str(key_file.parent))
    assert mount["readOnly"] is True
    pod = resource("Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = volume["secret"]
    assert not secret.get("optional", False) and secret["defaultMode"] & 0o007 == 0
    assert [item["path"] for item in secret["items"]] == [key_file.name]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]  # the group read_key_file trusts


SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""], "summary": ["_count"]}


def series_names(family: str, kind: str) -> list[str]:
    """The series Prometheus scrapes for a metric family (labelled families have no samples until first used)."""
    return [family + suffix for suffix in SUFFIXES.get(kind, [""])]


def test_alerts_use_metrics_the_service_exports() -> None:
    exported = {name for family in REGISTRY.collect() for name in series_names(family.name, family.type)}
    rules = [r for group in resource("PrometheusRule")["spec"]["groups"] for r in group["rules"]]
    used = {name for rule in rules for name in re.findall(r"\bagent_[a-z_]+\b", rule["expr"])}
    assert used, "the alerts should be about the service's own metrics"
    missing = used - exported
    assert not missing, f"alerts use metrics the service does not export: {missing}"
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "agent_tool_call_duration_seconds_bucket" in by_name["AgentToolSlowP99"]
    assert "histogram_quantile(0.99" in by_name["AgentToolSlowP99"]
    assert "agent_tool_circuit_state" in by_name["AgentToolCircuitOpen"] and "== 2" in by_name["AgentToolCircuitOpen"]
    assert "agent_runs_total{outcome!~" in by_name["AgentRunErrorRate"]


# --- Dockerfile ----------------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_ships_only_the_venv() -> None:
    instructions = dockerfile()
    assert sum(op == "FROM" for op, _ in instructions) >= 2
    assert any("slim" in arg for op, arg in instructions if op == "ARG")
    copies = [arg for op, arg in final_stage() if op == "COPY"]
    assert copies and all(arg.startswith("--from=build ") for arg in copies), "the runtime stage copies the build"


def test_dockerfile_user_is_the_deployments_non_root_user() -> None:
    user = one(final_stage(), "USER").split(":")
    uid = int(user[0])
    assert uid != 0
    pod = resource("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == container()["securityContext"]["runAsUser"] == uid
    if len(user) > 1:
        assert pod["securityContext"]["runAsGroup"] == int(user[1])


def test_dockerfile_ports_and_entrypoint_match_the_service() -> None:
    exposed = {int(p.split("/")[0]) for p in one(final_stage(), "EXPOSE").split()}
    http = one(final_stage(), "ENV").split("AGENT_HTTP_LISTEN=")[1].split()[0]  # the image turns the HTTP face on
    assert exposed == {port_of(Config().listen), port_of(http), port_of(Config().metrics_listen)}
    entrypoint = json.loads(one(final_stage(), "ENTRYPOINT"))  # exec form: signals reach the service (drain)
    assert entrypoint[-2:] == ["-m", "service"] and entrypoint[0].endswith("python")
    assert "service" in (ROOT / "service" / "__main__.py").read_text()


def test_dockerfile_data_dir_matches_the_deployment(tmp_path: Path) -> None:
    env = dict(
        item.split("=", 1) for op, arg in final_stage() if op == "ENV" for item in shlex.split(arg) if "=" in item
    )
    assert env["AGENT_DATA_DIR"] == str(config_from_configmap(tmp_path).data_dir)
    deployment_env = {e["name"]: e.get("value") for e in container()["env"]}
    assert deployment_env["AGENT_DATA_DIR"] == env["AGENT_DATA_DIR"]
    run = " ".join(arg for op, arg in final_stage() if op == "RUN")
    assert f"-m 0700 {env['AGENT_DATA_DIR']}" in run  # the audit log and dead letters: the service's alone


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    lines = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines[0] == "*", "ignore everything, then allow what the image needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for op, arg in dockerfile():
        if op == "COPY" and not arg.startswith("--from"):
            copied |= {p.rstrip("/").removeprefix("./") for p in arg.split()[:-1]}
    assert copied == allowed
    for path in copied:
        assert (ROOT / path).exists(), path


def test_the_image_gets_the_sandboxed_program() -> None:
    # The build stage installs the package (not the source tree): the program must be package data.
    with (ROOT / "pyproject.toml").open("rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["tools"]
    shipped = {p for pattern in patterns for p in (ROOT / "tools").glob(pattern)}
    programs = list((ROOT / "tools" / "data" / "programs").glob("*.py"))
    assert programs and set(programs) <= shipped
