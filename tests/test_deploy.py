"""The container deployment: Dockerfile, deploy/compose.yaml, deploy/k8s/, run_demo.sh.

Checked here without a container engine: every file parses; compose has the six components
(and the one-shot ``keys`` service), each started by its real ``python -m modkit.<component>``
command, with the healthcheck on that component's port in ``PipelineConfig``'s defaults and
only the frontend's 8001 published (on loopback); the configs ``deploy/layout.py`` writes are
valid ``PipelineConfig``s with every socket on its owner's host; the Kubernetes manifests have
the fields a Deployment, StatefulSet and Service need, each Service selects its pods and names
their ports, and they pass Kubernetes' own schema (kubernetes-validate, strict), as compose.yaml
passes the Compose Specification's (check-jsonschema), where those are installed; the
Dockerfile's command is ``start_all.py`` with flags it takes; ``run_demo.sh`` passes
``bash -n`` and shellcheck, and refuses a bad worker count.

With ``MODKIT_CONTAINER_TESTS=1`` and podman that can run containers here (root, podman,
runc, podman-compose 1.1 or newer, debootstrap), ``test_run_demo_serves_a_chat_in_containers``
builds the image from a local Debian base (debootstrap, imported: no registry is pulled), runs
``run_demo.sh 2`` under podman-compose, and checks the reply against the in-process ``LLM``
and that both workers computed tokens. It takes minutes (a build), so it is opt-in; it
skips, saying why, wherever any of that is missing.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modkit.config import COMPONENTS, PipelineConfig
from modkit.pipeline.addresses import socket_names

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
sys.path.insert(0, str(DEPLOY))
import layout  # noqa: E402  (deploy/layout.py is a script, not a package module)

MODULES = {  # the module that runs each component, as in modkit/pipeline/standalone.py
    "frontend": "modkit.frontend",
    "scheduler": "modkit.scheduler",
    "worker": "modkit.worker",
    "router": "modkit.router",
    "kv_cache_manager": "modkit.kvcache",
    "sampler": "modkit.sampler",
}
SERVICES = {component: component.replace("_", "-") for component in COMPONENTS}  # compose and k8s names
DEFAULT_PORTS = {component: getattr(PipelineConfig(), f"{component}_port") for component in COMPONENTS}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def command_of(service: dict[str, Any]) -> list[str]:
    """A service's command as argv: a ``sh -c`` one split into words (``$$`` is compose's ``$``)."""
    command = service["command"]
    if command[:2] == ["sh", "-c"]:
        return shlex.split(command[2].removeprefix("exec "))
    return command


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


# -- compose -------------------------------------------------------------------------------


def test_compose_runs_each_component_by_its_own_command() -> None:
    services = compose()["services"]
    assert set(services) == {"keys", *SERVICES.values()}
    for component, name in SERVICES.items():
        argv = command_of(services[name])
        assert argv[:3] == ["python", "-m", MODULES[component]], name
        assert importlib.util.find_spec(MODULES[component] + ".__main__") is not None
        assert flag(argv, "--config") == "/run/modkit/pipeline.yaml"
        assert flag(argv, "--keys") == "/run/modkit/keys"
        assert services[name]["image"] == services["keys"]["image"]  # one image
        assert "run:/run/modkit:ro" in services[name]["volumes"]
        assert services[name]["depends_on"]["keys"] == {"condition": "service_completed_successfully"}
    worker = command_of(services["worker"])
    assert flag(worker, "--port") == str(DEFAULT_PORTS["worker"])
    assert flag(worker, "--worker-id") == "$$(python deploy/layout.py worker-id --num-workers ${MODKIT_NUM_WORKERS:-1})"


def test_compose_scales_workers_with_the_configs_num_workers() -> None:
    spec = compose()
    assert spec["name"] == "modkit" and spec["x-podman"] == {"name_separator_compat": True}  # modkit-worker-<k>
    assert spec["services"]["worker"]["scale"] == "${MODKIT_NUM_WORKERS:-1}"
    assert "--num-workers ${MODKIT_NUM_WORKERS:-1}" in spec["services"]["keys"]["command"][2]


def test_worker_id_refuses_a_container_that_is_no_worker() -> None:
    done = subprocess.run(
        [sys.executable, "deploy/layout.py", "worker-id", "--num-workers", "2", "--wait-s", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert "none of the 2 worker names resolves to this container" in done.stderr


def test_compose_starts_components_in_the_launchers_order() -> None:
    services = compose()["services"]
    order = ["sampler", "worker", "kv-cache-manager", "scheduler", "router", "frontend"]  # COMPONENT_ORDER's
    for before, after in itertools.pairwise(order):
        assert services[after]["depends_on"][before] == {"condition": "service_healthy"}, after


def test_compose_healthchecks_ask_each_components_default_port_and_publish_only_the_api() -> None:
    services = compose()["services"]
    for component, name in SERVICES.items():
        test = services[name]["healthcheck"]["test"]
        assert f"http://127.0.0.1:{DEFAULT_PORTS[component]}/health" in test[-1], name
        published = services[name].get("ports", [])
        assert published == (["127.0.0.1:8001:8001"] if component == "frontend" else []), name


def test_compose_keys_service_writes_keys_then_the_layout() -> None:
    keys = compose()["services"]["keys"]
    script = keys["command"][2]
    assert "python -m modkit keys /run/modkit/keys" in script
    assert "python deploy/layout.py compose --num-workers ${MODKIT_NUM_WORKERS:-1}" in script
    assert script.rstrip().endswith("--out /run/modkit/pipeline.yaml")
    assert "./pipeline.yaml:/etc/modkit/pipeline.yaml:ro" in keys["volumes"]
    assert (DEPLOY / "pipeline.yaml").is_file()
    PipelineConfig.from_file(DEPLOY / "pipeline.yaml")  # the user's settings alone are a valid config


# -- deploy/layout.py ------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["compose", "k8s"])
@pytest.mark.parametrize("num_workers", [1, 3])
def test_layout_puts_every_socket_on_its_owners_host(platform: str, num_workers: int) -> None:
    base = yaml.safe_load((DEPLOY / "pipeline.yaml").read_text())
    config = PipelineConfig.from_dict(layout.layout(platform, num_workers, base))  # validates every address
    assert config.num_workers == num_workers and config.allow_remote
    assert config.addresses is not None and set(config.addresses) == set(socket_names(num_workers))
    worker_hosts = {layout.worker_host(platform, i) for i in range(num_workers)}
    assert len(worker_hosts) == num_workers  # each worker reachable by a name of its own
    for name, endpoint in config.addresses.items():
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        owner = layout.owner(name)
        expected = layout.worker_host(platform, int(owner[7:])) if owner.startswith("worker-") else SERVICES[owner]
        assert host == expected, name
        assert int(port) == {"rpc": 9000, "in": 9001, "ev": 9002, "events": 9002}[name.rpartition(".")[2]]
    for component in COMPONENTS:  # HTTP ports stay PipelineConfig's defaults
        assert getattr(config, f"{component}_port") == DEFAULT_PORTS[component]


def test_layout_command_writes_the_config_the_k8s_configmap_holds() -> None:
    written = subprocess.run(
        [sys.executable, "deploy/layout.py", "k8s", "--num-workers", "2", "--base", "deploy/pipeline.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    assert written == (K8S / "pipeline.yaml").read_text(), "regenerate deploy/k8s/pipeline.yaml (kustomization.yaml)"


# -- Kubernetes --------------------------------------------------------------------------------


def manifests(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    workload, service = yaml.safe_load_all((K8S / f"{name}.yaml").read_text())
    return workload, service


def test_kustomization_lists_every_component_its_config_and_keys() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f"{name}.yaml" for name in SERVICES.values())
    assert kustomization["configMapGenerator"] == [{"name": "modkit-config", "files": ["pipeline.yaml"]}]
    (secret,) = kustomization["secretGenerator"]
    assert secret["name"] == "modkit-keys"
    assert sorted(Path(f).name for f in secret["files"]) == ["client.key_secret", "hmac.key", "server.key_secret"]
    assert "keys/" in (K8S / ".gitignore").read_text().split()  # keys are never committed


@pytest.mark.parametrize("component", COMPONENTS)
def test_k8s_workload_and_service_match(component: str) -> None:
    name = SERVICES[component]
    workload, service = manifests(name)
    assert workload["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1" and service["kind"] == "Service"
    assert workload["kind"] == ("StatefulSet" if component == "worker" else "Deployment")
    assert workload["metadata"]["name"] == service["metadata"]["name"] == name
    spec, pod = workload["spec"], workload["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": DEFAULT_PORTS[component], "rpc": 9000, "inbox": 9001, "events": 9002}
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {(n, t) for t, n in ports.items()}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    argv = container["command"]
    assert argv[:3] == ["python", "-m", MODULES[component]]
    assert flag(argv, "--config") == "/etc/modkit/config/pipeline.yaml"
    assert flag(argv, "--keys") == "/run/modkit/keys"
    assert flag(argv, "--port") == str(DEFAULT_PORTS[component])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "modkit-config"
    assert volumes["keys"]["secret"]["secretName"] == "modkit-keys"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/modkit/config": "config", "/run/modkit": "run"}
    (init,) = pod["spec"]["initContainers"]
    assert "install -d -m 0700 /run/modkit/keys" in init["command"][-1]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_workers_are_a_statefulset_whose_pods_the_config_names() -> None:
    workload, service = manifests("worker")
    assert workload["spec"]["serviceName"] == service["metadata"]["name"] == "worker"
    config = PipelineConfig.from_file(K8S / "pipeline.yaml")
    assert workload["spec"]["replicas"] == config.num_workers
    assert config.addresses is not None
    for i in range(config.num_workers):  # pod worker-<i> of StatefulSet worker, through its headless Service
        assert config.addresses[f"worker-{i}.in"] == f"tcp://worker-{i}.worker:9001"
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert flag(container["command"], "--worker-id") == "$(WORKER_ID)"
    (env,) = container["env"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"


@pytest.mark.parametrize("component", COMPONENTS)
def test_k8s_manifests_pass_the_kubernetes_schema(component: str) -> None:
    """Kubernetes 1.32's own OpenAPI schema, strict: a misspelt or misplaced field fails (offline)."""
    validator = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for resource in manifests(SERVICES[component]):
        validator.validate(resource, "1.32", strict=True)  # raises ValidationError naming the field


