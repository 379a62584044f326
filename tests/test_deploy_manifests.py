"""deploy/: the Dockerfile and the Kubernetes manifests, checked against pdlb itself.

No image is built and no cluster is used here (neither is available to pdlb's CI). Instead
every piece the container and the manifests depend on is checked with pdlb's own code:

* the ConfigMap's backends.toml goes through pdlb's config parser, and a real pdlb started
  from it (backend URLs pointed at loopback emulators) answers the probes the manifests use;
* every ``pdlb`` flag in the Dockerfile and the Deployment is one of pdlb's own argparse
  options; the probe and metrics paths are in pdlb's route table;
* the Docker build is replayed as far as it goes without Docker: the build context the
  .dockerignore leaves, ``pip install .`` from it, then ENTRYPOINT + CMD and the
  HEALTHCHECK command run against the installed copy, and SIGTERM (STOPSIGNAL) drains it;
* ports, names, selectors and the termination grace period agree across the objects;
* the vLLM StatefulSets use the flags ``pdlb launch-vllm`` plans for the same roles (and,
  when the CPU vLLM environment is there, vLLM's own argument parser accepts them);
* pdlb writes only under the temporary directory (so readOnlyRootFilesystem holds), seen
  with strace when strace is available.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from emulator import EmulatorConfig, EmulatorServer
from lb.cli import _serve_parser
from lb.config import Config, load_config, override, parse_config
from lb.serve.app import create_app
from lb.serve.routes import ROUTES
from lb.tools.launch_vllm.plan import LaunchConfig, plan_servers
from tests.conftest import vllm_python

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S = DEPLOY / "kubernetes"
MANIFESTS = ("pdlb.yaml", "vllm-prefill.yaml", "vllm-decode.yaml")


# --- reading the files ---------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → object, over every manifest file."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


def obj(kind: str, name: str) -> dict[str, Any]:
    return k8s_objects()[(kind, name)]


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def named_ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def resolve_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    return named_ports(c)[port] if isinstance(port, str) else port


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} given {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def statefulsets() -> dict[str, dict[str, Any]]:
    """role (the component label) → its vLLM StatefulSet."""
    sets = [o for (kind, _), o in k8s_objects().items() if kind == "StatefulSet"]
    by_role = {s["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: s
               for s in sets}
    assert sorted(by_role) == ["decode", "prefill"]
    return by_role


def configmap_toml() -> str:
    text: str = obj("ConfigMap", "pdlb-config")["data"]["backends.toml"]
    return text


def pod_dns_urls(sts: dict[str, Any]) -> list[str]:
    """The URL of every pod of a StatefulSet, by its stable DNS name (<pod>.<service>)."""
    port = named_ports(container(sts))["http"]
    service = sts["spec"]["serviceName"]
    return [f"http://{sts['metadata']['name']}-{i}.{service}:{port}"
            for i in range(sts["spec"]["replicas"])]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def one(stage: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in stage if w == word]
    assert len(found) == 1, f"{word}: {len(found)} in the final stage"
    return found[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def docker_argv() -> list[str]:
    stage = final_stage()
    return exec_form(one(stage, "ENTRYPOINT")) + exec_form(one(stage, "CMD"))


def healthcheck_argv() -> list[str]:
    args = one(final_stage(), "HEALTHCHECK")
    options, cmd, rest = args.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {args}"
    assert all(o.startswith("--") for o in options.split())
    return exec_form(rest)


def serve_flags() -> set[str]:
    return {s for action in _serve_parser()._actions for s in action.option_strings}


def expected_version() -> str:
    version: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return version


# --- the Docker build context (.dockerignore) ----------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex on a path."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str], str]]:
    """(exclude?, regex, pattern) per line; Docker's rule: the last matching line wins."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        rules.append((not negate, _pattern_regex(pattern), pattern))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str], str]]) -> bool:
    """Docker's matcher: a pattern matches a path or any of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exclude, regex, _ in rules:
        if any(regex.match(p) for p in prefixes):
            result = exclude
    return result


def build_context() -> list[str]:
    """The files ``docker build`` would send from the repository root (relative paths)."""
    rules = dockerignore_rules()
    exceptions = [p for exclude, _, p in rules if not exclude]
    out: list[str] = []
    for root, dirs, files in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        rel_root = "" if rel_root == "." else rel_root + "/"
        keep = []
        for d in dirs:
            rel = rel_root + d
            # prune an excluded folder unless an exception could re-include something in it
            if d == ".git" or (excluded(rel, rules)
                               and not any(e.startswith(rel + "/") for e in exceptions)):
                continue
            keep.append(d)
        dirs[:] = keep
        out += [rel_root + f for f in files if not excluded(rel_root + f, rules)]
    return sorted(out)


# --- emulated backends for the ConfigMap's URLs ----------------------------------------------


@contextlib.asynccontextmanager
async def emulated_backends() -> AsyncIterator[tuple[str, str]]:
    """The ConfigMap's backends.toml with every vLLM pod URL replaced by a loopback emulator
    of that role serving the StatefulSet's model name; yields (toml text, model name)."""
    text = configmap_toml()
    async with contextlib.AsyncExitStack() as stack:
        model = ""
        for role, sts in statefulsets().items():
            model = flag_value(container(sts)["args"], "--served-model-name")
            for url in pod_dns_urls(sts):
                assert text.count(f'"{url}"') == 1, f"{url} not in the ConfigMap once"
                emulator = await stack.enter_async_context(EmulatorServer(EmulatorConfig(
                    role=role, model=model, time_scale=50.0, seed=1)))
                text = text.replace(f'"{url}"', f'"{emulator.url}"')
        yield text, model


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def get_json(url: str) -> tuple[int, Any]:
    status, text = await get(url)
    return status, json.loads(text)


