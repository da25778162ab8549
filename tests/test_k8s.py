"""The Kubernetes manifests of deploy/k8s, rendered by kustomize: every overlay alone and with each
component. They must be valid for every Kubernetes version we claim (kubernetes-validate, strict),
their custom resources valid against the operators' published CRD schemas (tests/crds), and agree
with the code (tests/deploy_facts.py): what each process runs and serves, the settings it must get,
and, through the NetworkPolicies, exactly the connections it makes."""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import runpy
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests import deploy_facts as facts

ROOT = facts.ROOT
K8S = ROOT / "deploy" / "k8s"
CRDS = Path(__file__).resolve().parent / "crds"
KUBECTL = shutil.which("kubectl")
OVERLAYS = ("dev", "prod")
COMPONENTS = ("keda", "monitoring", "hpa", "agent-credentials")
# Each overlay alone, with each component, and with all of them.
VARIANTS = [(o, ()) for o in OVERLAYS] + [(o, (c,)) for o in OVERLAYS for c in COMPONENTS] \
    + [(o, COMPONENTS) for o in OVERLAYS]
VARIANT_IDS = [f"{o}+{'+'.join(c)}" if c else o for o, c in VARIANTS]
# The Kubernetes versions deploy/k8s/README.md claims.
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
NATIVE_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io"}

# Where each dependency's pods are, by the labels the overlays give them, and its port.
DEPENDENCIES = {
    "rabbitmq": ({"app.kubernetes.io/name": "rabbitmq"}, 5672),
    "redis": ({"app.kubernetes.io/name": "redis"}, 6379),
    "store": ({"foundationdb.org/fdb-cluster-name": "fdb"}, 4500),
}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomizations)")


# ---- rendering ------------------------------------------------------------------------------------

