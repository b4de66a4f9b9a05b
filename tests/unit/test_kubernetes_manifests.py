"""
deploy/kubernetes/: every manifest is valid against the Kubernetes schemas
(offline, kubernetes-validate), and the Deployment agrees with what the
image and quayfront really do: the ConfigMap is a configuration quayfront
loads, the ports, probes, mounts and grace period follow from it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from quayfront.config import load_config

MANIFESTS = Path(__file__).parents[2] / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are written for (the preStop sleep
# action is on by default from 1.30).
KUBERNETES_VERSION = "1.30"
# What the image (Dockerfile, quayfront-entrypoint) provides.
IMAGE = "localhost/quayfront"
IMAGE_UID = 1001
IMAGE_CONFIG_PATH = "/etc/quayfront/quayfront.toml"


def documents(name: str) -> list[dict]:
    with open(MANIFESTS / name) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def resource_files() -> list[str]:
    return sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def all_resources() -> list[dict]:
    return [d for name in resource_files() for d in documents(name)]


def find(kind: str, name: str) -> dict:
    matches = [d for d in all_resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The ConfigMap's TOML, loaded by quayfront's own loader."""
    text = find("ConfigMap", "quayfront-config")["data"]["quayfront.toml"]
    path = tmp_path_factory.mktemp("k8s") / "quayfront.toml"
    path.write_text(text)
    return load_config(str(path))


@pytest.fixture(scope="module")
def pod() -> dict:
    return find("Deployment", "quayfront")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    [container] = pod["containers"]
    return container


@pytest.mark.parametrize("name", resource_files())
def test_manifest_validates_against_the_kubernetes_schema(name: str) -> None:
    """Each resource is valid, strictly (no unknown fields), for the Kubernetes version targeted."""
    resources = documents(name)
    assert resources
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_generates_the_mounted_secrets(pod) -> None:
    [kustomization] = documents("kustomization.yaml")
    assert sorted(kustomization["resources"]) == resource_files()
    generated = {s["name"]: s for s in kustomization["secretGenerator"]}
    mounted = {v["secret"]["secretName"]: v for v in pod["volumes"] if "secret" in v}
    assert set(generated) == set(mounted)
    for name, volume in mounted.items():
        keys = {entry.partition("=")[0] for entry in generated[name]["files"]}
        assert {item["key"] for item in volume["secret"]["items"]} == keys
    assert generated["quayfront-tls"]["type"] == "kubernetes.io/tls"
    assert [image["name"] for image in kustomization["images"]] == [IMAGE]
    # The secrets themselves are never committed.
    assert (MANIFESTS / "secrets" / ".gitignore").read_text().splitlines()[1:] == ["*", "!.gitignore"]


def test_deployment_runs_the_image_as_it_expects(pod, container) -> None:
    """Two replicas or more, the packaged image, non-root UID 1001, read-only root, writable /tmp."""
    deployment = find("Deployment", "quayfront")
    assert deployment["spec"]["replicas"] >= 2
    assert container["image"].partition(":")[0] == IMAGE
    assert "command" not in container and "args" not in container  # the image's entrypoint
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_ports_match_the_configured_listeners(config, container) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["proxy-tls"] == config.proxy_listener.address.port == 8443
    assert ports["tls"] == config.tls_listener.address.port == 8444
    assert ports["metrics"] == config.metrics.address.port == 9091
    assert config.proxy_listener.proxy_protocol == "required"
    # Reachable from the pod IP, not only inside the container.
    assert {config.proxy_listener.address.host, config.tls_listener.address.host} == {"0.0.0.0"}


def test_probes_ask_the_health_resource_over_https_on_the_plain_tls_port(config, container) -> None:
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["scheme"] == "HTTPS"
        port = get["port"]
        if isinstance(port, str):
            port = {p["name"]: p["containerPort"] for p in container["ports"]}[port]
        assert port == config.tls_listener.address.port
        assert get["path"] in config.health.paths


