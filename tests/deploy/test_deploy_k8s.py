"""Kubernetes manifests: core kinds validate against the official schemas (kubernetes-validate,
offline, strict: unknown fields are errors); the Prometheus Operator CRDs and the kustomization,
which those schemas do not cover, are checked field by field here."""

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
    training = "Service PersistentVolumeClaim Job"
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
    assert settings["FAIR_REDIS_URL"].startswith("redis")
    assert all(k.startswith("FAIR_") for k in settings)


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
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["NNODES"] == str(spec["completions"])
    assert "torchrun" in script and '--node_rank="${JOB_COMPLETION_INDEX}"' in script
    assert "--no_python" in script and "fair-train --data" in script
    # the rendezvous address is pod 0 of the Job behind the headless Service named by subdomain
    headless = by_kind("Service", "fair-train")
    assert headless["spec"]["clusterIP"] == "None" and pod["subdomain"] == headless["metadata"]["name"]
    assert f"--master_addr={job['metadata']['name']}-0.{pod['subdomain']}" in script
    assert "fair-export --run" in script