def test_compose_passes_the_compose_spec_schema() -> None:
    """The Compose Specification's JSON schema (check-jsonschema's vendored copy, offline)."""
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema")
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", "deploy/compose.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- Dockerfile and run_demo.sh ----------------------------------------------------------------


def test_dockerfile_copies_what_exists_and_runs_start_all() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "torch==2.13.0" in text and "https://download.pytorch.org/whl/cpu" in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: no such file"
    (cmd,) = re.findall(r"^CMD (.+)$", text, re.M)
    argv = yaml.safe_load(cmd)  # a JSON array
    assert argv[:2] == ["python", "scripts/start_all.py"] and (ROOT / argv[1]).is_file()
    config = PipelineConfig.from_cli(argv[2:])  # start_all's flags are PipelineConfig's
    assert config.host == "0.0.0.0" and config.allow_remote


def test_run_demo_is_valid_shell() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "run_demo.sh")], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck); bash -n passed")
    subprocess.run(["shellcheck", str(ROOT / "run_demo.sh")], check=True)


@pytest.mark.parametrize("workers", ["0", "two", "-1"])
def test_run_demo_refuses_a_bad_worker_count_before_starting_anything(workers: str) -> None:
    done = subprocess.run(["bash", str(ROOT / "run_demo.sh"), workers], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"got '{workers}'" in done.stderr


# -- in containers, where podman can run them ----------------------------------------------------

ENGINE_DIR = Path("/var/tmp/modkit-containers")  # podman's storage, settings and the base's root: kept between runs
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE = "localhost/modkit:latest"  # what deploy/compose.yaml's modkit:latest resolves to
WHEELS = Path("/opt/wheels")  # where this kind of machine keeps the CPU torch wheel (no PyTorch index here)


def podman_env() -> dict[str, str]:
    """Settings for rootful podman inside a VM like this one, in files of their own (CONTAINERS_CONF):
    runc (crun refuses hybrid cgroups), cgroupfs and a file event log (no systemd), and ulimits no
    higher than this process's hard limits (raising one needs CAP_SYS_RESOURCE, which root lacks here)."""
    import resource

    ENGINE_DIR.mkdir(parents=True, exist_ok=True)
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    (ENGINE_DIR / "containers.conf").write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
    )
    (ENGINE_DIR / "storage.conf").write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        'runroot = "/run/modkit-containers/storage"\n'
        f'graphroot = "{ENGINE_DIR}/storage"\n'
    )
    return {
        **os.environ,
        "CONTAINERS_CONF": str(ENGINE_DIR / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(ENGINE_DIR / "storage.conf"),
    }


def run(argv: list[str], env: dict[str, str], timeout_s: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def engine_missing() -> str | None:
    """Why the containers cannot run here, or None."""
    if os.environ.get("MODKIT_CONTAINER_TESTS") != "1":
        return "builds an image and starts eight containers (minutes): set MODKIT_CONTAINER_TESTS=1 to run it"
    if os.geteuid() != 0:
        return "needs root: rootful podman"
    for tool in ("podman", "runc", "debootstrap", "podman-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc debootstrap; pip install podman-compose)"
    version = run(["podman-compose", "--version"], dict(os.environ)).stdout.split("podman-compose version ")[-1].split()
    if not version or tuple(int(part) for part in version[0].split(".")[:2]) < (1, 1):
        return f"podman-compose {version} names containers modkit_worker_1; deploy/compose.yaml needs 1.1 or newer"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8001)) == 0:
            return "port 8001 is taken: deploy/compose.yaml publishes the API there"
    return None


def build_local_base(env: dict[str, str]) -> None:
    """A Debian bookworm root with python3 and venv, made by debootstrap and imported: no registry."""
    if run(["podman", "image", "exists", BASE_IMAGE], env).returncode == 0:
        return
    root = ENGINE_DIR / "base-root"
    shutil.rmtree(root, ignore_errors=True)
    made = run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(root)],
        env,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    # pip in the build reaches what pip here reaches: this machine's CA bundle (a proxy's, if any).
    cert = run([sys.executable, "-m", "pip", "config", "get", "global.cert"], env).stdout.strip()
    if cert and Path(cert).is_file():
        shutil.copy(cert, root / "etc/ssl/certs/host-ca.crt")
        (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/host-ca.crt\n")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env, capture_output=True)
    assert tar.wait() == 0 and imported.returncode == 0, imported.stderr[-2000:]


def build_image(env: dict[str, str]) -> None:
    argv = ["podman", "build", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", IMAGE]
    if any(WHEELS.glob("torch-2.13.0+cpu-*.whl")):  # the wheel on disk, not PyTorch's index
        argv += ["--volume", f"{WHEELS}:/wheels:ro", "--build-arg", "TORCH_PIP_ARGS=--find-links /wheels"]
    built = run([*argv, "."], env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]


def remove_project(env: dict[str, str]) -> None:
    """Every container, the network and the volume of project modkit, however many replicas there were."""
    ids = run(["podman", "ps", "-aq", "--filter", "label=io.podman.compose.project=modkit"], env).stdout.split()
    if ids:
        run(["podman", "rm", "-f", "-t", "5", *ids], env)
    for network in ("modkit_default", "modkit-default"):  # podman-compose names it as it names containers
        run(["podman", "network", "rm", "-f", network], env)
    run(["podman", "volume", "rm", "-f", "modkit_run"], env)


@pytest.mark.slow
def test_run_demo_serves_a_chat_in_containers() -> None:
    reason = engine_missing()
    if reason is not None:
        pytest.skip(reason)
    env = podman_env()
    build_local_base(env)
    probe = run(["podman", "run", "--rm", BASE_IMAGE, "true"], env)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    build_image(env)
    from modkit import LLM, SamplingParams

    expected = LLM().chat([{"role": "user", "content": "Hello!"}], SamplingParams(temperature=0, max_tokens=32))
    remove_project(env)
    try:
        demo = run(["bash", "run_demo.sh", "2"], {**env, "COMPOSE": "podman-compose", "BUILD": "0"}, timeout_s=900)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert demo.stdout.splitlines()[-2:] == [expected[0].outputs[0].text, "stopping ..."]
    finally:
        remove_project(env)