# --- the Dockerfile ---------------------------------------------------------------------


def test_dockerfile_base_user_install_and_entrypoint() -> None:
    instructions = dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in instructions
            if w == "ARG" and "=" in a}
    froms = [a.split()[0] for w, a in instructions if w == "FROM"]
    images = {re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in froms}
    assert images == {"python:3.11-slim"}
    assert len(froms) >= 1
    stage = final_stage()
    words = [w for w, _ in stage]
    # non-root, by number (the kubelet can verify runAsNonRoot only with a numeric uid)
    user = one(stage, "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert words.index("USER") < words.index("ENTRYPOINT")
    runs = [a for w, a in instructions if w == "RUN" and "pip install" in a]
    assert runs and all("--no-cache-dir" in r for r in runs)
    assert any(re.search(r'pip install --no-cache-dir "\.(\$\{\w+\})?"', r) for r in runs)
    assert "curl" not in DOCKERFILE.read_text() and "wget" not in DOCKERFILE.read_text()
    # pdlb is the console script pyproject.toml installs
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pdlb"] == "lb.cli:main"
    argv = docker_argv()
    assert argv[:2] == ["pdlb", "serve"]
    assert one(stage, "STOPSIGNAL") == "SIGTERM"
    port = int(flag_value(argv, "--port"))
    assert one(stage, "EXPOSE").split("/")[0] == str(port)
    assert flag_value(argv, "--host") == "0.0.0.0"
    check = healthcheck_argv()
    assert check[0] == "python" and "urllib.request" in check[-1]
    urls = re.findall(r"http://[^'\"]+", check[-1])
    assert len(urls) == 1
    parts = urlsplit(urls[0])
    assert (parts.hostname, parts.port, parts.path) == ("127.0.0.1", port, "/health/live")


def test_build_context_has_what_the_dockerfile_copies() -> None:
    context = build_context()
    assert "pyproject.toml" in context and "README.md" in context
    assert not [p for p in context if p.startswith((".venv", ".git/", "tests/", ".cache/"))]
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]
    for word, args in dockerfile():
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for src in sources:
            assert src in context or any(p.startswith(src.rstrip("/") + "/") for p in context), \
                f"COPY {src}: not in the build context .dockerignore leaves"
    # every package pyproject.toml installs is copied
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = {a.split()[0] for w, a in dockerfile() if w == "COPY" and not a.startswith("--")}
    assert {i.rstrip("*") for i in includes} <= copied


