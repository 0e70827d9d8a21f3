"""deploy/: what can be checked without a cluster or a container engine. The systemd unit passes
`systemd-analyze verify` and its security review; the Kubernetes manifests validate against the
API schemas (strict) and hang together (probes, ports, the ServiceMonitor's selector); the
container file passes hadolint; and the example configs are accepted by `sluice check`."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, require_or_skip, run

DEPLOY = REPO / "deploy"
VENV_BIN = pathlib.Path(sys.executable).parent


def tool(name):
    path = shutil.which(name) or (VENV_BIN / name if (VENV_BIN / name).exists() else None)
    if path is None:
        require_or_skip(f"{name} is not installed (tests/run.sh installs it)")
    return str(path)


def test_systemd_unit_verifies_and_is_hardened(sluice_bin, tmp_path):
    analyze = tool("systemd-analyze")
    unit = tmp_path / "sluice.service"
    unit.write_text((DEPLOY / "systemd" / "sluice.service").read_text().replace("/usr/local/bin/sluice", str(sluice_bin)))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    # Exposure on systemd's 0-10 scale (threshold in tenths): at most 2.0, "OK".
    security = subprocess.run([analyze, "security", "--offline=true", "--threshold=20", str(unit)], capture_output=True, text=True)
    assert security.returncode == 0, security.stdout[-2000:]
    text = unit.read_text()
    for line in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "ReadOnlyPaths=/etc/sluice",
                 "LoadCredentialEncrypted=master-key:", "CapabilityBoundingSet=\n", "KillSignal=SIGTERM"):
        assert line in text, line
    # The daemon gets to finish its graceful shutdown before systemd kills it.
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))
    config = (DEPLOY / "systemd" / "sluice.toml").read_text()
    assert int(re.search(r"timeout_ms = (\d+)", config).group(1)) < stop * 1000


def manifests():
    docs = []
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_and_hang_together():
    validate = tool("kubernetes-validate")
    files = [str(f) for f, d in manifests() if d["kind"] not in ("Kustomization", "ServiceMonitor")]
    result = subprocess.run([validate, "--strict", "--quiet", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lint = subprocess.run([tool("yamllint"), "-c", str(DEPLOY / "kubernetes" / ".yamllint"), str(DEPLOY / "kubernetes")],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout

    by_kind = {d["kind"]: d for _, d in manifests()}
    kustomized = {str(r) for r in by_kind["Kustomization"]["resources"]}
    assert kustomized == {f.name for f, d in manifests() if d["kind"] != "Kustomization"}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    config = by_kind["ConfigMap"]["data"]["sluice.toml"]
    assert f'listen = "0.0.0.0:{port}"' in config
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    timeout_ms = int(re.search(r"timeout_ms = (\d+)", config).group(1))
    assert timeout_ms < pod["terminationGracePeriodSeconds"] * 1000
    # Key material only from the Secret, and the Secret in the repo holds no value.
    secret_refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert set(by_kind["Secret"]["stringData"]) == secret_refs
    assert all(v == "" for v in by_kind["Secret"]["stringData"].values())
    # The ServiceMonitor scrapes the Service's named port, which selects the pods.
    service, monitor = by_kind["Service"], by_kind["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod_labels(by_kind["Deployment"]).items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_container_file_passes_hadolint():
    result = subprocess.run([tool("hadolint"), str(DEPLOY / "container" / "Containerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "container" / "Containerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2, "multi-stage"
    assert re.search(r"^USER 65532", text, re.M), "non-root"


@pytest.mark.parametrize("source", ["systemd", "kubernetes"])
def test_example_configs_pass_sluice_check(sluice_bin, tmp_path, source):
    """The example configs are real: with their variables set and the policies they name, `sluice
    check` accepts them (an unknown key or a typo would fail it, naming file and line)."""
    if source == "systemd":
        config = (DEPLOY / "systemd" / "sluice.toml").read_text()
        policies = REPO / "schemas" / "demo"
    else:
        data = next(d for _, d in manifests() if d["kind"] == "ConfigMap")["data"]
        config = data["sluice.toml"]
        policies = tmp_path / "policies"
        policies.mkdir()
        for name, text in data.items():
            if name != "sluice.toml":
                (policies / name).write_text(text)
    path = tmp_path / "sluice.toml"
    path.write_text(config.replace("/etc/sluice/policies", str(policies)))
    env = dict(os.environ, KAFKA_BROKERS="127.0.0.1:9092", CREDENTIALS_DIRECTORY=str(tmp_path), KEYSTORE_HOST="127.0.0.1",
               VAULT_AWS_ACCESS_KEY_ID="id", VAULT_AWS_SECRET_ACCESS_KEY="secret")
    result = run(sluice_bin, "check", "--config", path, env=env)
    assert "customers" in result.stdout
    # Without a variable the config needs, the error names it and the line, never a value.
    del env["KAFKA_BROKERS"]
    missing = run(sluice_bin, "check", "--config", path, env=env, check=False)
    assert missing.returncode != 0 and "KAFKA_BROKERS" in missing.stderr and f"{path}:" in missing.stderr, missing.stderr
