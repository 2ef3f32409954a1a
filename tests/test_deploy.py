"""Offline checks of the deploy manifests (deploy/, docs/deploy.md): no network, no cluster.

What is checked (each check is also shown to fail on a broken copy, see the `*_fails_*` tests):

1. YAML: every YAML file under deploy/ and the root prefect.yaml parses, no document empty.
2. Ray cluster launcher (deploy/ray/cluster.yaml): valid against the JSON schema Ray ships
   (ray/autoscaler/ray-schema.json, with jsonschema) and through `ray up`'s own
   prepare_config + validate_config; a CPU head and a GPU worker type that scales from 0; the
   checkout mounted and pip-installed on every node; EFS mounted where the store lives; the node
   environment (deploy/ray/anole-env.sh) gives valid Ray options that fit the GPU node type.
3. KubeRay (deploy/k8s/): RayCluster and RayJob valid against the KubeRay v1.7.0 CRD schemas
   (deploy/k8s/schema/) with unknown fields rejected, as `kubectl apply --validate=strict`
   would; the Deployments' pod templates against the same PodTemplateSpec schema; references
   between objects (volumes, claims, ConfigMap, Secret, cluster selector, head service) resolve;
   one image everywhere; rayVersion is the installed Ray; the GPU group asks for
   nvidia.com/gpu and fits the workers' shares.
4. Prefect (deploy/prefect/prefect.yaml and the root prefect.yaml): each entrypoint
   `path/file.py:function` is a file, imports as a module, and names a Prefect flow; the
   deployment's parameters exist in the flow's signature and validate against its parameter
   schema; triggers and schedules parse with Prefect's own models; the trigger expects the event
   ingestion emits and matches its resource ids; pull steps import; the cluster manifest passes
   PREFECT_API_URL and RAY_ADDRESS to flow runs, and every `{{ $VAR }}` it reads is set on both
   deploy paths.
5. Commands: every `anole`, `ray` and `prefect` command line in the manifests, their usage
   comments and docs/deploy.md names an existing command with options it accepts (`anole <cmd>
   --help` is run for each anole command; `prefect <cmd> --help` for each prefect command;
   Ray's click CLI for ray), and every repository path they name exists.
6. Dockerfile vs README (`dockerfile_problems`, rules in its docstring).
7. Every `REPLACE` placeholder in deploy/ is listed in docs/deploy.md, and only those.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs" / "deploy.md"
BIN = Path(sys.executable).parent
CLUSTER_YAML = DEPLOY / "ray" / "cluster.yaml"
ENV_SH = DEPLOY / "ray" / "anole-env.sh"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
CLUSTER_PREFECT = DEPLOY / "prefect" / "prefect.yaml"
PREFECT_MANIFESTS = [CLUSTER_PREFECT, REPO / "prefect.yaml"]
KUBERAY_SCHEMA = DEPLOY / "k8s" / "schema" / "kuberay-v1.7.0.json"
TOOLS = ("anole", "ray", "prefect")


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml"), REPO / "prefect.yaml"])


def load_all(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def k8s_objects() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load_all(path)]


def shell_env(script: Path, home: str = "/home/ubuntu") -> dict[str, str]:
    """The variables `source script` exports, in an otherwise empty environment."""
    out = subprocess.run(
        [
            "env",
            "-i",
            f"HOME={home}",
            "bash",
            "-c",
            f"set -a; source {shlex.quote(str(script))}; env -0",
        ],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


# --------------------------------------------------------------------------- 1. YAML


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) and d for d in docs), path


# --------------------------------------------------------------------------- 2. Ray launcher


@cache
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_against_rays_schema_and_ray_up_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster_config()
    jsonschema.validate(config, ray_schema())
    # What `ray up` does with the file before it talks to the cloud provider.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_schema_check_fails_on_a_bad_field():
    config = cluster_config()
    config["max_workers"] = "4"
    config["available_node_types"]["anole.gpu"]["resources"]["GPU"] = 0.5
    config["setup_command"] = config.pop("setup_commands")
    errors = list(jsonschema.Draft7Validator(ray_schema()).iter_errors(config))
    where = {e.path[-1] if e.path else e.message.split("'")[1] for e in errors}
    assert where == {"max_workers", "GPU", "setup_command"}, [e.message for e in errors]


def test_cluster_yaml_has_a_cpu_head_and_autoscaling_gpu_workers():
    config = cluster_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head.get("resources", {}).get("GPU")
    gpu = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert len(gpu) == 1
    gpu = gpu[0]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(
        ("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p5.")
    )


def test_cluster_nodes_install_this_checkout_and_mount_the_store():
    config = cluster_config()
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert remote == ["~/anole"], "the checkout ('.') must be mounted on every node"
    setup = config["setup_commands"]
    installs = [
        c for c in setup if re.search(rf"pip install (-e )?{re.escape(remote[0])}(\s|$)", c)
    ]
    assert installs, "setup_commands must pip install the mounted checkout"
    env = shell_env(ENV_SH)
    mount = "/mnt/anole"
    assert any(
        f" {mount})" in c or c.rstrip().endswith(f" {mount}") for c in setup if "mount -t" in c
    )
    for var in ("ANOLE_HOME", "ANOLE_WORKSPACE", "ANOLE_DATA"):
        assert env[var].startswith(mount + "/"), (var, env[var])
    # The CLI's store is the workspace's store: the flows and `anole ingest` see the same data.
    from flows.workspace import Workspace

    assert Workspace(env["ANOLE_WORKSPACE"]).store_dir == Path(env["ANOLE_HOME"])
    sourced = [c for c in setup if "anole-env.sh" in c]
    assert sourced and "~/anole/deploy/ray/anole-env.sh" in sourced[0] and ENV_SH.is_file()
    assert env["PATH"].startswith("/home/ubuntu/anole-venv/bin:")
    assert env["ANOLE_REPO"] == "/home/ubuntu/anole"
    assert env["RAY_AUTH_MODE"] == "token"
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def workers_per_node(env: dict[str, str], cpus: float, gpus: float) -> int:
    """Adaptation workers one node holds under the env's ANOLE_* options (they must parse)."""
    from workers.resources import RayOptions

    options = RayOptions.from_env(env)
    assert options.worker_gpus and options.worker_cpus, "pin the workers' GPU and CPU shares"
    return int(min(gpus / options.worker_gpus, cpus / options.worker_cpus) + 1e-9)


