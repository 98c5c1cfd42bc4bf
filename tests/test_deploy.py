"""Kubernetes manifests and container files, checked offline.

The overlays are rendered with ``kustomize`` (or ``kubectl kustomize``) when one is installed; CI has
neither, so :func:`render` applies the subset of Kustomize the manifests use (resources, namespace,
labels, images, strategic-merge patches of named list items, null deleting a field, patch targets and
``allowKindChange``, with which the exactly-once overlay turns the Deployment into a StatefulSet;
``configMapGenerator`` from files without the name hash, for the Grafana dashboard). Every
object is then validated against the Kubernetes schemas shipped with ``kubernetes-validate`` (strict:
unknown fields fail) or, for the custom resources, the trimmed schemas in ``deploy/schemas``; and the
values that must agree with the worker (probe paths and port, drain deadline, group id, settings names,
a stable transactional.id for exactly-once, every metric and label an alert or a dashboard panel reads)
are checked against the code.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sorter.settings import Settings, load_settings
from sorter.stream.observe import LATENCY_BUCKETS, LIVENESS_PATH, METRICS_PATH, READINESS_PATH
from sorter.stream.routing import load_routing_table
from tests.test_observe import exported_series

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # the oldest minor still in upstream support when this was written
CUSTOM = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"Deployment", "StatefulSet"}
OVERLAYS = {"cpu": "cpu", "gpu": "gpu", "exactly-once": "gpu"}  # overlay -> image flavour it runs
EXACTLY_ONCE_ENV = {"SORTER_KAFKA__DELIVERY", "SORTER_KAFKA__TRANSACTIONAL_ID", "SORTER_KAFKA__TRANSACTION_TIMEOUT_MS"}
MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath", "ports": "name"}


def _merge(base, patch, key: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:  # strategic merge: null deletes the field
                out.pop(k, None)
            else:
                out[k] = _merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        by = MERGE_KEYS[key]
        out, added = [copy.deepcopy(x) for x in base], []
        for item in patch:
            match = next((i for i, x in enumerate(out) if x.get(by) == item.get(by)), None)
            if match is None:
                added.append(copy.deepcopy(item))
            else:
                out[match] = _merge(out[match], item)
        return added + out  # kustomize puts the patch's new items first
    return copy.deepcopy(patch)


def _selected(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    fields = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(re.fullmatch(target[k], v) for k, v in fields.items() if k in target)


def render_subset(folder: Path) -> list[dict]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in k.get("resources", []):
        path = folder / resource
        if path.is_dir():
            objects += render_subset(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for generator in k.get("configMapGenerator", []):
        options = k.get("generatorOptions", {}) | generator.get("options", {})
        assert options.get("disableNameSuffixHash"), "the subset renderer does not compute kustomize's name hash"
        data = {}
        for entry in generator.get("files", []):
            key, _, path = entry.rpartition("=")  # [key=]path
            data[key or Path(path).name] = (folder / path).read_text()
        metadata = {"name": generator["name"]}
        metadata |= {field: dict(options[field]) for field in ("labels", "annotations") if options.get(field)}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for patch in k.get("patches", []):
        doc = yaml.safe_load((folder / patch["path"]).read_text())
        target = patch.get("target") or {"kind": doc["kind"], "name": re.escape(doc["metadata"]["name"])}
        options = patch.get("options", {})
        hits = [i for i, o in enumerate(objects) if _selected(o, target)]
        assert hits, f"{folder / patch['path']}: nothing matches {target}"
        for i in hits:  # like kustomize: apiVersion, and kind and name unless the options allow, stay
            merged = _merge(objects[i], doc)
            merged["apiVersion"] = objects[i]["apiVersion"]
            if not options.get("allowKindChange"):
                merged["kind"] = objects[i]["kind"]
            if not options.get("allowNameChange"):
                merged["metadata"]["name"] = objects[i]["metadata"]["name"]
            objects[i] = merged
    for image in k.get("images", []):
        for o in objects:
            for c in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    for o in objects:
        if "namespace" in k and o["kind"] not in CLUSTER_SCOPED:
            o["metadata"]["namespace"] = k["namespace"]
        for entry in k.get("labels", []):
            o["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return objects


def render(folder: Path) -> list[dict]:
    for argv in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(argv[0]):
            out = subprocess.run([*argv, str(folder)], capture_output=True, text=True, check=True).stdout
            return [d for d in yaml.safe_load_all(out) if d]
    return render_subset(folder)


def by_id(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.fixture(scope="module", params=list(OVERLAYS))
def overlay(request) -> tuple[str, dict[tuple[str, str], dict]]:
    return request.param, by_id(render(DEPLOY / "overlays" / request.param))


def test_every_rendered_object_matches_its_schema(overlay):
    _, objects = overlay
    assert {kind for kind, _ in objects} >= {
        "ConfigMap", "Service", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget", "ScaledObject",
        "TriggerAuthentication", "NetworkPolicy", "ServiceAccount",
    }  # fmt: skip
    assert workload(objects)["metadata"]["name"] == "sorter"
    for (kind, name), obj in objects.items():
        if kind in CUSTOM:
            schema = json.loads((DEPLOY / "schemas" / f"{kind.lower()}.json").read_text())
            jsonschema.validate(obj, schema)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "sorter", (kind, name)


def test_the_schema_check_can_fail():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replicaz": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_the_custom_resource_schemas_can_fail():
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"}}
    schema = json.loads((DEPLOY / "schemas" / "prometheusrule.json").read_text())
    jsonschema.validate(rule | {"spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up"}]}]}}, schema)
    for typo in ({"alert": "A", "expresion": "up"}, {"alert": "A", "expr": "up", "for": "5 minutes"}, {"expr": "up"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(rule | {"spec": {"groups": [{"name": "g", "rules": [typo]}]}}, schema)


def workload(objects) -> dict:
    """The one Deployment or StatefulSet: the worker's pods."""
    found = [o for (kind, _), o in objects.items() if kind in WORKLOADS]
    assert len(found) == 1, [(o["kind"], o["metadata"]["name"]) for o in found]
    return found[0]