def install_like_the_image(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The build stage's ``pip install .`` from the build context (dependencies: this
    environment's); returns the install folder and the environment that runs it."""
    ctx = tmp_path / "context"
    for rel in build_context():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    inst = tmp_path / "inst"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps",
         "--disable-pip-version-check", "--quiet", "--target", str(inst), "."],
        cwd=ctx, capture_output=True, text=True, timeout=300, check=False)
    if pip.returncode and "setuptools" in pip.stderr and "No matching distribution" in pip.stderr:
        pytest.skip("pip cannot get the build backend (setuptools) here: " + pip.stderr[-300:])
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(inst), "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run([sys.executable, "-c", "import lb; print(lb.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(inst)), "the installed copy is not the one running"
    version = subprocess.run([str(inst / "bin" / "pdlb"), "--version"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             check=True)
    assert version.stdout.strip() == f"pdlb {expected_version()}"
    return inst, env


@pytest.mark.slow
async def test_pip_install_then_entrypoint_cmd_and_healthcheck_run(tmp_path: Path) -> None:
    """The image's steps without Docker: ``pip install .`` from the build context, then
    ENTRYPOINT + CMD (config, host and port pointed at this machine) serves, the
    HEALTHCHECK command passes, ``pdlb --version`` works, and STOPSIGNAL drains it."""
    inst, env = await asyncio.to_thread(install_like_the_image, tmp_path)
    pdlb = str(inst / "bin" / "pdlb")
    argv = docker_argv()
    config_path = tmp_path / "backends.toml"
    argv[argv.index("--config") + 1] = str(config_path)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = "0"
    async with emulated_backends() as (text, _):
        config_path.write_text(text)
        proc = await asyncio.create_subprocess_exec(
            pdlb, *argv[1:], env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line.startswith("pdlb listening on http://127.0.0.1:"), line
            url = line.split()[3]
            assert await get_json(url + "/health/live") == (200, {"status": "live"})
            assert (await get(url + "/health/ready"))[0] == 200
            check = healthcheck_argv()
            check[-1] = check[-1].replace(f"127.0.0.1:{docker_port()}", url.split("//")[1])
            assert url.split("//")[1] in check[-1]
            # `python` in the image is the venv's, as sys.executable is here
            done = await asyncio.to_thread(subprocess.run, [sys.executable, *check[1:]],
                                           env=env, capture_output=True, timeout=30)
            assert done.returncode == 0, done.stderr
            proc.send_signal(getattr(signal, one(final_stage(), "STOPSIGNAL")))
            drain = load_config(config_path).server.drain_timeout_s
            assert await asyncio.wait_for(proc.wait(), drain + 10) == 0
            # and the healthcheck fails once pdlb is gone
            done = await asyncio.to_thread(subprocess.run, [sys.executable, *check[1:]],
                                           env=env, capture_output=True, timeout=30)
            assert done.returncode != 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def docker_port() -> int:
    return int(flag_value(docker_argv(), "--port"))


# --- pdlb's argv, config and probes ------------------------------------------------------


def test_every_pdlb_flag_is_one_pdlb_serve_accepts() -> None:
    deployment = obj("Deployment", "pdlb")
    c = container(deployment, "pdlb")
    assert "command" not in c, "the image's ENTRYPOINT (pdlb) runs"
    help_text = subprocess.run([sys.executable, "-m", "lb.cli", "serve", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60, check=True).stdout
    known = serve_flags()
    for argv in (docker_argv()[1:], c["args"]):
        assert argv[0] == "serve"
        rest = argv[1:]
        for token in rest:
            if token.startswith("-"):
                assert token in known, f"pdlb serve has no {token} (no abbreviations either)"
                assert token in help_text
        args = _serve_parser().parse_args(rest)  # SystemExit on anything it rejects
        assert args.config and args.host == "0.0.0.0"
    # the Deployment runs exactly the image's CMD
    assert c["args"] == exec_form(one(final_stage(), "CMD"))
    # --config is the ConfigMap's key where the Deployment mounts it
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/pdlb")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "pdlb-config"
    key = next(iter(obj("ConfigMap", "pdlb-config")["data"]))
    assert flag_value(c["args"], "--config") == f"{mount['mountPath']}/{key}"


def test_configmap_is_a_valid_pdlb_config_listing_every_vllm_pod(tmp_path: Path) -> None:
    path = tmp_path / "backends.toml"
    path.write_text(configmap_toml())
    config = load_config(path)  # pdlb's own parser: unknown keys and bad values are errors
    create_app(config)  # as `pdlb serve` does before binding: policies, connector, tokenizer
    assert config.server.host == "0.0.0.0"
    for role, sts in statefulsets().items():
        urls = [b.url for b in config.pools[role].backends]
        assert urls == pod_dns_urls(sts), role
        service = obj("Service", sts["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
        assert service["spec"].get("publishNotReadyAddresses") is True
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        c = container(sts)
        vllm_port = int(flag_value(c["args"], "--port"))
        assert named_ports(c)["http"] == vllm_port
        http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
        assert resolve_port(c, http["targetPort"]) == vllm_port == http["port"]
        assert {urlsplit(u).port for u in urls} == {vllm_port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health"
            assert resolve_port(c, c[probe]["httpGet"]["port"]) == vllm_port


def test_ports_probes_service_and_podmonitor_agree() -> None:
    config = parse_config(tomllib.loads(configmap_toml()), "<configmap>")
    deployment = obj("Deployment", "pdlb")
    c = container(deployment, "pdlb")
    port = config.server.port
    assert int(flag_value(c["args"], "--port")) == port == docker_port()
    assert named_ports(c) == {"http": port}
    routes = {(r.method, r.path): r for r in ROUTES}
    expected = {"startupProbe": "/health/live", "livenessProbe": "/health/live",
                "readinessProbe": "/health/ready"}
    for probe, path in expected.items():
        get_ = c[probe]["httpGet"]
        assert get_["path"] == path
        assert routes[("GET", path)].access == "public"  # no API key on probes
        assert resolve_port(c, get_["port"]) == port
    service = obj("Service", "pdlb")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [resolve_port(c, p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    monitor = obj("PodMonitor", "pdlb")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and routes[("GET", "/metrics")].access == "public"
    assert endpoint["port"] in named_ports(c)
    budget = obj("PodDisruptionBudget", "pdlb")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    for role, sts in statefulsets().items():
        vmon = obj("PodMonitor", f"vllm-{role}")
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert vmon["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (vend,) = vmon["spec"]["podMetricsEndpoints"]
        assert vend["path"] == "/metrics" and vend["port"] in named_ports(container(sts))


def test_termination_grace_outlasts_the_drain() -> None:
    config = parse_config(tomllib.loads(configmap_toml()), "<configmap>")
    spec = obj("Deployment", "pdlb")["spec"]["template"]["spec"]
    c = container(obj("Deployment", "pdlb"), "pdlb")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > config.server.drain_timeout_s + float(pre_stop[1])


def test_security_context_matches_the_image() -> None:
    deployment = obj("Deployment", "pdlb")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "pdlb")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == one(final_stage(), "USER").split(":")[0]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    # the one writable place (see test_pdlb_writes_only_its_temporary_directory)
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # environment variables: only ones pdlb reads
    sources = (REPO / "lb" / "config.py").read_text()
    for var in c.get("env", []):
        assert f'"{var["name"]}"' in sources, f"pdlb does not read {var['name']}"


@pytest.mark.slow
def test_pdlb_writes_only_its_temporary_directory(tmp_path: Path) -> None:
    """readOnlyRootFilesystem: pdlb (with --workers 2, which adds a rendezvous folder) opens
    files for writing, creates, renames and removes only under $TMPDIR (strace)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    config = tmp_path / "backends.toml"
    config.write_text(configmap_toml())  # backends unreachable: pdlb still starts
    trace = tmp_path / "trace"
    argv = docker_argv()
    argv[argv.index("--config") + 1] = str(config)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = "0"
    env = {**os.environ, "TMPDIR": str(tmp), "HOME": "/nonexistent",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [strace, "-f", "-y", "-qq", "-o", str(trace), "-e",
         "trace=open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat",
         sys.executable, "-m", "lb.cli", *argv[1:], "--workers", "2", "--log-level", "error"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("pdlb listening"):
            proc.kill()
            err = proc.communicate(timeout=30)[1]
            if "ptrace" in err or "Operation not permitted" in err:
                pytest.skip(f"strace cannot trace here: {err[-300:]}")
            pytest.fail(f"pdlb did not start under strace: {line}{err[-2000:]}")
        url = line.split()[3]
        status, _ = asyncio.run(get(url + "/metrics"))
        assert status == 200
        # SIGTERM to pdlb itself (strace's child); strace exits with it
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        os.kill(int(children[0]), signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    writes = written_paths(trace.read_text(), cwd=tmp_path)
    assert any(p.startswith(str(tmp) + "/pdlb-workers-") for p in writes), \
        "strace saw no --workers folder: the trace is not what this test expects"
    outside = sorted({p for p in writes if not p.startswith((str(tmp) + "/", "/dev/"))})
    assert not outside, f"pdlb writes outside $TMPDIR: {outside[:10]}"


WRITE_CALLS = ("open", "openat", "creat", "mkdir", "mkdirat", "rename", "renameat",
               "renameat2", "unlink", "unlinkat")


def written_paths(trace: str, cwd: Path) -> list[str]:
    """The paths that ``strace -f -y`` shows created, written, renamed or removed by
    successful calls; relative names resolved against their directory fd or ``cwd``."""
    calls, pending = [], {}
    for line in trace.splitlines():
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
        elif rest.startswith("<..."):
            calls.append(pending.pop(pid, "") + rest.split("resumed>", 1)[-1])
        else:
            calls.append(rest)
    out = []
    for call in calls:
        m = re.match(r"(\w+)\((.*)\)\s+=\s+(-?\d+)", call)
        if m is None or m.group(1) not in WRITE_CALLS or m.group(3).startswith("-"):
            continue  # failed calls (ENOENT lookups) change nothing
        name, args = m.group(1), m.group(2)
        if name.startswith("open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT", args):
            continue
        base = str(cwd)
        for fd_dir, at_cwd, path in re.findall(r'\d+<([^>]*)>|(AT_FDCWD)|"([^"]*)"', args):
            if fd_dir or at_cwd:
                base = fd_dir or str(cwd)
            elif path:
                out.append(os.path.normpath(os.path.join(base, path)))
                base = str(cwd)
    return out


async def test_real_pdlb_from_the_configmap_answers_the_probes(start_pdlb) -> None:
    """The ConfigMap's backends.toml, vLLM pods replaced by loopback emulators: pdlb serves,
    /health/live and /health/ready are 200, /metrics scrapes, and a request goes through."""
    async with emulated_backends() as (text, model):
        config: Config = parse_config(tomllib.loads(text), "<configmap>")
        url, _ = await start_pdlb(override(config, host="127.0.0.1", port=0))
        assert await get_json(url + "/health/live") == (200, {"status": "live"})
        status, body = await get(url + "/health/ready")
        assert status == 200 and json.loads(body)["status"] == "ready"
        assert (await get(url + "/health"))[0] == 200
        status, metrics = await get(url + "/metrics")
        assert status == 200 and "pdlb_build_info" in metrics
        async with aiohttp.ClientSession() as s, s.post(
                url + "/v1/chat/completions",
                json={"model": model, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hello"}]}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["model"] == model and answer["choices"][0]["message"]["content"]


# --- vLLM -------------------------------------------------------------------------------------


def _plan_for(role: str, sts: dict[str, Any], run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """What ``pdlb launch-vllm --device gpu`` would run for this role with the manifest's
    model, name, length and ports (argv with the manifest's --port; env additions)."""
    args = container(sts)["args"]
    port = int(flag_value(args, "--port"))
    side = named_ports(container(sts))["nixl"]
    config = LaunchConfig(
        model=args[0], device="gpu", served_model_name=flag_value(args, "--served-model-name"),
        max_model_len=int(flag_value(args, "--max-model-len")), host=flag_value(args, "--host"),
        base_port=port, side_channel_port=side, prefill=1, decode=1)
    (plan,) = [p for p in plan_servers(config, vllm=("vllm",), run_dir=run_dir) if p.role == role]
    argv = list(plan.argv)
    argv[argv.index("--port") + 1] = str(port)  # launch-vllm offsets decode ports on one host
    return argv, dict(plan.env)


def test_vllm_flags_are_the_ones_launch_vllm_plans(tmp_path: Path) -> None:
    shared = None
    for role, sts in statefulsets().items():
        c = container(sts)
        argv = [*c["command"], *c["args"]]
        planned, env = _plan_for(role, sts, tmp_path)
        assert argv[: len(planned)] == planned, role
        extras = argv[len(planned):]
        planned_flags = {t for t in planned if t.startswith("--")}
        assert not [t for t in extras if t in planned_flags], f"{role}: extras repeat a flag"
        assert "--tensor-parallel-size" not in extras  # one GPU per pod, as below
        kv = json.loads(flag_value(argv, "--kv-transfer-config"))
        assert kv["kv_role"] == {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
        # NIXL's side channel: the pod IP (decodes connect to it), the container's nixl port
        manifest_env = {e["name"]: e for e in c["env"]}
        nixl = {k for k in env if k.startswith("VLLM_NIXL_")}
        assert nixl == {"VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT"}
        assert nixl <= manifest_env.keys()
        host = manifest_env["VLLM_NIXL_SIDE_CHANNEL_HOST"]
        assert host["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        # (one server per pod: every pod can use the same port; launch-vllm, with all of
        # them on one host, spaces them 10 apart)
        assert manifest_env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == str(
            named_ports(c)["nixl"])
        assert "CUDA_VISIBLE_DEVICES" not in manifest_env  # the GPU device plugin sets it
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert c["image"].startswith("vllm/vllm-openai:")
        same = (c["image"], argv[2], flag_value(argv, "--served-model-name"),
                flag_value(argv, "--max-model-len"))
        assert shared in (None, same), "prefill and decode must serve the same model alike"
        shared = same


VLLM_PARSE = """
import json, sys
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
out = []
for argv in json.loads(sys.argv[1]):
    a = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    kv = a.kv_transfer_config
    out.append({"model": a.model_tag, "port": a.port, "host": a.host,
                "served": a.served_model_name, "details": a.enable_prompt_tokens_details,
                "connector": kv.kv_connector, "role": kv.kv_role,
                "buffer": kv.kv_buffer_device, "max_model_len": a.max_model_len})
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_vllm_flags_parse_with_vllms_own_parser() -> None:
    """The StatefulSets' ``vllm serve`` arguments through vLLM's own argument parser (the
    CPU build pdlb tests with; the image is the GPU build of the same release)."""
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM environment (scripts/vllm-cpu-env, or set PDLB_VLLM_ENV)")
    sets = statefulsets()
    argvs = []
    for sts in sets.values():
        c = container(sts)
        assert c["command"] == ["vllm", "serve"]
        argvs.append(c["args"])
    done = subprocess.run([str(python), "-c", VLLM_PARSE, json.dumps(argvs)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    for (role, sts), got in zip(sets.items(), parsed, strict=True):
        args = container(sts)["args"]
        assert got["model"] == args[0]
        assert got["port"] == int(flag_value(args, "--port"))
        assert got["served"] == [flag_value(args, "--served-model-name")]
        assert got["details"] is True
        assert (got["connector"], got["role"], got["buffer"]) == (
            "NixlConnector", {"prefill": "kv_producer", "decode": "kv_consumer"}[role], "cuda")
        assert got["max_model_len"] == int(flag_value(args, "--max-model-len"))


# --- kustomize ------------------------------------------------------------------------------


def _kinds_names(docs: Iterator[Any]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs if d}


def test_kustomization_lists_every_manifest_and_renders() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*MANIFESTS,
                                                                 "kustomization.yaml"])
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the render check needs its kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert _kinds_names(yaml.safe_load_all(done.stdout)) == set(k8s_objects())
