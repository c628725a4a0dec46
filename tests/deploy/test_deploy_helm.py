"""helm/tandem: values.schema.json accepts the defaults and rejects bad values; the chart
renders (Helm's own Go SDK, through helm-python-sdk) into valid Kubernetes objects
(kubernetes-validate, strict) for the default values and a multi-GPU configuration."""

from __future__ import annotations

import json

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from promql_refs import REPO

CHART = REPO / "helm" / "tandem"
KUBE_VERSION = "1.30.0"
GPU_VALUES = {
    "image": {"repository": "registry.example.com/tandem", "tag": "0.1.0-cuda"},
    "model": {
        "name": "/models/qwen2.5-7b",
        "servedModelName": "qwen",
        "pvc": {"claimName": "models"},
        "hfToken": {"secretName": "hf"},
    },
    "tensorParallelSize": 2,
    "gpus": 2,
    "server": {
        "shutdownTimeoutSeconds": 60,
        "apiKey": {"secretName": "tandem-api"},
        "chatTemplate": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "extraArgs": ["--max-num-seqs", "64"],
        "env": {"OMP_NUM_THREADS": 8},
    },
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "autoscaling": {"enabled": True, "maxReplicas": 3},
}
BAD_VALUES = [
    {"tensorParallelSize": 0},
    {"gpus": -1},
    {"replicaCount": "two"},
    {"image": {"pullPolicy": "Sometimes"}},
    {"server": {"logFormat": "xml"}},
    {"server": {"port": 70000}},
    {"server": {"shutdownTimeoutSeconds": -5}},
    {"server": {"extraArgs": "--max-num-seqs 8"}},
    {"service": {"type": "Ingress"}},
    {"serviceMonitor": {"interval": "soon"}},
    {"resources": {"limits": {"memory": "lots"}}},
    {"modle": {"name": "typo"}},
]


def _defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _render(values: dict) -> dict[str, list[dict]]:
    """Template path -> the objects it renders (NOTES.txt as text under "NOTES")."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name="llm", namespace="serving", is_install=True)
    out: dict[str, list] = {}
    for path, text in files.items():
        name = path.split("/")[-1]
        if name == "NOTES.txt":
            out["NOTES"] = [text]
        else:
            out[name] = [d for d in yaml.safe_load_all(text) if d]
    return out


def _deployment(objects: dict) -> dict:
    (dep,) = objects["deployment.yaml"]
    return dep


def test_schema_accepts_the_defaults():
    jsonschema.Draft7Validator.check_schema(_schema())
    jsonschema.validate(_defaults(), _schema())
    jsonschema.validate(_merge(_defaults(), GPU_VALUES), _schema())
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        chart.validate_schema(GPU_VALUES)


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda v: json.dumps(v))
def test_schema_rejects_bad_values(bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_merge(_defaults(), bad), _schema())
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)


def test_helm_lint_has_no_errors():
    report = helm.lint(str(CHART), strict=True, kube_version="v" + KUBE_VERSION)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [{}, GPU_VALUES], ids=["defaults", "gpu"])
def test_rendered_objects_are_valid_kubernetes(values):
    objects = _render(values)
    kinds = set()
    for name, docs in objects.items():
        for doc in docs if name != "NOTES" else []:
            kinds.add(doc["kind"])
            if doc["kind"] == "ServiceMonitor":  # a CRD: no upstream schema
                _check_service_monitor(doc)
                continue
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    if values:
        assert {"HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds


def test_kubernetes_validate_catches_a_broken_object():
    (service,) = _render({})["service.yaml"]
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


def _check_service_monitor(doc: dict) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = doc["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert doc["metadata"]["labels"]["release"] == "prometheus"


def test_defaults_serve_the_builtin_model_on_cpu():
    objects = _render({})
    pod = _deployment(objects)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][:2] == ["--host", "0.0.0.0"]  # no MODEL: the built-in model
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "dshm" not in {v["name"] for v in pod["volumes"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "hpa.yaml" not in objects or objects["hpa.yaml"] == []


def test_probes_prestop_and_grace_match_the_shutdown_timeout():
    pod = _deployment(_render(GPU_VALUES))["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    args = c["args"]
    timeout = int(args[args.index("--shutdown-timeout") + 1])
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert timeout == 60
    # preStop sleep, then the drain, then uvicorn's 5 s close: all inside the grace period
    assert pod["terminationGracePeriodSeconds"] >= sleep + timeout + 5


def test_gpu_values_reach_the_pod():
    objects = _render(GPU_VALUES)
    pod = _deployment(objects)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    assert args[0] == "/models/qwen2.5-7b"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--served-model-name") + 1] == "qwen"
    assert args[-2:] == ["--max-num-seqs", "64"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["TANDEM_API_KEY"] == {"name": "tandem-api", "key": "api-key"}
    assert env["HF_TOKEN"]["name"] == "hf"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    (hpa,) = objects["hpa.yaml"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "tandem_num_requests_waiting"
    assert "replicas" not in _deployment(objects)["spec"]  # the HPA owns the count
    configmaps = {d["metadata"]["name"]: d for d in objects["configmap.yaml"]}
    assert configmaps["llm-tandem"]["data"]["OMP_NUM_THREADS"] == "8"
    assert "messages" in configmaps["llm-tandem-files"]["data"]["chat_template.jinja"]


def test_fewer_gpus_than_tensor_parallel_ranks_is_refused():
    with pytest.raises(helm.HelmRenderError, match="tensorParallelSize"):
        _render({"tensorParallelSize": 4, "gpus": 2})


def test_notes_say_how_to_connect():
    (notes,) = _render({})["NOTES"]
    assert "port-forward service/llm-tandem" in notes
    assert "http://llm-tandem.serving.svc:8000/v1" in notes