def container(objects) -> dict:
    (c,) = workload(objects)["spec"]["template"]["spec"]["containers"]
    return c


def settings_from(objects) -> Settings:
    """What the worker runs with: the ConfigMap's settings.yaml under the env vars that have a literal value
    (secrets and field references are left out)."""
    data = yaml.safe_load(objects[("ConfigMap", "sorter-config")]["data"]["settings.yaml"])
    for e in container(objects)["env"]:
        if e["name"] == "SORTER_CONFIG" or "value" not in e:
            continue
        *sections, field = e["name"].removeprefix("SORTER_").lower().split("__")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[field] = e["value"]
    return Settings.model_validate(data)


def test_the_configmap_holds_valid_settings_and_a_valid_routing_table(overlay, tmp_path):
    _, objects = overlay
    data = objects[("ConfigMap", "sorter-config")]["data"]
    (tmp_path / "settings.yaml").write_text(data["settings.yaml"])
    (tmp_path / "routes.yaml").write_text(data["routes.yaml"])
    settings = load_settings(tmp_path / "settings.yaml")
    load_routing_table(tmp_path / "routes.yaml")
    mounts = {m["mountPath"]: m.get("subPath") for m in container(objects)["volumeMounts"]}
    assert mounts[str(settings.routes)] == "routes.yaml"
    env = {e["name"]: e for e in container(objects)["env"]}
    assert mounts[env["SORTER_CONFIG"]["value"]] == "settings.yaml"


def test_every_sorter_environment_variable_names_a_real_setting(overlay):
    _, objects = overlay
    for e in container(objects)["env"]:
        if e["name"] == "SORTER_CONFIG":  # the settings file itself (load_settings)
            continue
        parts = e["name"].removeprefix("SORTER_").lower().split("__")
        assert e["name"].startswith("SORTER_") and parts[0] in Settings.model_fields, e["name"]
        if len(parts) > 1:
            section = Settings.model_fields[parts[0]].annotation
            assert parts[1] in section.model_fields, e["name"]
            if parts[1] == "client":  # librdkafka pass-through: SASL_USERNAME -> sasl.username
                assert re.fullmatch(r"[a-z0-9_]+", parts[2]), e["name"]


