"""docker-compose.yml: the local stack's services, health checks, start order and volumes, and its
secrets: none has a default, `up` refuses to start without them (issue 24.6).

No Docker engine runs here, so the file is checked as data: what `docker compose up` would do.
"""

from __future__ import annotations

import re
import sys

import yaml
from deploy_support import DEPLOY, REPO


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def named_volumes_of(service: dict) -> dict[str, str]:
    """Named volumes a service mounts: volume name -> container path (bind mounts excluded)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if not source.startswith((".", "/")):
            out[source] = target
    return out


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_present():
    services = load_compose()["services"]
    assert set(services) == {"redis", "bootstrap", "api", "prometheus", "grafana"}


def test_redis_persists_append_only_on_a_named_volume_with_healthcheck():
    compose = load_compose()
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volumes = named_volumes_of(redis)
    assert volumes.get("redis-data") == "/data"  # where redis-server writes appendonly files
    assert "redis-data" in compose["volumes"]
    test = redis["healthcheck"]["test"]
    assert "redis-cli" in test and "ping" in test


def test_bootstrap_is_one_shot_and_builds_into_the_shared_bundle_volume():
    services = load_compose()["services"]
    boot = services["bootstrap"]
    assert boot.get("restart", "no") == "no"
    assert boot["build"]["target"] == "train"  # building the bundle needs torch: the training image
    cmd = boot["command"]
    assert cmd[:2] == ["fair-demo", "load"]
    bundles_mount = named_volumes_of(boot)["bundles"]
    assert cmd[cmd.index("--bundles") + 1] == bundles_mount
    # the Redis URL in the environment, never on the command line (ps shows those: issue 24.5)
    assert "--redis" not in cmd and not any("redis://" in arg for arg in cmd)
    assert env_of(boot)["FAIR_REDIS_URL"] == "redis://redis:6379/0"
    assert boot["depends_on"]["redis"]["condition"] == "service_healthy"


def test_bootstrap_loads_the_histories_only_once():
    # `fair-demo load` replaces the demo users' lists: on every `up` it would drop the events stored since
    boot = load_compose()["services"]["bootstrap"]
    entry = boot["entrypoint"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in boot["volumes"]}
    script = entry[-1]
    assert entry[0] == "python" and script.startswith(mounts["./deploy/compose"] + "/")
    assert (DEPLOY / "compose" / script.rsplit("/", 1)[1]).is_file()


def test_api_waits_for_healthy_redis_and_finished_bootstrap():
    services = load_compose()["services"]
    api = services["api"]
    assert api["build"]["target"] == "runtime"
    deps = api["depends_on"]
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["bootstrap"]["condition"] == "service_completed_successfully"
    env = env_of(api)
    assert env["FAIR_REDIS_URL"].startswith("redis://redis:")
    # the api reads the bundle the bootstrap wrote: same volume, read-only, FAIR_BUNDLE under it
    api_mount = named_volumes_of(api)["bundles"]
    assert any(v.startswith("bundles:") and v.endswith(":ro") for v in api["volumes"])
    boot_cmd = services["bootstrap"]["command"]
    boot_root = boot_cmd[boot_cmd.index("--bundles") + 1]
    assert env["FAIR_BUNDLE"] == f"{api_mount}/demo" and api_mount == boot_root
    assert any(p.endswith(":8000") for p in api["ports"])


def test_prometheus_mounts_the_repo_config_and_rules():
    prom = load_compose()["services"]["prometheus"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in prom["volumes"]}
    assert mounts["./deploy/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in config["scrape_configs"]
        if job["job_name"] == "fair-api"
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == ["api:8000"]  # the compose service name and the port fair-serve listens on


def test_grafana_is_provisioned_from_the_repo():
    grafana = load_compose()["services"]["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_mount = mounts["./deploy/grafana/dashboards"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "fair.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dash_mount
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (
        home.startswith(dash_mount + "/")
        and (DEPLOY / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()
    )


def test_every_named_volume_is_declared():
    compose = load_compose()
    used = {name for svc in compose["services"].values() for name in named_volumes_of(svc)}
    assert used <= set(compose["volumes"])


# ---- secrets (issue 24.6) ---------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|PASSWD|_KEY$", re.IGNORECASE)
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, environ: dict[str, str]) -> str:
    """What Compose makes of a value (its documented rules), raising like `up` does for `:?`."""

    def one(m: re.Match) -> str:
        var, op, arg = m.group("var"), m.group("op"), m.group("arg")
        have = environ.get(var)
        if op == ":?" and not have or op == "?" and have is None:
            raise ValueError(f"required variable {var} is missing a value: {arg}")
        if op == ":-" and not have or op == "-" and have is None:
            return arg
        return have or ""

    return INTERPOLATION.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def secret_settings() -> list[tuple[str, str, str]]:
    """(service, variable, raw value) of every environment entry whose name says it is a secret."""
    return [
        (name, key, value)
        for name, svc in load_compose()["services"].items()
        for key, value in env_of(svc).items()
        if SECRET_NAME.search(key)
    ]


def test_the_interpolation_model_follows_compose():
    assert interpolate("${A:-x}", {}) == "x" and interpolate("${A:-x}", {"A": "y"}) == "y"
    assert interpolate("a$$b", {}) == "a$b"
    try:
        interpolate("${A:?say why}", {"A": ""})
    except ValueError as exc:
        assert "A" in str(exc) and "say why" in str(exc)
    else:
        raise AssertionError("an empty required variable must refuse")


# optional on the loopback-only stack, empty by default: FAIR_API_TOKENS (an open data plane),
# FAIR_BUNDLE_SIGNING_KEY (unsigned bundles, which the API logs at startup)
OPTIONAL_SECRETS = {"FAIR_API_TOKENS", "FAIR_BUNDLE_SIGNING_KEY"}


def test_no_secret_has_a_default():
    found = secret_settings()
    names = {key for _, key, _ in found}
    assert {"FAIR_ADMIN_TOKEN", "GF_SECURITY_ADMIN_PASSWORD", *OPTIONAL_SECRETS} <= names
    for service, key, value in found:
        # nothing but one interpolation: no literal secret, no `:-default`
        m = INTERPOLATION.fullmatch(value)
        assert m is not None, f"{service}.{key} = {value!r}: a secret must come from the environment"
        if key in OPTIONAL_SECRETS:
            assert m.group("op") == ":-" and m.group("arg") == "", f"{service}.{key}"
        else:
            assert m.group("op") == ":?", f"{service}.{key} = {value!r}: must be required (${{VAR:?message}})"


def test_up_refuses_to_start_without_the_secrets_and_says_which():
    for service, key, value in secret_settings():
        if key in OPTIONAL_SECRETS:
            continue
        var = INTERPOLATION.fullmatch(value).group("var")
        for environ in ({}, {var: ""}):
            try:
                interpolate(value, environ)
            except ValueError as exc:
                message = str(exc)
            else:
                raise AssertionError(f"{service}.{key}: starts without {var}")
            assert var in message and "openssl rand" in message and "docs/operations.md" in message
        assert interpolate(value, {var: "a-random-secret-value"}) == "a-random-secret-value"


def test_grafana_has_no_anonymous_access_and_no_sign_up():
    env = env_of(load_compose()["services"]["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"
    assert INTERPOLATION.fullmatch(env["GF_SECURITY_ADMIN_PASSWORD"]).group("var") == "GRAFANA_ADMIN_PASSWORD"


def test_the_stack_test_passes_the_secrets_compose_requires():
    sys.path.insert(0, str(DEPLOY / "offline"))
    try:
        from stack_test import stack_secrets
    finally:
        sys.path.pop(0)
    required = {
        INTERPOLATION.fullmatch(value).group("var")
        for _, key, value in secret_settings()
        if key not in OPTIONAL_SECRETS
    }
    generated = stack_secrets({})
    assert required <= set(generated)
    assert "FAIR_BUNDLE_SIGNING_KEY" in generated  # the stack test runs the signed-bundle path
    assert all(len(v) >= 16 for v in generated.values())  # FAIR_ADMIN_TOKEN's minimum length
    assert stack_secrets({}) != generated  # random, not a default in disguise
    assert stack_secrets({"FAIR_ADMIN_TOKEN": "mine-" + "x" * 20})["FAIR_ADMIN_TOKEN"] == "mine-" + "x" * 20