def test_cluster_node_environment_gives_valid_ray_options_that_fit_a_gpu_node():
    config = cluster_config()
    (gpu,) = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    env = shell_env(ENV_SH)
    assert workers_per_node(env, gpu["resources"]["CPU"], gpu["resources"]["GPU"]) >= 1
    assert float(env["ANOLE_PLACEMENT_TIMEOUT"]) >= 300, "leave time for a GPU node to start"
    # The check can fail: shares that do not fit a node, or that Ray options reject.
    assert workers_per_node({**env, "ANOLE_WORKER_CPUS": "8"}, 4, 1) == 0
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        workers_per_node({**env, "ANOLE_WORKER_GPUS": "1.5"}, 4, 1)


# --------------------------------------------------------------------------- 3. KubeRay


def _strict(node, in_map: bool = False):
    """Reject unknown fields wherever the schema lists the known ones (kubectl's strict mode)."""
    if isinstance(node, dict):
        if in_map:
            return {k: _strict(v) for k, v in node.items()}
        out = {
            k: _strict(v, in_map=k in ("properties", "patternProperties", "$defs"))
            for k, v in node.items()
        }
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@cache
def kuberay() -> dict:
    doc = json.loads(KUBERAY_SCHEMA.read_text())
    return {"kinds": doc["kinds"], "defs": _strict(doc["$defs"], in_map=True), "tag": doc["tag"]}


def schema_for(kind: str) -> dict:
    k = kuberay()
    return {"$defs": k["defs"], **_strict(k["kinds"][kind])}


def pod_template_schema() -> dict:
    """Kubernetes' PodTemplateSpec, as the RayCluster CRD embeds it (its head group template)."""
    k = kuberay()
    spec = schema_for("RayCluster")["properties"]["spec"]
    while "$ref" in spec:
        spec = k["defs"][spec["$ref"].rsplit("/", 1)[1]]
    head = spec["properties"]["headGroupSpec"]
    while "$ref" in head:
        head = k["defs"][head["$ref"].rsplit("/", 1)[1]]
    return {"$defs": k["defs"], **head["properties"]["template"]}


def schema_errors(schema: dict, obj: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(obj)]


def test_kuberay_schema_file_is_the_tag_its_name_says():
    assert KUBERAY_SCHEMA.name == f"kuberay-{kuberay()['tag']}.json"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_validate_strictly_against_the_crd_schema(kind):
    objects = [o for o in k8s_objects() if o["kind"] == kind]
    assert len(objects) == 1
    assert objects[0]["apiVersion"] == "ray.io/v1"
    assert schema_errors(schema_for(kind), objects[0]) == []


def test_kuberay_schema_check_fails_on_unknown_or_mistyped_fields():
    (cluster,) = [o for o in k8s_objects() if o["kind"] == "RayCluster"]
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resourcez"] = {}
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    broken["spec"]["authOptions"]["mode"] = "tokens"
    errors = schema_errors(schema_for("RayCluster"), broken)
    assert len(errors) == 3 and any("resourcez" in e for e in errors), errors


