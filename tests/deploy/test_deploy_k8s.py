"""Kubernetes manifests: core kinds validate against the official schemas (kubernetes-validate,
offline, strict: unknown fields are errors); the Prometheus Operator CRDs and the kustomization,
which those schemas do not cover, are checked field by field here; and what the issue 24 review asked
for: secrets only from Secrets, NetworkPolicies, hardened pods without service-account tokens."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml
from deploy_support import DEPLOY

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (preStop exec, autoscaling/v2, Indexed Jobs)
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def by_kind(kind: str, name: str | None = None) -> dict:
    (doc,) = [
        d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return doc


CORE_DOCS = [(f, d) for f, d in documents() if d["kind"] not in CRD_KINDS | {"Kustomization"}]


@pytest.mark.parametrize("fname,doc", CORE_DOCS, ids=[f"{f}:{d['kind']}" for f, d in CORE_DOCS])
def test_core_manifests_validate_against_the_schemas(fname, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_misspelled_field():
    doc = copy.deepcopy(by_kind("Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_kind_is_expected():
    kinds = sorted(d["kind"] for _, d in documents())
    stack = (
        "Kustomization Namespace ConfigMap PersistentVolumeClaim Deployment Service HorizontalPodAutoscaler "
    )
    stack += "PodDisruptionBudget ServiceMonitor PrometheusRule"
    stack += " NetworkPolicy NetworkPolicy NetworkPolicy"
    training = "Service PersistentVolumeClaim Job NetworkPolicy"
    assert kinds == sorted(f"{stack} {training}".split())


def test_deployment_probes_resources_drain_bundles_and_secret():
    dep = by_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = c["ports"][0]["containerPort"]
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["bundles"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes["bundles"]["persistentVolumeClaim"]["claimName"]
        == by_kind("PersistentVolumeClaim", "fair-bundles")["metadata"]["name"]
    )
    env = {e["name"]: e for e in c["env"]}
    assert env["FAIR_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "fair-admin", "key": "token"}
    config = by_kind("ConfigMap")
    assert c["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    settings = config["data"]
    assert settings["FAIR_PORT"] == str(port)
    assert settings["FAIR_BUNDLE"].startswith(mounts["bundles"]["mountPath"] + "/")
    assert all(k.startswith("FAIR_") for k in settings)


# ---- secrets and exposure (issue 24.5, 24.6) ---------------------------------------------------------------

SECRETS = {  # environment variable -> (Secret, key), none optional
    "FAIR_ADMIN_TOKEN": ("fair-admin", "token"),
    "FAIR_API_TOKENS": ("fair-api-tokens", "tokens"),
    "FAIR_REDIS_URL": ("fair-redis", "url"),
}


def api_pod() -> dict:
    return by_kind("Deployment")["spec"]["template"]["spec"]


def job_pod() -> dict:
    return by_kind("Job")["spec"]["template"]["spec"]


def test_secrets_come_from_secrets_and_never_from_the_configmap():
    (c,) = api_pod()["containers"]
    env = {e["name"]: e for e in c["env"]}
    for var, (secret, key) in SECRETS.items():
        assert "value" not in env[var], var
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": key}, var  # not optional: a missing Secret stops the pod
    settings = by_kind("ConfigMap")["data"]
    assert not set(SECRETS) & set(settings)
    assert settings["FAIR_REQUIRE_API_TOKENS"] == "true"  # an empty token Secret stops the pod
    assert not any("://" in v or "@" in v for v in settings.values())
    # no Secret with a value ships in the repository: a default secret is no secret
    assert not [d for _, d in documents() if d["kind"] == "Secret"]


def test_no_pod_gets_a_service_account_token():
    assert api_pod()["automountServiceAccountToken"] is False
    assert job_pod()["automountServiceAccountToken"] is False


@pytest.mark.parametrize("which", ["api", "job"])
def test_pods_are_hardened(which):
    pod = api_pod() if which == "api" else job_pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]  # the one place every program may write


def test_training_job_has_a_writable_home_and_cache_on_a_read_only_root():
    (c,) = job_pod()["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in job_pod()["volumes"]}
    assert "emptyDir" in volumes[mounts[env["HOME"]]]
    assert env["FAIR_CACHE_DIR"].startswith("/training/")  # the training volume, reused across runs


def _policies() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "NetworkPolicy"}


def test_the_namespace_denies_ingress_by_default():
    kust = by_kind("Kustomization")
    assert "networkpolicy.yaml" in kust["resources"]
    deny = _policies()["default-deny-ingress"]
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny["spec"]


def test_the_api_admits_only_the_gateway_and_prometheus_on_its_port():
    policy = _policies()["fair-api"]["spec"]
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    (port,) = api_pod()["containers"][0]["ports"]
    peers = []
    for rule in policy["ingress"]:
        assert [p["port"] for p in rule["ports"]] in ([port["name"]], [port["containerPort"]])
        (peer,) = rule["from"]
        assert "ipBlock" not in peer
        # a namespace selector that matches nothing by accident: {} would admit every namespace
        assert peer["namespaceSelector"]["matchLabels"], peer
        peers.append(peer)
    gateway, prometheus = peers
    assert gateway["namespaceSelector"]["matchLabels"] == {"fair-rec/access": "gateway"}
    assert prometheus["namespaceSelector"]["matchLabels"] == {"fair-rec/access": "monitoring"}
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    # the ServiceMonitor scrapes that same port
    svc = by_kind("Service", "fair-api")
    (sm_endpoint,) = by_kind("ServiceMonitor")["spec"]["endpoints"]
    (svc_port,) = [p for p in svc["spec"]["ports"] if p["name"] == sm_endpoint["port"]]
    assert svc_port["targetPort"] == port["name"]


def test_redis_admits_only_its_clients():
    policy = _policies()["fair-redis"]["spec"]
    clients, peers = policy["ingress"]
    (expr,) = clients["from"][0]["podSelector"]["matchExpressions"]
    assert "fair-api" in expr["values"] and "namespaceSelector" not in clients["from"][0]
    assert clients["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert peers["from"] == [{"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}]


def test_the_training_rendezvous_is_open_only_to_the_jobs_own_pods():
    policy = _policies()["fair-train"]["spec"]
    pod_labels = by_kind("Job")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": policy["podSelector"]}]  # same namespace, same Job
    # the API pods are not training pods
    api_labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not policy["podSelector"]["matchLabels"].items() <= api_labels.items()


def test_service_hpa_pdb_select_the_deployment():
    dep = by_kind("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = by_kind("Service", "fair-api")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert (
        svc["spec"]["ports"][0]["targetPort"]
        == dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    )
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_servicemonitor_structure_matches_the_service():
    sm = by_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {
        "jobLabel",
        "selector",
        "namespaceSelector",
        "endpoints",
        "targetLabels",
        "podTargetLabels",
    }
    svc = by_kind("Service", "fair-api")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    # jobLabel names a Service label whose value becomes the job: the alert rules expect "fair-api"
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "fair-api"
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "scheme",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
        }
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert ep["interval"].endswith("s") and ep["scrapeTimeout"].endswith("s")


def test_prometheusrule_is_the_rules_file():
    rule = by_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    rules_file = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "fair-alerts.yml").read_text())
    assert rule["spec"] == rules_file, "regenerate deploy/k8s/prometheusrule.yaml from the rules file"


def test_kustomization_lists_existing_files_and_no_training():
    kust = by_kind("Kustomization")
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    files = {p.name for p in K8S.glob("*.yaml")}
    assert set(kust["resources"]) <= files
    assert "training-job.yaml" not in kust["resources"]  # training runs on demand
    assert files - set(kust["resources"]) == {"kustomization.yaml", "training-job.yaml"}


def test_training_job_runs_torchrun_with_one_rank_per_indexed_pod():
    job = by_kind("Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    script = c["args"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}  # the signing key comes from a Secret
    assert env["NNODES"] == str(spec["completions"])
    assert "torchrun" in script and '--node_rank="${JOB_COMPLETION_INDEX}"' in script
    assert "--no_python" in script and "fair-train --data" in script
    # the rendezvous address is pod 0 of the Job behind the headless Service named by subdomain
    headless = by_kind("Service", "fair-train")
    assert headless["spec"]["clusterIP"] == "None" and pod["subdomain"] == headless["metadata"]["name"]
    assert f"--master_addr={job['metadata']['name']}-0.{pod['subdomain']}" in script
    assert "fair-export --run" in script
