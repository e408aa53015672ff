"""The bundle signing key in the deployments (issue 24.2): on Kubernetes a required Secret shared by the
training Job (fair-export signs) and the API pods (only signed bundles are served); in compose an
optional variable passed to both bootstrap and api; and no fsGroup re-owning that would make bundle
files group-writable (the API refuses those)."""

from __future__ import annotations

import pytest
from test_deploy_compose import INTERPOLATION, env_of, load_compose
from test_deploy_k8s import api_pod, job_pod

SIGNING_SECRET = {"name": "fair-bundle-signing", "key": "key"}


@pytest.mark.parametrize("which", ["api", "job"])
def test_both_pods_read_the_signing_key_from_one_required_secret(which):
    pod = api_pod() if which == "api" else job_pod()
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    entry = env["FAIR_BUNDLE_SIGNING_KEY"]
    assert "value" not in entry
    # not optional: a pod without the Secret does not start, rather than serve or write unsigned bundles
    assert entry["valueFrom"]["secretKeyRef"] == SIGNING_SECRET
    assert "FAIR_BUNDLE_SIGNING_KEY" not in " ".join(container.get("args", []) + container.get("command", []))


@pytest.mark.parametrize("which", ["api", "job"])
def test_volumes_are_not_re_owned_group_writable_at_every_start(which):
    """fsGroupChangePolicy Always (the default) adds group write to every file of a writable volume at
    each pod start: the training Job would make every bundle on the volume unservable."""
    pod = api_pod() if which == "api" else job_pod()
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_the_api_mounts_the_bundles_read_only():
    (container,) = api_pod()["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/bundles"]
    assert mount["readOnly"] is True


def test_compose_passes_one_optional_signing_key_to_the_writer_and_the_reader():
    services = load_compose()["services"]
    for name in ("bootstrap", "api"):
        value = env_of(services[name])["FAIR_BUNDLE_SIGNING_KEY"]
        m = INTERPOLATION.fullmatch(value)
        assert m is not None and m.group("var") == "FAIR_BUNDLE_SIGNING_KEY", (name, value)