@functools.cache
def render(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """`kubectl kustomize` of an overlay, with components added by a throwaway kustomization: as if
    they were listed in the overlay's own `components:`, so its namespace applies to them too."""
    with tempfile.TemporaryDirectory() as tmp:
        target = K8S / "overlays" / overlay
        if components:
            rel = os.path.relpath(K8S, tmp)
            (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "namespace": yaml.safe_load((target / "kustomization.yaml").read_text())["namespace"],
                "resources": [f"{rel}/overlays/{overlay}"],
                "components": [f"{rel}/components/{c}" for c in components]}))
            target = Path(tmp)
        done = subprocess.run([KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(target)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def objects(request) -> tuple[dict, ...]:
    return render(*request.param)


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


def of_kind(objs, kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def named(objs, kind: str, name: str) -> dict | None:
    return next((o for o in of_kind(objs, kind) if o["metadata"]["name"] == name), None)


def group(obj: dict) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def switchboard_deployments(objs) -> list[dict]:
    return [d for d in of_kind(objs, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "switchboard"]


def process_of(deployment: dict) -> str:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "serve" and len(args) == 2, args
    return args[1]


def by_process(objs) -> dict[str, dict]:
    found: dict[str, list[dict]] = {}
    for deployment in switchboard_deployments(objs):
        found.setdefault(process_of(deployment), []).append(deployment)
    assert all(len(ds) == 1 for ds in found.values()), {p: [d["metadata"]["name"] for d in ds] for p, ds in found.items()}
    return {p: ds[0] for p, ds in found.items()}


def matches(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return data | (secret.get("stringData") or {})


# ---- validity ---------------------------------------------------------------------------------------

def test_the_overlays_and_components_render(objects):
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "PodDisruptionBudget",
            "NetworkPolicy", "Namespace"} <= kinds
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    [namespace] = of_kind(objects, "Namespace")
    assert namespaces == {namespace["metadata"]["name"]}


_VALIDATED: set[tuple[str, str]] = set()


def test_every_native_object_is_valid_for_every_supported_kubernetes_version(objects):
    import kubernetes_validate

    installed = {p.name for p in (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema").iterdir()}
    natives = [o for o in objects if group(o) in NATIVE_GROUPS]
    assert natives and all(group(o) in NATIVE_GROUPS | set(cr_schemas()) for o in objects), \
        "an object of an API group with no schema here"
    for version in K8S_VERSIONS:
        assert f"v{version}-local-strict" in installed, f"kubernetes-validate has no schemas for {version}"
        for obj in natives:
            key = (version, json.dumps(obj, sort_keys=True))
            if key in _VALIDATED:  # the same object in another variant
                continue
            _VALIDATED.add(key)
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: {exc.message} "
                            f"at {'.'.join(map(str, exc.path))}")


def test_kubernetes_validate_rejects_a_misspelt_field():
    import kubernetes_validate

    deployment = copy.deepcopy(switchboard_deployments(render("dev"))[0])
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _strict(schema):
    """A CRD's structural schema as JSON Schema: int-or-string allows both, and an object that lists
    its properties (and does not preserve unknown fields) allows no others, so typos fail."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k in ("items", "additionalProperties", "not") else
               {n: _strict(s) for n, s in v.items()} if k == "properties" else
               _strict(v) if k in ("allOf", "anyOf", "oneOf") else v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def cr_schemas() -> dict[str, dict[str, dict]]:
    """{group: {kind: vendored CRD (source, version, strict schema)}}"""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        assert {"repo", "tag", "commit", "path"} <= set(crd["source"]), path
        found.setdefault(crd["group"], {})[crd["kind"]] = crd | {"strict": _strict(crd["openAPIV3Schema"])}
    return found


def cr_errors(obj: dict) -> list[str]:
    import jsonschema

    crd = cr_schemas()[group(obj)][obj["kind"]]
    assert obj["apiVersion"] == f"{crd['group']}/{crd['version']}", (obj["apiVersion"], crd["source"])
    validator = jsonschema.Draft4Validator(crd["strict"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_every_custom_resource_is_valid_against_its_operators_crd(objects):
    custom = [o for o in objects if group(o) not in NATIVE_GROUPS]
    for obj in custom:
        errors = cr_errors(obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"


def test_the_crd_check_rejects_a_misspelt_field():
    cluster = copy.deepcopy(named(render("prod"), "RabbitmqCluster", "rabbitmq"))
    assert not cr_errors(cluster)
    cluster["spec"]["replica"] = 3
    assert cr_errors(cluster)
    scaled = copy.deepcopy(named(render("dev", ("keda",)), "ScaledObject", "agents"))
    scaled["spec"]["minReplicaCount"] = "one"
    assert cr_errors(scaled)


def test_kubernetes_validate_is_in_the_test_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(re.fullmatch(r"kubernetes-validate>=1\.(29|[3-9]\d).*", spec) for spec in extra), extra


# ---- what runs ------------------------------------------------------------------------------------------

def test_every_process_has_one_deployment_running_it_from_the_one_image(objects):
    processes = by_process(objects)
    assert set(processes) == set(facts.PROCESSES)
    assert "switchboard" in facts.entry_points()  # the image's ENTRYPOINT, which no container overrides
    for process, deployment in processes.items():
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        assert "command" not in container, process
        assert container["image"] == "switchboard:0.1.0", container["image"]
        name = deployment["metadata"]["name"]
        assert name == process.replace("_", "-")
        assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == name
        assert matches(deployment["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


def _port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port]
    return number


def test_probes_ask_the_serving_port_for_health_and_readiness(objects):
    for process, deployment in by_process(objects).items():
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path and get["path"] in facts.PROBE_PATHS, (process, probe)
            assert _port_number(container, get["port"]) == facts.serving_port(process), (process, probe)


def pods(objs) -> list[dict]:
    """Every pod the manifests make: {kind, name, labels, spec, namespace}; operators' pods by their labels."""
    found = []
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            template = obj["spec"]["template"]
            found.append({"kind": obj["kind"], "name": obj["metadata"]["name"], "labels": template["metadata"]["labels"],
                          "spec": template["spec"], "namespace": obj["metadata"]["namespace"]})
        elif obj["kind"] == "RabbitmqCluster":
            found.append({"kind": obj["kind"], "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
                          "labels": {"app.kubernetes.io/name": obj["metadata"]["name"],
                                     "app.kubernetes.io/component": "rabbitmq"},
                          "spec": {"containers": [{"name": "rabbitmq", "ports": [
                              {"name": "amqp", "containerPort": 5672}, {"name": "management", "containerPort": 15672},
                              {"name": "prometheus", "containerPort": 15692}]}]}})
        elif obj["kind"] == "FoundationDBCluster":
            found.append({"kind": obj["kind"], "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
                          "labels": {"foundationdb.org/fdb-cluster-name": obj["metadata"]["name"]},
                          "spec": {"containers": [{"name": "foundationdb", "ports": [{"containerPort": 4500}]}]}})
    return found


def test_every_service_selects_pods_and_targets_one_of_their_ports(objects):
    for service in of_kind(objects, "Service"):
        selected = [p for p in pods(objects) if matches({"matchLabels": service["spec"]["selector"]}, p["labels"])]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in selected:
                container_ports = [(p.get("name"), p["containerPort"]) for c in pod["spec"]["containers"]
                                   for p in c.get("ports") or []]
                assert any(target in (name, number) for name, number in container_ports), \
                    (service["metadata"]["name"], target, pod["name"])


def test_the_api_service_serves_the_api_port(objects):
    api = named(objects, "Service", "api")
    assert [p["port"] for p in api["spec"]["ports"]] == [facts.API_PORT]


# ---- settings ---------------------------------------------------------------------------------------------

def environment(objs, container: dict) -> dict[str, str | None]:
    """The variables a container gets: env (valueFrom as None) and every key of its envFrom sources."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            ref = named(objs, "ConfigMap", source["configMapRef"]["name"])
            assert ref is not None, source
            env |= ref["data"]
        else:
            ref = named(objs, "Secret", source["secretRef"]["name"])
            assert ref is not None, source
            env |= secret_data(ref)
    for var in container.get("env") or []:
        env[var["name"]] = var.get("value")
    return env


def test_every_process_gets_the_settings_it_must_and_only_names_the_code_reads(objects):
    for process, deployment in by_process(objects).items():
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"] + (spec.get("initContainers") or []):
            env = environment(objects, container)
            unknown = sorted(name for name in env if not facts.known_env(name))
            assert not unknown, f"{process} sets {unknown}, which no code reads"
            for field in facts.MUST_SET:
                given = [n for n in facts.env_names(field) if env.get(n)]
                assert given, f"{process} does not set {field} ({sorted(facts.env_names(field))})"


def test_the_broker_password_is_in_a_secret_not_a_configmap(objects):
    for configmap in of_kind(objects, "ConfigMap"):
        assert not facts.env_names("amqp_url") & set(configmap.get("data") or {}), configmap["metadata"]["name"]


def _urls(objs) -> dict[str, str]:
    [container] = by_process(objs)["api"]["spec"]["template"]["spec"]["containers"]
    return environment(objs, container)


def test_the_urls_point_at_the_dependencies_of_the_overlay(overlay):
    objs = render(overlay)
    env = _urls(objs)
    amqp, redis = urlsplit(env["AMQP_URL"]), urlsplit(env["REDIS_URL"])
    assert (amqp.scheme, amqp.hostname, amqp.port) == ("amqp", "rabbitmq", 5672)
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert named(objs, "Service", "redis") is not None
    if overlay == "dev":
        assert named(objs, "Service", "rabbitmq") is not None
        broker = named(objs, "StatefulSet", "rabbitmq")["spec"]["template"]["spec"]["containers"][0]
        broker_env = environment(objs, broker)
        # The broker is created with the user and password the processes log in with.
        assert (amqp.username, amqp.password) == (broker_env["RABBITMQ_DEFAULT_USER"], broker_env["RABBITMQ_DEFAULT_PASS"])
    else:
        # The operator names the cluster's Service after the RabbitmqCluster.
        assert named(objs, "RabbitmqCluster", amqp.hostname) is not None


def test_the_store_url_names_a_mounted_cluster_file(objects):
    fdb_clusters = of_kind(objects, "FoundationDBCluster")
    for process, deployment in by_process(objects).items():
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        url = urlsplit(environment(objects, container)["STORE_URL"])
        assert url.scheme == "fdb" and url.path.endswith(".cluster"), url
        path = Path(url.path)
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        [item] = [i for i in volume["configMap"]["items"] if i["path"] == path.name]
        rendered = named(objects, "ConfigMap", volume["configMap"]["name"])
        if rendered is not None:  # dev: ours
            assert item["key"] in rendered["data"]
        else:  # prod: the one the FDB operator writes for its cluster
            [cluster] = fdb_clusters
            assert (volume["configMap"]["name"], item["key"]) == (f"{cluster['metadata']['name']}-config", "cluster-file")


def test_dev_foundationdb_serves_the_cluster_file_the_clients_read():
    objs = render("dev")
    cluster_file = named(objs, "ConfigMap", by_process(objs)["api"]["spec"]["template"]["spec"]["volumes"][1]
                         ["configMap"]["name"])["data"]["fdb.cluster"]
    description, _, coordinators = cluster_file.partition("@")
    assert re.fullmatch(r"\w+:\w+", description)
    host, _, port = coordinators.partition(":")
    pod, _, service = host.partition(".")
    server = named(objs, "StatefulSet", "fdb")
    assert (pod, service, port) == (f"{server['metadata']['name']}-0", server["spec"]["serviceName"], "4500")
    headless = named(objs, "Service", service)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    [container] = server["spec"]["template"]["spec"]["containers"]
    ref = next(v for v in container["env"] if v["name"] == "FDB_CLUSTER_FILE_CONTENTS")["valueFrom"]["configMapKeyRef"]
    assert named(objs, "ConfigMap", ref["name"])["data"][ref["key"]] == cluster_file
    assert container["image"] == "foundationdb/foundationdb:7.3.63"
    job = named(objs, "Job", "fdb-configure")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    # Idempotent: an existing database is left alone, whichever way fdbcli reports it.
    assert "status minimal" in script and "already exists" in script and "configure new single ssd" in script


def test_prod_foundationdb_runs_the_version_the_image_links():
    [cluster] = of_kind(render("prod"), "FoundationDBCluster")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert cluster["spec"]["version"] == "7.3.63" and "7.3.63" in dockerfile


# ---- pods: security, resources, disruption, spread ------------------------------------------------------

def test_switchboard_containers_run_locked_down(objects):
    for process, deployment in by_process(objects).items():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        account = named(objects, "ServiceAccount", spec["serviceAccountName"])
        assert account["automountServiceAccountToken"] is False
        pod_context = spec.get("securityContext") or {}
        for container in spec["containers"] + (spec.get("initContainers") or []):
            context = pod_context | (container.get("securityContext") or {})
            assert context.get("runAsNonRoot") is True and context.get("runAsUser") == 10001, process
            assert context.get("readOnlyRootFilesystem") is True, process
            assert context.get("allowPrivilegeEscalation") is False, process
            assert context.get("capabilities", {}).get("drop") == ["ALL"], process
            assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", process
            [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"])


def test_every_container_has_requests_and_limits_and_none_is_privileged(objects):
    for pod in pods(objects):
        if pod["kind"] in ("RabbitmqCluster", "FoundationDBCluster"):
            continue
        for container in pod["spec"]["containers"] + (pod["spec"].get("initContainers") or []):
            resources = container.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests") or {}), (pod["name"], container["name"])
            assert "memory" in (resources.get("limits") or {}), (pod["name"], container["name"])
            context = container.get("securityContext") or {}
            assert not context.get("privileged") and context.get("allowPrivilegeEscalation") is False
            assert context.get("capabilities", {}).get("drop") == ["ALL"], (pod["name"], container["name"])


def test_every_pdb_covers_exactly_one_workload_and_never_blocks_a_drain(objects):
    workloads = pods(objects)
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    covered = set()
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selected = [p for p in workloads if matches(pdb["spec"]["selector"], p["labels"])]
        assert len(selected) == 1, (pdb["metadata"]["name"], [p["name"] for p in selected])
        [pod] = selected
        covered.add(pod["name"])
        assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]
        if pod["kind"] == "Deployment":
            # With 2+ replicas one pod keeps running; with 1 a drain can still evict it.
            assert deployments[pod["name"]]["spec"]["replicas"] >= 1
    assert {d["metadata"]["name"] for d in switchboard_deployments(objects)} <= covered


def test_prod_runs_two_or_more_of_every_process_spread_over_zones_and_nodes():
    for process, deployment in by_process(render("prod")).items():
        assert deployment["spec"]["replicas"] >= 2, process
        template = deployment["spec"]["template"]
        constraints = template["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for constraint in constraints:
            assert matches(constraint["labelSelector"], template["metadata"]["labels"]), process
            assert "pod-template-hash" in constraint["matchLabelKeys"]
    [cluster] = of_kind(render("prod"), "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3


def test_dev_runs_one_of_every_process():
    assert {d["spec"]["replicas"] for d in by_process(render("dev")).values()} == {1}


# ---- network policies -------------------------------------------------------------------------------------

NAMESPACE_LABELS = {"kube-system": {}, "monitoring": {}, "observability": {}, "keda": {}, "ingress-nginx": {},
                    "rabbitmq-system": {}, "fdb-operator": {}}


def _pod(namespace: str, labels: dict) -> dict:
    return {"namespace": namespace, "labels": labels,
            "ns_labels": NAMESPACE_LABELS.get(namespace, {}) | {"kubernetes.io/metadata.name": namespace}}


def _peer_matches(peer: dict, policy_namespace: str, pod: dict) -> bool:
    if "ipBlock" in peer:
        return True  # conservative: an ipBlock may match pod IPs too
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], pod["ns_labels"]):
            return False
    elif pod["namespace"] != policy_namespace:
        return False
    return "podSelector" not in peer or matches(peer["podSelector"], pod["labels"])


def _ports_match(ports: list | None, port: int, protocol: str) -> bool:
    return not ports or any(p.get("protocol", "TCP") == protocol and
                            (p.get("port") is None or p["port"] <= port <= p.get("endPort", p["port"]))
                            for p in ports)


def _allowed(objs, direction: str, pod: dict, peer: dict, port: int, protocol: str) -> bool:
    """Whether `pod`'s NetworkPolicies let it send to (Egress) or receive from (Ingress) `peer`."""
    key, rules = ("to", "egress") if direction == "Egress" else ("from", "ingress")
    selecting = [p for p in of_kind(objs, "NetworkPolicy") if p["metadata"]["namespace"] == pod["namespace"]
                 and matches(p["spec"]["podSelector"] or {"matchLabels": {}}, pod["labels"])
                 and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True  # not isolated
    return any(_ports_match(rule.get("ports"), port, protocol) and
               (not rule.get(key) or any(_peer_matches(x, policy["metadata"]["namespace"], peer) for x in rule[key]))
               for policy in selecting for rule in policy["spec"].get(rules) or [])


def can_connect(objs, source: dict, target: dict, port: int, protocol: str = "TCP") -> bool:
    egress = source["namespace"] not in {o["metadata"]["namespace"] for o in of_kind(objs, "NetworkPolicy")} \
        or _allowed(objs, "Egress", source, target, port, protocol)
    ingress = target["namespace"] not in {o["metadata"]["namespace"] for o in of_kind(objs, "NetworkPolicy")} \
        or _allowed(objs, "Ingress", target, source, port, protocol)
    return egress and ingress


def _namespace(objs) -> str:
    return of_kind(objs, "Namespace")[0]["metadata"]["name"]


def _process_pod(objs, process: str) -> dict:
    return _pod(_namespace(objs), by_process(objs)[process]["spec"]["template"]["metadata"]["labels"])


def _dependency_pods(objs, dependency: str) -> list[dict]:
    labels, _ = DEPENDENCIES[dependency]
    return [_pod(p["namespace"], p["labels"]) for p in pods(objs) if matches({"matchLabels": labels}, p["labels"])]


def test_there_is_a_default_deny_for_the_whole_namespace(objects):
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress")
               for p in of_kind(objects, "NetworkPolicy"))


def test_every_process_reaches_exactly_what_it_uses(objects):
    for process in facts.PROCESSES:
        source = _process_pod(objects, process)
        uses = facts.uses(process)
        for dependency, (_, port) in DEPENDENCIES.items():
            targets = _dependency_pods(objects, dependency)
            assert targets, f"no {dependency} pods in this overlay"
            for target in targets:
                if dependency in uses:
                    assert can_connect(objects, source, target, port), f"{process} cannot reach {dependency}:{port}"
                else:  # least privilege: not even its own egress allows it
                    assert not _allowed(objects, "Egress", source, target, port, "TCP"), \
                        f"{process} may reach {dependency}, which it does not use"
        assert not _allowed(objects, "Egress", source, _pod("elsewhere", {}), 443, "TCP"), process


def test_every_pod_resolves_names_and_processes_export_traces(objects):
    dns = _pod("kube-system", {"k8s-app": "kube-dns"})
    for pod in pods(objects):
        source = _pod(pod["namespace"], pod["labels"])
        for protocol in ("UDP", "TCP"):
            assert _allowed(objects, "Egress", source, dns, 53, protocol), (pod["name"], protocol)
    collector = _pod("observability", {"app.kubernetes.io/name": "jaeger"})
    endpoint = urlsplit(_urls(objects)["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname.split(".")[1] == "observability"
    for process in facts.PROCESSES:
        assert can_connect(objects, _process_pod(objects, process), collector, endpoint.port), process


def test_prometheus_scrapes_every_process_and_clients_reach_only_the_api(objects):
    prometheus = _pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    client = _pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    for process in facts.PROCESSES:
        pod = _process_pod(objects, process)
        port = facts.serving_port(process)
        assert can_connect(objects, prometheus, pod, port), process
        assert can_connect(objects, client, pod, port) == (process == "api"), process
        assert not can_connect(objects, prometheus, pod, 9999), process


def test_the_infrastructure_can_run_behind_the_default_deny(overlay):
    objs = render(overlay)
    ns = _namespace(objs)
    [rabbit] = _dependency_pods(objs, "rabbitmq")
    [fdb] = _dependency_pods(objs, "store")
    assert can_connect(objs, fdb, fdb, 4501)  # FoundationDB's processes with each other
    if overlay == "dev":
        configure = _pod(ns, named(objs, "Job", "fdb-configure")["spec"]["template"]["metadata"]["labels"])
        assert can_connect(objs, configure, fdb, 4500)
    else:
        assert can_connect(objs, rabbit, rabbit, 25672)  # clustering
        operator = _pod("rabbitmq-system", {"app.kubernetes.io/component": "rabbitmq-operator"})
        assert can_connect(objs, operator, rabbit, 15672)
        assert can_connect(objs, _pod("fdb-operator", {"app": "fdb-kubernetes-operator-controller-manager"}), fdb, 4500)
    # Nobody else reaches the broker's management API.
    assert not can_connect(objs, _process_pod(objs, "api"), rabbit, 15672)


def test_keda_and_prometheus_reach_rabbitmq_only_with_their_component(overlay):
    keda = _pod("keda", {"app": "keda-operator"})
    prometheus = _pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    for components in ((), ("keda",), ("monitoring",)):
        objs = render(overlay, components)
        [rabbit] = _dependency_pods(objs, "rabbitmq")
        assert can_connect(objs, keda, rabbit, 5672) == ("keda" in components)
        assert can_connect(objs, prometheus, rabbit, 15692) == ("monitoring" in components)


# ---- components ---------------------------------------------------------------------------------------------

def _capability_queues(process: str) -> set[str]:
    import example_agents
    from switchboard.settings import Settings
    from switchboard.topology import Topology

    assert process == "agents", "only the example agents' capabilities are known here"
    topology = Topology(Settings.model_fields["namespace"].default)
    return {topology.capability_queue(c) for agent in example_agents.build(Settings()) for c in agent.capabilities}


def test_keda_scales_each_agent_deployment_on_its_capabilities_queues(overlay):
    objs = render(overlay, ("keda",))
    deployments = {d["metadata"]["name"]: d for d in switchboard_deployments(objs)}
    scaled = of_kind(objs, "ScaledObject")
    assert scaled
    for obj in scaled:
        spec = obj["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        # With no live agent the dispatcher holds tasks elsewhere: zero replicas would never wake.
        assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] > spec["minReplicaCount"]
        queues = _capability_queues(process_of(target))
        triggered = set()
        for trigger in spec["triggers"]:
            assert trigger["type"] == "rabbitmq"
            meta = trigger["metadata"]
            assert meta["mode"] == "QueueLength" and int(meta["value"]) > 0
            assert meta["queueName"] in queues, meta["queueName"]
            triggered.add(meta["queueName"])
            auth = named(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            [ref] = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
            secret = named(objs, "Secret", ref["name"])
            assert secret is not None and urlsplit(secret_data(secret)[ref["key"]]).scheme == "amqp"
        assert triggered == queues


def _relabel(labels: dict, configs: list[dict]) -> dict:
    """Prometheus's `replace` relabeling, as the operator passes it on."""
    labels = dict(labels)
    for config in configs:
        assert config.get("action", "replace") == "replace"
        value = config.get("separator", ";").join(labels.get(s, "") for s in config.get("sourceLabels", []))
        found = re.fullmatch(config.get("regex", "(.*)"), value)
        if found:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", config.get("replacement", "$1"))
            labels[config["targetLabel"]] = found.expand(replacement)
    return labels


def test_the_service_monitor_follows_the_scrape_contract(overlay):
    objs = render(overlay, ("monitoring",))
    [monitor] = of_kind(objs, "ServiceMonitor")
    contract = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in contract["scrape_configs"] if j["job_name"] == "switchboard"]
    contract_services = {t["labels"]["service"] for t in job["static_configs"]}
    assert contract_services == set(facts.PROCESSES)
    scraped = {}
    for service in of_kind(objs, "Service"):
        if not matches(monitor["spec"]["selector"], service["metadata"].get("labels") or {}):
            continue
        for endpoint in monitor["spec"]["endpoints"]:
            [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]] or [None]
            if port is None:
                continue
            assert endpoint["path"] == job["metrics_path"]
            [pod] = [p for p in pods(objs) if matches({"matchLabels": service["spec"]["selector"]}, p["labels"])]
            process = process_of({"spec": {"template": {"spec": pod["spec"]}}})
            assert _port_number(pod["spec"]["containers"][0], port["targetPort"]) == facts.serving_port(process)
            meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v for k, v in pod["labels"].items()}
            target = _relabel(meta | {"job": service["metadata"]["name"], "service": service["metadata"]["name"]},
                              endpoint["relabelings"])
            scraped[process] = (target["job"], target["service"])
    assert scraped == {p: ("switchboard", p) for p in facts.PROCESSES}


def test_rabbitmq_is_scraped_per_object_as_the_rules_expect(overlay):
    objs = render(overlay, ("monitoring",))
    [monitor] = of_kind(objs, "PodMonitor")
    contract = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in contract["scrape_configs"] if j["job_name"] == "rabbitmq"]
    [rabbit] = [p for p in pods(objs) if matches(monitor["spec"]["selector"], p["labels"])]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == job["metrics_path"]
    assert _port_number(rabbit["spec"]["containers"][0], endpoint["port"]) == 15692
    assert _relabel({"job": "x"}, endpoint["relabelings"])["job"] == "rabbitmq"


def test_the_prometheus_rule_is_the_rules_files():
    from tests.prometheus_rules import load_yaml, rule_files

    groups = [g for path in rule_files() for g in load_yaml(path)["groups"]]
    [rule] = of_kind(render("dev", ("monitoring",)), "PrometheusRule")
    assert rule["spec"]["groups"] == groups, \
        "deploy/k8s/components/monitoring/prometheusrule.yaml is stale: run its sync_rules.py"
    sync = runpy.run_path(str(K8S / "components" / "monitoring" / "sync_rules.py"))
    assert (K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text() == sync["render"](), \
        "prometheusrule.yaml is not what sync_rules.py writes: run it"


def test_the_hpa_scales_the_api_on_cpu(overlay):
    objs = render(overlay, ("hpa",))
    [hpa] = of_kind(objs, "HorizontalPodAutoscaler")
    target = named(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    assert target is not None and process_of(target) == "api"
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    # Utilisation is of the request: the container must have one.
    assert target["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2


def test_agent_users_are_allowed_exactly_what_credentials_permissions_says(overlay):
    import example_agents
    from switchboard.credentials import permissions
    from switchboard.settings import Settings

    objs = render(overlay, ("agent-credentials",))
    agents = example_agents.build(Settings())
    assert {u["metadata"]["name"] for u in of_kind(objs, "User")} == {a.name for a in agents}
    for agent in agents:
        user, grant = named(objs, "User", agent.name), named(objs, "Permission", agent.name)
        assert user["spec"].get("tags") == [] and not user["spec"].get("importCredentialsSecret")
        assert grant["spec"]["userReference"] == {"name": agent.name} and grant["spec"]["vhost"] == "/"
        # The namespace the deployments run with: the settings' default, left alone (deploy_facts).
        namespace = Settings.model_fields["namespace"].default
        assert grant["spec"]["permissions"] == permissions(namespace, agent.name, agent.capabilities)
        assert grant["spec"]["rabbitmqClusterReference"] == user["spec"]["rabbitmqClusterReference"]
    sync = runpy.run_path(str(K8S / "components" / "agent-credentials" / "sync_users.py"))
    assert (K8S / "components" / "agent-credentials" / "users.yaml").read_text() == sync["render"](), \
        "users.yaml is not what sync_users.py writes: run it"


def test_the_topology_operator_reaches_the_management_api_only_with_its_component(overlay):
    operator = _pod("rabbitmq-system", {"app.kubernetes.io/name": "messaging-topology-operator",
                                        "app.kubernetes.io/component": "rabbitmq-operator"})
    for components in ((), ("agent-credentials",)):
        objs = render(overlay, components)
        [rabbit] = _dependency_pods(objs, "rabbitmq")
        # prod's cluster operator policy admits it already (same component label); dev's only with this
        assert can_connect(objs, operator, rabbit, 15672) == (overlay == "prod" or bool(components))