def test_deployment_pod_templates_validate_against_the_pod_template_schema():
    deployments = [o for o in k8s_objects() if o["kind"] == "Deployment"]
    assert deployments
    for d in deployments:
        assert schema_errors(pod_template_schema(), d["spec"]["template"]) == [], d["metadata"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    broken = copy.deepcopy(deployments[0]["spec"]["template"])
    broken["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"nmae": "anole-env"}}]
    assert schema_errors(pod_template_schema(), broken)


def pod_specs() -> list[tuple[str, dict]]:
    out = []
    for o in k8s_objects():
        if o["kind"] == "RayCluster":
            out.append(("head", o["spec"]["headGroupSpec"]["template"]["spec"]))
            out += [(g["groupName"], g["template"]["spec"]) for g in o["spec"]["workerGroupSpecs"]]
        elif o["kind"] == "Deployment":
            out.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
    return out


def test_kubernetes_objects_refer_to_each_other_consistently():
    objects = k8s_objects()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    docs = DOCS.read_text()
    # The Secret holds a token, so it is created by a command (docs), not committed.
    secrets = set(re.findall(r"kubectl create secret generic ([\w-]+)", docs))
    images = set()
    for where, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            images.add(c["image"])
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, (where, m)
            for ref in c.get("envFrom", []):
                assert ("ConfigMap", ref["configMapRef"]["name"]) in names, (where, ref)
            for e in c.get("env", []):
                key = e.get("valueFrom", {}).get("secretKeyRef")
                if key:
                    assert key["name"] in secrets and key["key"] == "auth_token", (where, e)
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, (where, claim)
    assert len(images) == 1, f"one image for every pod: {images}"
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    assert cluster["spec"]["authOptions"]["secretName"] in secrets
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # KubeRay names the head service <cluster>-head-svc; the Prefect worker joins through it.
    (worker,) = [s for w, s in pod_specs() if w == "anole-prefect-worker"]
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    assert env["RAY_ADDRESS"] == f"{cluster['metadata']['name']}-head-svc:6379"
    for o in objects:
        if o["kind"] == "ConfigMap":
            bad = {k: v for k, v in o["data"].items() if not isinstance(v, str)}
            assert not bad, f"ConfigMap values must be strings: {bad}"
        if o["kind"] == "Service":
            targets = [
                d for d in objects
                if d["kind"] == "Deployment"
                and o["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]  # fmt: skip
            assert len(targets) == 1, o["metadata"]["name"]


def test_kuberay_cluster_has_an_autoscaling_gpu_group_that_fits_the_workers():
    import ray

    (cluster,) = [o for o in k8s_objects() if o["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__, (
        "rayVersion must be the Ray in the image (the one pyproject installs): update it"
    )
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    (config,) = [o for o in k8s_objects() if o["kind"] == "ConfigMap"]
    assert workers_per_node(config["data"], float(limits["cpu"]), 1.0) >= 1
    assert Path(config["data"]["ANOLE_HOME"]) == Path(config["data"]["ANOLE_WORKSPACE"]) / "store"


# --------------------------------------------------------------------------- 4. Prefect


def deployments() -> list[tuple[Path, dict]]:
    return [(p, d) for p in PREFECT_MANIFESTS for d in yaml.safe_load(p.read_text())["deployments"]]


@pytest.mark.parametrize(
    "manifest,deployment",
    deployments(),
    ids=[f"{p.relative_to(REPO)}:{d['name']}" for p, d in deployments()],
)
def test_deployment_entrypoint_is_a_flow_that_takes_its_parameters(manifest, deployment):
    from prefect import Flow
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    path, name = deployment["entrypoint"].split(":")
    assert (REPO / path).is_file() and path.endswith(".py"), path
    module = importlib.import_module(path[: -len(".py")].replace("/", "."))
    flow = getattr(module, name)
    assert isinstance(flow, Flow)
    parameters = deployment.get("parameters", {})
    unknown = set(parameters) - set(inspect.signature(flow.fn).parameters)
    assert not unknown, f"{deployment['name']}: {flow.name} has no parameter {sorted(unknown)}"
    schema = parameter_schema(flow).model_dump_for_openapi()
    errors = validate(parameters, schema, ignore_required=True)
    assert not errors, [e.message for e in errors]
    assert deployment["work_pool"]["name"]


def test_deployment_parameter_check_fails_on_a_wrong_type():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.flows import retrain_on_new_domains

    schema = parameter_schema(retrain_on_new_domains).model_dump_for_openapi()
    assert validate({"root": "/w", "workers": "four"}, schema, ignore_required=True)


@pytest.mark.parametrize("manifest", PREFECT_MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_triggers_schedules_and_pull_steps_parse_with_prefects_models(manifest):
    from prefect.events import DeploymentTriggerTypes
    from prefect.schedules import Cron
    from pydantic import TypeAdapter

    from flows.tasks import DOMAIN_ARRIVED

    spec = yaml.safe_load(manifest.read_text())
    for step in spec.get("pull") or []:
        (dotted,) = step
        module, _, func = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), func)), dotted
    by_name = {d["name"]: d for d in spec["deployments"]}
    retrain = by_name["retrain"]
    assert retrain["entrypoint"] == "flows/flows.py:retrain_on_new_domains"
    for schedule in retrain["schedules"]:
        Cron(schedule["cron"], timezone=schedule.get("timezone"))
    (trigger,) = retrain["triggers"]
    parsed = TypeAdapter(DeploymentTriggerTypes).validate_python(trigger)
    assert parsed.expect == {DOMAIN_ARRIVED}
    # Ingestion announces a domain as the resource anole.domain.<name> (flows/tasks.py).
    assert fnmatch.fnmatchcase("anole.domain.Korean", trigger["match"]["prefect.resource.id"])
    assert parsed.posture == "Reactive" and parsed.threshold == 1


def test_cluster_prefect_manifest_gives_flow_runs_the_addresses_and_runs_on_ray():
    spec = yaml.safe_load(CLUSTER_PREFECT.read_text())
    for d in spec["deployments"]:
        env = d["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_API_URL"] == "{{ $PREFECT_API_URL }}"
        assert env["RAY_ADDRESS"] == "{{ $RAY_ADDRESS }}"
    retrain = next(d for d in spec["deployments"] if d["name"] == "retrain")
    assert retrain["parameters"]["workers"] > 0


def test_every_template_variable_is_set_on_both_deploy_paths():
    """`prefect deploy` resolves `{{ $VAR }}` from its shell: on the cluster launcher's head
    (anole-env.sh plus what docs/deploy.md exports) and in the k8s Prefect worker pod."""
    text = CLUSTER_PREFECT.read_text()
    wanted = set(re.findall(r"\{\{\s*\$(\w+)\s*\}\}", text))
    assert {"PREFECT_API_URL", "RAY_ADDRESS", "ANOLE_WORKSPACE", "ANOLE_REPO"} <= wanted
    exported = set(re.findall(r"\bexport ((?:\w+=\S+\s*)+)", DOCS.read_text()))
    docs_vars = {pair.split("=")[0] for line in exported for pair in line.split()}
    launcher = set(shell_env(ENV_SH)) | docs_vars
    assert wanted <= launcher, wanted - launcher
    (config,) = [o for o in k8s_objects() if o["kind"] == "ConfigMap"]
    (worker,) = [s for w, s in pod_specs() if w == "anole-prefect-worker"]
    pod = set(config["data"]) | {e["name"] for e in worker["containers"][0]["env"]}
    assert wanted <= pod, wanted - pod


# --------------------------------------------------------------------------- 5. commands

COMMAND_KEYS = {
    "entrypoint",
    "command",
    "args",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "initialization_commands",
}
PREFIXES = {"exec", "sudo", "env", "nohup", "then", "do", "else"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}


def _yaml_snippets(node, key=None):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _yaml_snippets(v, k)
    elif isinstance(node, list):
        if key in COMMAND_KEYS and key != "args" and all(isinstance(v, str) for v in node):
            if key == "command" and node[:2] != ["/bin/bash", "-c"]:
                yield shlex.join(node)  # exec form
                return
            if key != "command":
                yield from node
                return
        for v in node:
            yield from _yaml_snippets(v, key)
    elif isinstance(node, str) and key in COMMAND_KEYS:
        yield node


def _comment_snippets(text: str) -> list[str]:
    """Usage lines in comments: `#   [Label:] <tool> ...` (indented past `# `), `\\`
    continuations joined, trailing `# ...` remarks dropped."""
    out, pending = [], None
    for line in text.splitlines():
        m = re.match(r"\s*#\s{2,}(.*)$", line)  # indented: usage, not prose
        body = re.sub(r"\s+#\s.*$", "", m.group(1).strip()) if m else ""
        if pending is not None:
            pending += " " + body.rstrip("\\").strip()
            if not body.endswith("\\"):
                out.append(pending)
                pending = None
            continue
        body = re.sub(r"^[A-Z][\w /-]*:\s+(?=\w)", "", body)
        if re.match(r"(anole|ray|prefect|docker|kubectl) ", body):
            if body.endswith("\\"):
                pending = body.rstrip("\\").strip()
            else:
                out.append(body)
    return out


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _markdown_snippets(text: str) -> list[tuple[str, str]]:
    """(kind, text): fenced shell blocks ("block") and inline spans naming a command ("inline")."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [("block", b) for b in blocks] + [
        ("inline", s) for s in spans if re.match(r"(anole|ray|prefect|kubectl) [a-z-]", s)
    ]


def snippets() -> list[tuple[str, str]]:
    """(where, shell text) for every command line in deploy/ and docs/deploy.md."""
    out = []
    for path in yaml_files():
        where = str(path.relative_to(REPO))
        for doc in load_all(path):
            out += [(where, s) for s in _yaml_snippets(doc)]
        out += [(where, s) for s in _comment_snippets(path.read_text())]
    text = DOCKERFILE.read_text()
    for instr, rest in _dockerfile_instructions(text):
        if instr == "RUN":
            out.append(("Dockerfile", rest))
        elif instr in ("CMD", "ENTRYPOINT"):
            out.append(("Dockerfile", shlex.join(json.loads(rest))))
    out += [("Dockerfile", s) for s in _comment_snippets(text)]
    out += [(f"docs/deploy.md ({kind})", s) for kind, s in _markdown_snippets(DOCS.read_text())]
    return out


DOCKER_RUN_VALUES = {"-v", "--volume", "-e", "--env", "--name", "-p", "--publish", "-w", "--workdir",
                     "--gpus", "-u", "--user", "--network", "--entrypoint", "--mount", "--shm-size"}  # fmt: skip


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell snippet, without leading VAR=value, exec, sudo, nice -n N.
    Raises ValueError when the snippet does not parse as shell words."""
    tokens = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = ""
        tokens += [*lexer, ";"]
    commands, current = [], []
    for tok in [*tokens, ";"]:
        if tok in SEPARATORS:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(tok)
    out = []
    for cmd in commands:
        words, skip = [], False
        for tok in cmd:  # drop redirections: `> /dev/null`, `2>`, `>>log`
            if skip:
                skip = False
            elif re.fullmatch(r"\d*[<>]{1,2}", tok):
                skip = True
            elif not re.fullmatch(r"\d*[<>]{1,2}\S+", tok):
                words.append(tok)
        cmd = words
        while cmd and (re.match(r"^\w+=", cmd[0]) or cmd[0] in PREFIXES):
            cmd = cmd[1:]
        if cmd[:2] == ["nice", "-n"]:
            cmd = cmd[3:]
        if cmd:
            out.append(cmd)
    return out


def command_lines(text: str) -> list[list[str]]:
    """The anole/ray/prefect commands of a shell snippet, including those run by `ray exec ...
    'CMD'`, `bash -c CMD`, `kubectl exec ... -- CMD` and `docker run [options] IMAGE CMD`."""
    out = []
    for cmd in simple_commands(text):
        tool = Path(cmd[0]).name
        if tool in TOOLS:
            out.append([tool, *cmd[1:]])
        if tool == "ray" and cmd[1:2] == ["exec"]:
            args = [a for a in cmd[2:] if not a.startswith("-")]
            if len(args) >= 2:
                out += command_lines(args[1])
        if tool == "bash" and "-c" in cmd[1:]:
            out += command_lines(cmd[cmd.index("-c") + 1])
        if tool == "kubectl" and cmd[1:2] == ["exec"] and "--" in cmd:
            out += command_lines(shlex.join(cmd[cmd.index("--") + 1 :]))
        if tool == "docker" and cmd[1:2] == ["run"]:
            rest, i = cmd[2:], 0
            while i < len(rest) and rest[i].startswith("-"):
                i += 2 if rest[i] in DOCKER_RUN_VALUES else 1
            if i + 1 < len(rest):  # rest[i] is the image, then its command
                out += command_lines(shlex.join(rest[i + 1 :]))
    return out


def _used_options(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if re.match(r"--[a-z]", a)}


@cache
def anole_cli():
    import typer

    from flows.cli import app

    return typer.main.get_command(app)


def _click_options(command) -> set[str]:
    opts = {"--help"}
    for p in command.params:
        opts |= {o for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}
    return opts


def anole_problems(argv: list[str]) -> list[str]:
    group = anole_cli()
    if len(argv) < 2 or argv[1].startswith("-"):
        return [] if set(argv[1:]) <= {"--help"} else [f"{shlex.join(argv)}: no command"]
    sub = group.commands.get(argv[1])
    if sub is None:
        return [f"{shlex.join(argv)}: `anole {argv[1]}` is no command ({sorted(group.commands)})"]
    bad = _used_options(argv[2:]) - _click_options(sub)
    return [f"{shlex.join(argv)}: anole {argv[1]} has no option {sorted(bad)}"] if bad else []


def ray_problems(argv: list[str]) -> list[str]:
    from ray.scripts.scripts import cli

    if len(argv) < 2:
        return [f"{argv}: no command"]
    sub = cli.commands.get(argv[1])
    if sub is None:
        return [f"{shlex.join(argv)}: `ray {argv[1]}` is no command"]
    bad = _used_options(argv[2:]) - _click_options(sub)
    return [f"{shlex.join(argv)}: ray {argv[1]} has no option {sorted(bad)}"] if bad else []


PREFECT_SESSION_FLAGS = {"--prompt", "--no-prompt"}


def prefect_problems(argv: list[str]) -> list[str]:
    """Parse (not run) the command line with Prefect's own CLI app (cyclopts): an unknown command
    or option, or a missing argument, is an error."""
    import prefect.cli  # noqa: F401  (registers the commands)
    from prefect.cli._app import _app

    args = [a for a in argv[1:] if a not in PREFECT_SESSION_FLAGS]
    try:
        _app.parse_args(args, exit_on_error=False, print_error=False)
    except Exception as exc:  # cyclopts' errors: UnknownOptionError, MissingArgumentError, ...
        return [f"{shlex.join(argv)}: {type(exc).__name__}: {str(exc)[:200]}"]
    return []


def all_commands() -> list[tuple[str, list[str]]]:
    out = []
    for where, text in snippets():
        try:
            out += [(where, argv) for argv in command_lines(text)]
        except ValueError as exc:  # unbalanced quotes: a command line nobody could run
            raise AssertionError(
                f"{where}: does not parse as shell words ({exc}): {text}"
            ) from None
    return out


def test_manifests_and_docs_name_commands_at_all():
    tools = {argv[0] for _, argv in all_commands()}
    assert tools == set(TOOLS)
    named = {(argv[0], argv[1]) for _, argv in all_commands() if len(argv) > 1}
    # The ones the deploy path rests on are among them (so the extraction keeps working).
    for expected in [
        ("anole", "train"), ("anole", "run"), ("anole", "ingest"), ("ray", "up"), ("ray", "start"),
        ("prefect", "deploy"), ("prefect", "worker"), ("prefect", "work-pool"), ("prefect", "event"),
    ]:  # fmt: skip
        assert expected in named, expected


def test_every_anole_ray_and_prefect_command_named_exists_with_its_options():
    commands = all_commands()
    problems = []
    for where, argv in commands:
        check = {"anole": anole_problems, "ray": ray_problems, "prefect": prefect_problems}
        found = check[argv[0]](argv)
        if where.endswith("(inline)"):  # prose names a command without its arguments
            found = [p for p in found if "MissingArgumentError" not in p]
        problems += [f"{where}: {p}" for p in found]
    assert not problems, "\n".join(problems)
    # And each anole command answers --help as a process, the way a user meets it.
    subs = sorted({argv[1] for _, argv in commands if argv[0] == "anole" and len(argv) > 1})
    subs = [s for s in subs if not s.startswith("-")]
    assert "train" in subs
    for sub in subs:
        done = subprocess.run([str(BIN / "anole"), sub, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "Usage" in done.stdout, (sub, done.stderr[-500:])


def test_the_command_checks_fail_on_a_wrong_command_or_option():
    assert anole_problems(["anole", "train", "--wrokers", "2"])
    assert anole_problems(["anole", "retrain"])
    assert not anole_problems(["anole", "train", "--workers", "2", "--resume", "--json"])
    assert ray_problems(["ray", "start", "--hed"])
    assert ray_problems(["ray", "upp", "cluster.yaml"])
    assert prefect_problems(["prefect", "deploy", "--prefect-fil", "x.yaml"])
    lines = command_lines(
        "ray exec c.yaml 'RAY_ADDRESS=h:1 anole train --x 1' && exec prefect worker start"
    )
    assert lines == [["ray", "exec", "c.yaml", "RAY_ADDRESS=h:1 anole train --x 1"],
                     ["anole", "train", "--x", "1"], ["prefect", "worker", "start"]]  # fmt: skip


REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:deploy|docs|benchmarks|flows|workers|pipeline|tests)/[\w./-]*[\w/])"
)


def test_repository_paths_named_in_manifests_and_docs_exist():
    files = [p for p in [*DEPLOY.rglob("*"), DOCS] if p.is_file() and p.suffix != ".json"]
    missing = [
        f"{path.relative_to(REPO)}: {ref}"
        for path in files
        for ref in REPO_PATH.findall(path.read_text())
        if not (REPO / ref).exists()
    ]
    assert not missing, missing


# --------------------------------------------------------------------------- 6. Dockerfile


def readme_commands(readme: str) -> dict[str, object]:
    """The README's main command steps and the `anole` commands its Commands table documents."""
    block = re.search(r"<!-- main-command -->\s*```\w*\n(.*?)\n```", readme, flags=re.S)
    if block is None:
        raise AssertionError("README.md has no main command after <!-- main-command -->")
    steps = [s.strip() for s in block.group(1).split("&&")]
    table = set(re.findall(r"^\|\s*`anole ([a-z-]+)", readme, flags=re.M))
    return {
        "steps": steps,
        "documented": table | {s.split()[1] for s in steps if s.startswith("anole ")},
    }


def pip_targets(argv: list[str]) -> tuple[set[str], bool]:
    """Requirement targets of `pip install ...` (editable ones included) and whether any is -e."""
    targets, editable, skip = set(), False, False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("-e", "--editable"):
            editable = True
            targets.add(argv[i + 1])
            skip = True
        elif a in (
            "-r",
            "-c",
            "-i",
            "--index-url",
            "--extra-index-url",
            "--constraint",
            "--requirement",
        ):
            skip = True
        elif not a.startswith("-"):
            targets.add(a)
    return targets, editable


def dockerfile_problems(dockerfile: str, readme: str, pyproject: dict, ci_script: str) -> list[str]:
    """How the Dockerfile departs from the README's way of installing and running the project.

    D1 Python: the default BASE_IMAGE is python:X.Y-*, X.Y meets README's "Python >= A.B" and
       pyproject's requires-python, and the venv is made with that same pythonX.Y.
    D2 Install: the README main command's steps, in order: a venv (`-m venv`), then `pip install`
       of the same targets (README `pip install -e .` -> the Dockerfile installs `.`; an image may
       drop -e and add flags, not change what is installed).
    D3 Sources: before that install, COPY brings pyproject.toml, its readme file and every package
       [tool.setuptools.packages.find] includes (a new package must be copied too).
    D4 Default command: CMD (exec form) is the README main command's last step (`anole run`).
    D5 Documented commands: every `anole <cmd>` the Dockerfile runs or shows in its usage comments
       is a command the README documents.
    D6 Offline settings: the Dockerfile's ENV has every VAR=value that .ci/run exports.
    """
    problems = []
    instructions = _dockerfile_instructions(dockerfile)
    readme_info = readme_commands(readme)
    steps = readme_info["steps"]

    # D1
    want = re.search(r"Python\s*(?:≥|>=)\s*(\d+)\.(\d+)", readme)
    need = re.search(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    base = re.search(r"^ARG BASE_IMAGE=python:(\d+)\.(\d+)", dockerfile, flags=re.M)
    if not (want and need and base):
        problems.append(
            "D1: cannot read README's Python, requires-python or ARG BASE_IMAGE=python:X.Y"
        )
    else:
        version = (int(base[1]), int(base[2]))
        if version < (int(want[1]), int(want[2])) or version < (int(need[1]), int(need[2])):
            problems.append(f"D1: base Python {version} is older than README/pyproject require")
        venvs = [r for i, r in instructions if i == "RUN" and "-m venv" in r]
        if not any(f"python{version[0]}.{version[1]} -m venv" in r for r in venvs):
            problems.append(f"D1: no venv made with python{version[0]}.{version[1]}")

    # D2
    readme_pip = next((s for s in steps if s.startswith("pip install")), None)
    if readme_pip is None or not any("-m venv" in s for s in steps):
        problems.append("D2: README main command has no venv + pip install")
        return problems
    want_targets, _ = pip_targets(shlex.split(readme_pip)[2:])
    runs = [(n, r) for n, (i, r) in enumerate(instructions) if i == "RUN"]
    venv_at = next((n for n, r in runs if "-m venv" in r), None)
    install_at, got_targets = None, set()
    for n, r in runs:
        for argv in simple_commands(r):
            if argv[:2] == ["pip", "install"]:
                targets, _ = pip_targets(argv[2:])
                if targets & {".", *want_targets}:
                    install_at, got_targets = n, targets
    if install_at is None:
        problems.append(f"D2: the Dockerfile never installs the project (README: {readme_pip})")
    else:
        if got_targets != want_targets:
            problems.append(
                f"D2: README installs {sorted(want_targets)}, Dockerfile {sorted(got_targets)}"
            )
        if venv_at is None or venv_at > install_at:
            problems.append("D2: no venv before the project install (README: python3 -m venv)")

        # D3
        copied: set[str] = set()
        for i, r in instructions[:install_at]:
            if i == "COPY":
                parts = [p for p in shlex.split(r) if not p.startswith("--")]
                copied |= {p.rstrip("/") for p in parts[:-1]}
        packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
        needed = {"pyproject.toml", pyproject["project"]["readme"]} | {
            p.rstrip("*") for p in packages
        }
        if needed - copied:
            problems.append(f"D3: not copied before the install: {sorted(needed - copied)}")

    # D4
    cmds = [json.loads(r) for i, r in instructions if i == "CMD"]
    if not cmds or cmds[-1] != shlex.split(steps[-1]):
        problems.append(f"D4: CMD {cmds[-1] if cmds else None} is not the README's `{steps[-1]}`")

    # D5
    mentioned = []
    for text in [r for i, r in instructions if i in ("RUN", "CMD")] + _comment_snippets(dockerfile):
        if text.startswith("["):
            text = shlex.join(json.loads(text))
        mentioned += [a[1] for a in command_lines(text) if a[0] == "anole" and len(a) > 1]
    undocumented = {m for m in mentioned if not m.startswith("-")} - readme_info["documented"]
    if undocumented:
        problems.append(
            f"D5: the Dockerfile names anole commands the README lacks: {sorted(undocumented)}"
        )

    # D6
    env = {}
    for i, r in instructions:
        if i == "ENV":
            env.update(dict(p.split("=", 1) for p in shlex.split(r) if "=" in p))
    exports = re.findall(r"^export (.*)$", ci_script, flags=re.M)
    wanted = dict(p.split("=", 1) for line in exports for p in shlex.split(line))
    wrong = {k: v for k, v in wanted.items() if env.get(k) != v}
    if wrong:
        problems.append(f"D6: the image's ENV lacks .ci/run's offline settings {wrong}")
    return problems


def _docker_inputs():
    return (
        DOCKERFILE.read_text(),
        (REPO / "README.md").read_text(),
        tomllib.loads((REPO / "pyproject.toml").read_text()),
        (REPO / ".ci" / "run").read_text(),
    )


def test_dockerfile_installs_and_runs_the_project_the_way_the_readme_does():
    assert dockerfile_problems(*_docker_inputs()) == []


@pytest.mark.parametrize(
    "rule,old,new",
    [
        ("D1", "ARG BASE_IMAGE=python:3.11-slim", "ARG BASE_IMAGE=python:3.10-slim"),
        ("D1", "RUN python3.11 -m venv", "RUN python3.12 -m venv"),
        ("D2", "RUN pip install . &&", "RUN pip install ./flows &&"),
        ("D2", 'RUN python3.11 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip', "RUN true"),
        ("D3", "COPY flows/ flows/\n", ""),
        ("D4", 'CMD ["anole", "run"]', 'CMD ["anole", "serve"]'),
        (
            "D5",
            "#   Prefect worker:",
            "#   docker run --rm anole:cpu anole retrain\n#   Prefect worker:",
        ),
        ("D6", "    DO_NOT_TRACK=1 \\", "    DO_NOT_TRACK=0 \\"),
    ],
)
def test_dockerfile_check_fails_when_the_dockerfile_drifts(rule, old, new):
    dockerfile, readme, pyproject, ci = _docker_inputs()
    assert old in dockerfile
    problems = dockerfile_problems(dockerfile.replace(old, new), readme, pyproject, ci)
    assert [p for p in problems if p.startswith(rule)], problems


def test_dockerfile_check_follows_the_readme_and_pyproject():
    dockerfile, readme, pyproject, ci = _docker_inputs()
    # The README installs an extra: the Dockerfile, which installs plain `.`, must follow.
    readme2 = readme.replace(
        "pip install -e . && anole run", "pip install -e '.[gpu]' && anole run"
    )
    assert readme2 != readme
    assert any(p.startswith("D2") for p in dockerfile_problems(dockerfile, readme2, pyproject, ci))
    # A new package in pyproject must be copied into the image.
    pyproject2 = copy.deepcopy(pyproject)
    pyproject2["tool"]["setuptools"]["packages"]["find"]["include"].append("serving*")
    assert any("serving" in p for p in dockerfile_problems(dockerfile, readme, pyproject2, ci))


def _torch_step() -> str:
    (body,) = [
        r
        for i, r in _dockerfile_instructions(DOCKERFILE.read_text())
        if i == "RUN" and "TORCH_INDEX_URL" in r
    ]
    return body


@pytest.mark.parametrize(
    "env,index",
    [
        ({}, "https://download.pytorch.org/whl/cpu"),
        ({"CUDA_VERSION": "12.4.1"}, "https://download.pytorch.org/whl/cu124"),
        (
            {"CUDA_VERSION": "12.8.0", "TORCH_INDEX_URL": "https://example.org/whl"},
            "https://example.org/whl",
        ),
    ],
)
def test_dockerfile_torch_step_picks_the_index_for_the_base_and_pyprojects_versions(
    tmp_path, env, index
):
    """Run the Dockerfile's torch RUN step in bash with `pip` replaced by a recorder."""
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(DEPLOY / "docker" / "pyproject_deps.py", tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pip").write_text(
        '#!/bin/bash\necho "pip $*" >> "$PIP_LOG"\n'
        'for f in "$@"; do [ -f "$f" ] && sed "s/^/  req /" "$f" >> "$PIP_LOG"; done; exit 0\n'
    )
    (fake / "pip").chmod(0o755)
    (fake / "python").symlink_to(sys.executable)
    log = tmp_path / "pip.log"
    run_env = {"PATH": f"{fake}:/usr/bin:/bin", "PIP_LOG": str(log), "TORCH_INDEX_URL": "", **env}
    subprocess.run(
        ["bash", "-c", _torch_step()], cwd=tmp_path, env=run_env, check=True, capture_output=True
    )
    calls = log.read_text().split("pip ")[1:]
    torch_call, deps_call = calls
    assert f"--index-url {index} -r" in torch_call
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_reqs = [d for d in deps if re.match(r"torch(vision)?\b", d)]
    assert re.findall(r"  req (\S+)", torch_call) == torch_reqs
    assert re.findall(r"  req (\S+)", deps_call) == [d for d in deps if d not in torch_reqs]
    assert "--index-url" not in deps_call


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    for entry in ("**/.venv", "**/.git", "anole-store", "anole-runs"):
        assert entry in ignore


# --------------------------------------------------------------------------- 7. placeholders


def test_every_placeholder_is_documented():
    used = set()
    for path in DEPLOY.rglob("*"):
        if (
            path.is_file()
            and path.suffix in (".yaml", ".yml", ".sh", "")
            and "schema" not in path.parts
        ):
            used |= set(re.findall(r"[\w-]*REPLACE[\w-]*", path.read_text()))
    used = {u for u in used if u != "REPLACE"}
    table = DOCS.read_text().split("## Placeholders", 1)[1]
    listed = set(re.findall(r"^\| `([^`]+)`", table, flags=re.M))
    assert used == listed, (used, listed)