def test_probes_and_ports_match_what_the_worker_serves(overlay):
    _, objects = overlay
    settings = settings_from(objects)
    c = container(objects)
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert port["containerPort"] == settings.observe.port
    assert c["livenessProbe"]["httpGet"] == {"path": LIVENESS_PATH, "port": "metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == LIVENESS_PATH
    assert c["readinessProbe"]["httpGet"] == {"path": READINESS_PATH, "port": "metrics"}
    service = objects[("Service", "sorter-metrics")]["spec"]
    assert service["ports"][0]["targetPort"] == "metrics" and service["ports"][0]["port"] == settings.observe.port
    (endpoint,) = objects[("ServiceMonitor", "sorter")]["spec"]["endpoints"]
    assert endpoint["port"] == service["ports"][0]["name"] and endpoint["path"] == METRICS_PATH
    ingress_ports = [
        p["port"] for rule in objects[("NetworkPolicy", "sorter")]["spec"]["ingress"] for p in rule["ports"]
    ]
    assert ingress_ports == [settings.observe.port]
    pod_labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    for kind, name in (("Service", "sorter-metrics"), ("PodDisruptionBudget", "sorter"), ("NetworkPolicy", "sorter")):
        spec = objects[(kind, name)]["spec"]
        selector = spec.get("selector", spec.get("podSelector"))
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= pod_labels.items(), (kind, selector)


def test_drain_deadline_security_and_scaling_agree_with_the_worker(overlay):
    name, objects = overlay
    flavour = OVERLAYS[name]
    settings = settings_from(objects)
    pod = workload(objects)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_deadline_s
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # the only writable place
    secrets = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"SORTER_REDIS__URL", "SORTER_KAFKA__CLIENT__SASL_PASSWORD"} <= secrets
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == "1") if flavour == "gpu" else gpus is None
    assert c["image"].endswith(f"-{flavour}")
    scaler = objects[("ScaledObject", "sorter")]["spec"]
    (trigger,) = scaler["triggers"]
    assert trigger["metadata"]["consumerGroup"] == settings.kafka.group_id
    assert trigger["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert trigger["metadata"]["allowIdleConsumers"] == "false"  # never more pods than partitions


def test_keda_scales_the_workload_the_overlay_renders(overlay):
    _, objects = overlay
    w = workload(objects)
    ref = objects[("ScaledObject", "sorter")]["spec"]["scaleTargetRef"]
    target = (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment"), ref["name"])  # KEDA's defaults
    assert target == (w["apiVersion"], w["kind"], w["metadata"]["name"])


def test_exactly_once_runs_only_where_a_replaced_pod_keeps_its_transactional_id(overlay):
    """transactional.id is SORTER_KAFKA__TRANSACTIONAL_ID, else <group id>-<host name>. A StatefulSet pod's host
    name is its pod name, which its replacement keeps (sorter-0), so the replacement fences the old pod's open
    transaction; a Deployment's replacement pod has a new random name, and nothing would be fenced."""
    name, objects = overlay
    settings = settings_from(objects)
    assert (settings.kafka.delivery == "exactly-once") == (name == "exactly-once")
    if settings.kafka.delivery != "exactly-once":
        return
    w = workload(objects)
    assert w["kind"] == "StatefulSet" and w["spec"]["podManagementPolicy"] == "Parallel"
    assert ("Service", w["spec"]["serviceName"]) in objects
    pod = w["spec"]["template"]["spec"]
    assert "hostname" not in pod  # the host name stays the pod name
    source = next((e for e in container(objects)["env"] if e["name"] == "SORTER_KAFKA__TRANSACTIONAL_ID"), None)
    if source is None:  # the host name makes the id, and no literal id in the ConfigMap is shared by every pod
        assert settings.kafka.transactional_id is None
    else:  # a literal would be one id for all pods (they would fence each other), metadata.uid a new one per pod
        assert source.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name", source


def test_the_exactly_once_overlay_is_the_gpu_overlay_as_a_statefulset():
    gpu = by_id(render(DEPLOY / "overlays" / "gpu"))
    eo = by_id(render(DEPLOY / "overlays" / "exactly-once"))
    deployment, statefulset = gpu.pop(("Deployment", "sorter")), eo.pop(("StatefulSet", "sorter"))
    gpu_scaler, eo_scaler = gpu.pop(("ScaledObject", "sorter")), eo.pop(("ScaledObject", "sorter"))
    assert eo == gpu  # ConfigMap, Services, ServiceMonitor, PDB, NetworkPolicy, ... untouched
    eo_scaler["spec"]["scaleTargetRef"] = gpu_scaler["spec"]["scaleTargetRef"]
    assert eo_scaler == gpu_scaler
    assert statefulset["metadata"] == deployment["metadata"]
    for field in ("replicas", "revisionHistoryLimit", "selector"):
        assert statefulset["spec"][field] == deployment["spec"][field], field
    assert "strategy" not in statefulset["spec"]
    template = copy.deepcopy(statefulset["spec"]["template"])
    (c,) = template["spec"]["containers"]
    (base,) = deployment["spec"]["template"]["spec"]["containers"]
    added = {e["name"] for e in c["env"]} - {e["name"] for e in base["env"]}
    assert "SORTER_KAFKA__DELIVERY" in added and added <= EXACTLY_ONCE_ENV, added
    c["env"] = [e for e in c["env"] if e["name"] not in added]
    assert template == deployment["spec"]["template"]  # the same pod, but for the exactly-once settings


def test_images_run_as_the_same_non_root_user_and_expose_the_metrics_port():
    port = Settings.model_fields["observe"].default_factory().port
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        assert re.search(r"^USER 10001$", text, re.M), name
        assert re.search(rf"^EXPOSE {port}$", text, re.M), name
        assert 'ENTRYPOINT ["tini", "--", "sorter"]' in text  # SIGTERM reaches the worker as PID 1's child
        assert "MODEL=mounted" in text and "COPY ${CHECKPOINT} /out/model.pt" in text


def test_the_compose_file_wires_kafka_redis_model_worker_and_simulator():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "redis", "model", "worker", "simulator"}
    assert "KRaft" in (ROOT / "docker" / "compose.yaml").read_text() or "controller" in str(services["kafka"])
    worker = services["worker"]
    assert worker["read_only"] is True and worker["ports"] == ["9400:9400"]
    assert int(worker["stop_grace_period"].rstrip("s")) > Settings().shutdown_deadline_s
    assert worker["depends_on"]["model"]["condition"] == "service_completed_successfully"
    routes = load_routing_table(ROOT / "docker" / "demo-routes.yaml")
    from sorter.data.synth import catalog
    from sorter.demo import DEMO_CLASSES

    assert list(routes.routes) == [d.sku for d in catalog(DEMO_CLASSES)]  # the demo model's SKUs


# -- alerts and dashboard -------------------------------------------------------------------------------
# Labels Prometheus adds to every series it scrapes through the ServiceMonitor (Prometheus Operator).
TARGET_LABELS = {"namespace", "pod", "service", "endpoint", "container", "instance", "job"}
# Series an alert may read that another exporter provides -> their labels.
OTHER_EXPORTERS = {"kube_pod_status_ready": {"namespace", "pod", "uid", "condition"}}  # kube-state-metrics
METRIC_NAME = re.compile(r"\b((?:sorter|kube)_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
README_ALERTS = {  # the README's "Metrics and what to alert on", plus delivery blocked
    "SorterLatencyOverBudget", "SorterLagGrowing", "SorterReviewShareHigh", "SorterDeadLetters", "SorterCacheDown",
    "SorterProducerRestarted", "SorterSlowBatches", "SorterPodNotReady", "SorterDeliveryBlocked",
    "SorterFetchStalled", "SorterItemsLate", "SorterCameraViewsMissing", "SorterModelReloadRefused",
    "SorterCanaryRolledBack",
}  # fmt: skip
ON_CALL_PANELS = {  # what the dashboard must show: throughput, latency, lag, review share, dead letters, ...
    "sorter_frames_consumed_total", "sorter_commands_total", "sorter_end_to_end_latency_seconds_bucket",
    "sorter_consumer_lag_messages", "sorter_frames_dead_lettered_total", "sorter_cache_up",
    "sorter_delivery_blocked_seconds", "sorter_assigned_partitions",
}  # fmt: skip


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return exported_series() | OTHER_EXPORTERS


def check_promql(expr: str, exported: dict[str, set[str]]) -> set[str]:
    """The labels the result can carry (for annotations); fails on a metric the worker does not export or
    a label its series do not have. A regex reading, not a parser: enough for the expressions here."""
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    names = set(METRIC_NAME.findall(expr))
    assert names, expr
    missing = names - exported.keys()
    assert not missing, f"{expr}: not exported: {missing}"
    for name, matchers in SELECTOR.findall(expr):
        labels = set(MATCHER.findall(matchers))
        assert labels <= exported[name] | TARGET_LABELS, f"{expr}: {name} has no {labels - exported[name]}"
    known = set().union(*(exported[n] for n in names)) | TARGET_LABELS
    grouping = {label.strip() for g in GROUPING.findall(expr) for label in g.split(",") if label.strip()}
    assert grouping <= known, f"{expr}: no such labels {grouping - known}"
    return grouping or known


def rules(objects) -> list[dict]:
    return [r for g in objects[("PrometheusRule", "sorter")]["spec"]["groups"] for r in g["rules"]]


def test_the_alerts_read_only_metrics_and_labels_the_worker_exports(overlay, exported):
    _, objects = overlay
    namespace = objects[("PrometheusRule", "sorter")]["metadata"]["namespace"]
    alerts = {r["alert"]: r for r in rules(objects)}
    assert set(alerts) == README_ALERTS
    for name, rule in alerts.items():
        labels = check_promql(rule["expr"], exported)
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description"} <= rule["annotations"].keys(), name
        for text in rule["annotations"].values():  # {{ $labels.x }} must be a label the result keeps
            assert set(re.findall(r"\$labels\.(\w+)", text)) <= labels, (name, text)
        for value in re.findall(r'namespace=~?"([^"$]+)"', rule["expr"]):
            assert value == namespace, (name, "the rule's own namespace, as rendered")
    latency = alerts["SorterLatencyOverBudget"]["expr"]
    threshold = float(re.search(r">\s*([0-9.]+)\s*$", latency).group(1))
    assert threshold in LATENCY_BUCKETS  # p99 is interpolated inside a bucket: at a bound it is exact


def dashboard_exprs(dashboard: dict) -> list[str]:
    out: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str) and METRIC_NAME.search(value):
                    out.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for x in node:
                walk(x)

    walk(dashboard)
    return out


def test_the_dashboard_ships_for_the_grafana_sidecar_and_reads_only_exported_metrics(overlay, exported):
    _, objects = overlay
    cm = objects[("ConfigMap", "sorter-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    ((key, text),) = cm["data"].items()
    assert key == "sorter.json" and text == (DEPLOY / "base" / "dashboards" / "sorter.json").read_text()
    assert len(text) < 200_000  # kubectl apply keeps a copy in an annotation (256 KiB at most)
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_promql(target["expr"], exported)
            assert 'namespace="$namespace"' in target["expr"], (panel["title"], target["expr"])
    for expr in dashboard_exprs(dashboard):
        used |= set(METRIC_NAME.findall(expr))
        check_promql(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr), exported)
    assert used >= ON_CALL_PANELS, ON_CALL_PANELS - used


@pytest.mark.skipif(not os.environ.get("SORTER_TEST_KUSTOMIZE_COMPARE"), reason="needs kustomize on PATH")
def test_the_subset_renderer_agrees_with_kustomize():  # pragma: no cover - run where kustomize exists
    for name in OVERLAYS:  # kustomize sorts its output by kind: compare object by object
        folder = DEPLOY / "overlays" / name
        assert by_id(render(folder)) == by_id(render_subset(folder)), name