def test_grace_period_covers_prestop_and_the_drain(config, pod, container) -> None:
    """SIGTERM drains for drain_delay_s + drain_timeout_s after the preStop pause; the kubelet waits longer."""
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_s = config.http.drain_delay_s + config.http.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s
    # SIGTERM is what starts the drain: nothing may replace it.
    assert "stopSignal" not in container["lifecycle"]
    assert set(container["lifecycle"]) == {"preStop"}
    # The NLB keeps a deregistered target's connections as long.
    annotations = find("Service", "quayfront")["metadata"]["annotations"]
    attributes = annotations["service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"]
    delay = dict(a.split("=") for a in attributes.split(","))["deregistration_delay.timeout_seconds"]
    assert int(delay) >= pre_stop_s + drain_s


def test_mounted_files_are_where_the_config_reads_them(config, pod, container) -> None:
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_mount = mounts[IMAGE_CONFIG_PATH]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "quayfront-config"
    assert config_mount["subPath"] == "quayfront.toml"

    def provided(path: str) -> bool:
        directory, _, name = path.rpartition("/")
        volume = volumes[mounts[directory]["name"]]
        return name in {item["path"] for item in volume["secret"]["items"]}

    for path in (config.tls.cert, config.tls.key, *config.tls.session_ticket_key_files):
        assert provided(path), path
    assert len(config.tls.session_ticket_key_files) == 2  # current and previous


def test_service_is_an_nlb_sending_proxy_v2_and_checking_the_tls_port(config, container) -> None:
    service = find("Service", "quayfront")
    annotations = service["metadata"]["annotations"]
    prefix = "service.beta.kubernetes.io/aws-load-balancer-"
    assert service["spec"]["type"] == "LoadBalancer"
    assert annotations[prefix + "proxy-protocol"] == "*"
    assert annotations[prefix + "type"] == "external"
    assert annotations[prefix + "healthcheck-protocol"] == "HTTPS"
    assert int(annotations[prefix + "healthcheck-port"]) == config.tls_listener.address.port
    assert annotations[prefix + "healthcheck-path"] in config.health.paths
    [port] = service["spec"]["ports"]
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert names[port["targetPort"]] == config.proxy_listener.address.port


def test_selectors_match_the_pods() -> None:
    labels = find("Deployment", "quayfront")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        find("Deployment", "quayfront")["spec"]["selector"]["matchLabels"],
        find("PodDisruptionBudget", "quayfront")["spec"]["selector"]["matchLabels"],
        find("Service", "quayfront")["spec"]["selector"],
    ):
        assert selector.items() <= labels.items()
    hpa = find("HorizontalPodAutoscaler", "quayfront")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "quayfront"}
    assert hpa["minReplicas"] >= 2
    assert find("PodDisruptionBudget", "quayfront")["spec"]["maxUnavailable"] == 1


def test_redis_zone_points_at_the_redis_service(config) -> None:
    assert config.rate_limits["registry"].store == "redis"
    service = find("Service", "quayfront-redis")
    assert config.redis.url.host == service["metadata"]["name"]
    assert config.redis.url.port == service["spec"]["ports"][0]["port"]
    redis_pod = find("Deployment", "quayfront-redis")["spec"]["template"]
    assert service["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()
    [redis] = redis_pod["spec"]["containers"]
    assert redis["args"][:4] == ["--save", "", "--appendonly", "no"]
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True


def test_environment_names_only_real_options(container) -> None:
    """QUAYFRONT_* variables must name options of twistd quayfront (the entrypoint refuses others)."""
    from quayfront.tap import Options

    known = {"QUAYFRONT_" + name.upper().replace("-", "_") for name, *_ in Options.optParameters}
    for variable in container.get("env", []):
        if variable["name"].startswith("QUAYFRONT_"):
            assert variable["name"] in known


def test_configmap_toml_is_plain_toml_with_only_known_sections() -> None:
    """The embedded file parses on its own (no templating) and sets the replicas' shared keys."""
    document = tomllib.loads(find("ConfigMap", "quayfront-config")["data"]["quayfront.toml"])
    assert document["rate_limits"]["registry"]["store"] == "redis"
    assert document["tls"]["session_ticket_key_files"]
