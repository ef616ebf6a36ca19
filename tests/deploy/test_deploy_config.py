"""The deployment files parse, and every FACEFED_* variable they set is a setting."""

import importlib
import pkgutil
from pathlib import Path

import pytest
import yaml
from pydantic_settings import BaseSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PARTS = ("core", "models", "privacy", "client", "server")
YAML_FILES = sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("k8s/*.yaml")])


def _settings_names() -> set[str]:
    """Environment names of every pydantic-settings class facefed defines."""
    names: set[str] = set()
    modules = []
    for part in PARTS:
        package = importlib.import_module(f"facefed.{part}")
        modules += [
            info.name
            for info in pkgutil.walk_packages(package.__path__, f"facefed.{part}.")
            if info.name.endswith("settings")
        ]
    for name in modules:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseSettings)
                and value is not BaseSettings
            ):
                prefix = value.model_config.get("env_prefix", "")
                names.update(f"{prefix}{field}".upper() for field in value.model_fields)
    return names


def _documents(path: Path) -> list[dict]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _env_names(node: object) -> set[str]:
    """Every environment variable name a compose or Kubernetes document sets."""
    found: set[str] = set()
    if isinstance(node, dict):
        env = node.get("environment")
        if isinstance(env, dict):
            found.update(env)
        elif isinstance(env, list):
            found.update(item.split("=", 1)[0] for item in env)
        for item in node.get("env", []) if isinstance(node.get("env"), list) else []:
            found.add(item["name"])
        if node.get("kind") == "ConfigMap":
            found.update(node.get("data", {}))
        for value in node.values():
            found |= _env_names(value)
    elif isinstance(node, list):
        for value in node:
            found |= _env_names(value)
    return found


def test_the_deploy_folder_has_the_promised_files():
    for name in (
        "docker/server.Dockerfile",
        "docker/site.Dockerfile",
        "compose.yaml",
        "local/up.sh",
        "local/down.sh",
    ):
        assert (DEPLOY / name).is_file(), name
    kinds = {doc.get("kind") for path in YAML_FILES for doc in _documents(path)}
    assert {"Deployment", "Service", "Secret", "ConfigMap"} <= kinds


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    assert _documents(path), f"{path} holds no document"


def test_compose_runs_the_whole_topology():
    (compose,) = _documents(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"postgres", "server", "superlink", "site-a", "site-b"} <= set(services)
    for name in ("server", "superlink", "site-a", "site-b"):
        dockerfile = services[name]["build"]["dockerfile"]
        assert (DEPLOY.parent / dockerfile).is_file(), dockerfile


def test_every_facefed_variable_the_manifests_set_is_a_real_setting():
    known = _settings_names()
    assert {"FACEFED_SERVER_URL", "FACEFED_API_KEY", "FACEFED_HOME"} <= known
    used = set()
    for path in YAML_FILES:
        for doc in _documents(path):
            used |= {name for name in _env_names(doc) if name.startswith("FACEFED_")}
    assert used, "the manifests set no FACEFED_ variable at all"
    unknown = sorted(used - known)
    assert not unknown, f"not a facefed setting: {unknown}"


def test_the_dockerfiles_take_torch_from_the_cpu_index_only():
    for name in ("server.Dockerfile", "site.Dockerfile"):
        text = (DEPLOY / "docker" / name).read_text()
        assert text.startswith("#") and "FROM python:3.11-slim" in text
        assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text


def test_flower_services_start_through_the_deploy_flower_scripts():
    (compose,) = _documents(DEPLOY / "compose.yaml")
    services = compose["services"]
    scripts = [services["superlink"]["entrypoint"][0]]
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in _documents(path):
            if doc.get("kind") != "Deployment":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                scripts += container.get("command", [])[:1]
    site_image = (DEPLOY / "docker" / "site.Dockerfile").read_text()
    scripts.append(site_image.split('ENTRYPOINT ["')[1].split('"')[0])
    flower = [s for s in scripts if "/deploy/flower/" in s]
    assert len(flower) >= 3  # compose SuperLink, k8s SuperLink, the site image
    for script in flower:
        local = DEPLOY / "flower" / script.split("/deploy/flower/")[1]
        assert local.is_file(), script
    for name in ("site-a", "site-b"):
        environment = services[name]["environment"]
        assert environment["SUPERLINK"] == "superlink:9091"
        assert environment["SITE_DIR"].startswith(environment["FACEFED_SITE_DIR"])
