"""The container recipe and the Kubernetes manifests in examples/: the
manifests are valid against the Kubernetes API schemas (kubernetes-validate,
which carries them: no network), strictly, so that a misspelt field fails;
their config is a valid config; and the pieces agree with each other (the
socket on the hostPath both pods mount, the group the orchestrator runs
with, the grace period the daemon needs to stop its trees)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from supervisor.core.config import parse_config

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "examples" / "kubernetes"
DOCKERFILE = REPO / "examples" / "container" / "Dockerfile"

# The oldest Kubernetes release the manifests are meant for, and the newest
# whose schemas the validator carries.
OLDEST_KUBERNETES = "1.28"
VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.utils.latest_version())

# What the daemon adds to the largest stop_timeout when it stops every tree.
STOP_MARGIN_S = 6


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found.append((f"{path.name}:{document['kind']}", document))
    return found


def by_kind(kind: str) -> dict[str, Any]:
    (document,) = [document for _, document in documents() if document["kind"] == kind]
    return document


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "document"), documents(), ids=[name for name, _ in documents()])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(name: str, document: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    daemonset = copy.deepcopy(by_kind("DaemonSet"))
    volume = next(v for v in daemonset["spec"]["template"]["spec"]["volumes"] if "hostPath" in v)
    volume["hostpath"] = volume.pop("hostPath")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)


def test_the_pieces_agree() -> None:
    config = parse_config(by_kind("ConfigMap")["data"]["supervisor.toml"], "/etc/adapter-supervisor/supervisor.toml")
    socket_dir = str(Path(config.daemon.socket).parent)
    daemon_pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    orchestrator_pod = by_kind("Deployment")["spec"]["template"]["spec"]
    for pod in (daemon_pod, orchestrator_pod):
        (container,) = pod["containers"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == socket_dir)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        # The node's own directory: the same on both sides of the socket.
        assert volume["hostPath"]["path"] == socket_dir
    (daemon,) = daemon_pod["containers"]
    assert daemon["args"] == ["serve", "--config", "/etc/adapter-supervisor/supervisor.toml"]
    assert not daemon_pod.get("hostPID")
    assert daemon["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    (orchestrator,) = orchestrator_pod["containers"]
    assert {"name": "ADAPTER_SUPERVISOR_SOCKET", "value": config.daemon.socket} in orchestrator["env"]
    assert config.daemon.socket_group in orchestrator_pod["securityContext"]["supplementalGroups"]
    assert config.daemon.socket_mode == 0o660
    longest_stop = max(adapter.stop_timeout for adapter in config.adapters.values())
    assert daemon_pod["terminationGracePeriodSeconds"] >= longest_stop + STOP_MARGIN_S


def test_the_container_recipe_copies_what_the_repository_has() -> None:
    text = DOCKERFILE.read_text()
    sources = [
        word
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE)
        for word in line.split()[:-1]
    ]
    assert {"pyproject.toml", "hatch_build.py", "supervisor", "systemd"} <= set(sources)
    missing = [source for source in sources if not (REPO / source).exists()]
    assert missing == []
    # The default command serves the bundled config, root's default paths.
    assert 'ENTRYPOINT ["adapter-supervisor"]' in text and 'CMD ["serve"]' in text
