"""Pipelines on Kubernetes, without a cluster: the DaskCluster made from a pipeline is validated against the
operator's CRD as shipped in dask-kubernetes, settings land where Kubernetes reads them, mistakes name their
key or field, and a Kubernetes API that is missing or silent is a quick, clear error."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsi_espnet.batch import load_pipeline
from wsi_espnet.batch.clusters import open_client
from wsi_espnet.batch.kubernetes import check_cluster_spec, kubernetes_cluster_spec, open_kubernetes_client
from wsi_espnet.batch.pipeline import ClusterSpec
from wsi_espnet.errors import InputError

EXAMPLE = Path(__file__).resolve().parents[1] / "pipelines" / "kubernetes-example.yaml"
#: The least a pipeline says: an image and a volume.
BASE: dict[str, Any] = {"image": "img:1", "volumes": [{"claim": "data", "mount_path": "/data"}]}
GPU_SETTINGS: dict[str, Any] = {
    "image": "registry.example.org/wsi-espnet:0.1.0", "namespace": "pathology", "workers": 3,
    "threads_per_worker": 2, "gpus_per_worker": 1,
    "resources": {"requests": {"cpu": 4, "memory": "24Gi"}, "limits": {"cpu": 8.0, "memory": "32Gi"}},
    "scheduler_resources": {"requests": {"cpu": "500m", "memory": "2Gi"}},
    "env": {"OMP_NUM_THREADS": 4, "WSI_DEBUG": True, "NAME": "x"},
    "volumes": [
        {"claim": "slides", "mount_path": "/data/slides", "read_only": True},
        {"nfs": {"server": "nas.example.org", "path": "/export/masks"}, "mount_path": "/data/masks"},
        {"host_path": "/mnt/lustre", "mount_path": "/lustre", "sub_path": "pathology"},
    ],
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "image_pull_policy": "Always", "image_pull_secrets": ["registry-login"], "service_account": "wsi-espnet",
    "idle_timeout": 600,
}  # fmt: skip


def run_cli(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_espnet", *map(str, args)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def shared_folder(tmp_path: Path) -> Path:
    """A stand-in for the shared volume: slides/ with one (empty) slide; the example pipeline uses it."""
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"")
    return tmp_path


def _pipeline(folder: Path, kubernetes: dict[str, Any]) -> Path:
    data = {
        "pipeline_version": 1, "name": "k8s", "inputs": {"slides": "slides"}, "outputs": {"folder": "out"},
        "cluster": {"kubernetes": kubernetes},
    }  # fmt: skip
    return write_yaml(folder / "pipeline.yaml", data)


def _containers(manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(scheduler pod, scheduler container, worker pod, worker container)."""
    scheduler_pod, worker_pod = manifest["spec"]["scheduler"]["spec"], manifest["spec"]["worker"]["spec"]
    (scheduler,), (worker,) = scheduler_pod["containers"], worker_pod["containers"]
    return scheduler_pod, scheduler, worker_pod, worker


def test_the_example_pipeline_makes_a_daskcluster_the_crd_accepts(shared_folder, monkeypatch):
    monkeypatch.setenv("WSI_ESPNET_DATA", str(shared_folder))
    pipeline = load_pipeline(EXAMPLE)
    assert pipeline.cluster.kind == "kubernetes"
    assert [slide.path for slide in pipeline.cohort.slides] == [shared_folder / "slides" / "a.svs"]
    assert pipeline.out_dir == shared_folder / "masks"
    assert pipeline.cluster.settings["volumes"][0]["mount_path"] == str(shared_folder)

    manifest = kubernetes_cluster_spec(pipeline.cluster.settings, name=pipeline.name)
    check_cluster_spec(manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    assert manifest["metadata"]["name"] == "wsi-espnet-kubernetes-example"
    assert manifest["spec"]["worker"]["replicas"] == 4
    _, _, _, worker = _containers(manifest)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["volumeMounts"] == [{"name": "shared-0", "mountPath": str(shared_folder)}]


def test_settings_land_where_kubernetes_expects_them():
    manifest = kubernetes_cluster_spec(GPU_SETTINGS, name="Cohort_2024.v2")
    check_cluster_spec(manifest)
    assert manifest["metadata"] == {
        "name": "wsi-espnet-cohort-2024-v2", "labels": {"app.kubernetes.io/part-of": "wsi-espnet"},
        "namespace": "pathology",
    }  # fmt: skip
    assert manifest["spec"]["idleTimeout"] == 600
    assert manifest["spec"]["worker"]["replicas"] == 3
    scheduler_pod, scheduler, worker_pod, worker = _containers(manifest)

    assert worker["args"][:7] == ["dask", "worker", "--nthreads", "2", "--resources", "GPU=1", "--name"]
    assert scheduler["args"] == ["dask", "scheduler", "--host", "0.0.0.0"]
    assert worker["resources"] == {
        "requests": {"cpu": "4", "memory": "24Gi"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
    }
    assert scheduler["resources"] == {"requests": {"cpu": "500m", "memory": "2Gi"}}  # no GPU on the scheduler
    env = [
        {"name": "OMP_NUM_THREADS", "value": "4"},
        {"name": "WSI_DEBUG", "value": "true"},
        {"name": "NAME", "value": "x"},
    ]
    assert worker["env"] == scheduler["env"] == env

    assert worker_pod["volumes"] == [
        {"name": "shared-0", "persistentVolumeClaim": {"claimName": "slides"}},
        {"name": "shared-1", "nfs": {"server": "nas.example.org", "path": "/export/masks"}},
        {"name": "shared-2", "hostPath": {"path": "/mnt/lustre", "type": "Directory"}},
    ]
    assert worker["volumeMounts"] == [
        {"name": "shared-0", "mountPath": "/data/slides", "readOnly": True},
        {"name": "shared-1", "mountPath": "/data/masks"},
        {"name": "shared-2", "mountPath": "/lustre", "subPath": "pathology"},
    ]
    assert "volumes" not in scheduler_pod
    assert "volumeMounts" not in scheduler
    assert worker_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100"}
    assert worker_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in scheduler_pod
    assert "tolerations" not in scheduler_pod
    for pod, container in ((scheduler_pod, scheduler), (worker_pod, worker)):
        assert container["image"] == "registry.example.org/wsi-espnet:0.1.0"
        assert container["imagePullPolicy"] == "Always"
        assert pod["imagePullSecrets"] == [{"name": "registry-login"}]
        assert pod["serviceAccountName"] == "wsi-espnet"


def test_a_cpu_cluster_asks_for_no_gpu_and_sets_no_resources_it_was_not_given():
    settings = {"image": "img:1", "volumes": [{"claim": "data", "mount_path": "/data"}]}
    manifest = kubernetes_cluster_spec(settings, name="cpu")
    check_cluster_spec(manifest)
    _, scheduler, _, worker = _containers(manifest)
    assert "resources" not in worker
    assert "resources" not in scheduler
    assert "--resources" not in worker["args"]
    assert manifest["spec"]["worker"]["replicas"] == 1
    assert "namespace" not in manifest["metadata"]  # kubectl's (and KubeCluster's) current namespace


def _broken(change):
    manifest = kubernetes_cluster_spec(GPU_SETTINGS, name="broken")
    change(manifest)
    return manifest


def _set_gpu_limit_int(m):
    _containers(m)[3]["resources"]["limits"]["nvidia.com/gpu"] = 1


def _set_replicas_text(m):
    m["spec"]["worker"]["replicas"] = "3"


def _misspell_volume_mounts(m):
    _containers(m)[3]["volumeMount"] = _containers(m)[3].pop("volumeMounts")


def _drop_container_name(m):
    del _containers(m)[1]["name"]


def _set_port_text(m):
    _containers(m)[1]["ports"][0]["containerPort"] = "8786"


@pytest.mark.parametrize(("change", "field", "message"), [
    (_set_gpu_limit_int, "spec.worker.spec.containers[0].resources.limits['nvidia.com/gpu']", "1 is not of type 'str"),
    (_set_replicas_text, "spec.worker.replicas", "'3' is not of type 'integer'"),
    (_misspell_volume_mounts, "spec.worker.spec.containers[0].volumeMount", "unknown field 'volumeMount'"),
    (_drop_container_name, "spec.scheduler.spec.containers[0]", "'name' is a required property"),
    (_set_port_text, "spec.scheduler.spec.containers[0].ports[0].containerPort", "is not of type 'integer'"),
])  # fmt: skip
def test_an_invalid_spec_is_refused_with_the_field_named(change, field, message):
    with pytest.raises(InputError) as caught:
        check_cluster_spec(_broken(change))
    assert f"is not valid at {field}: " in str(caught.value)
    assert message in str(caught.value)
    assert "crds/daskcluster.yaml" in str(caught.value)


def test_a_manifest_of_another_kind_or_a_bad_name_is_refused():
    manifest = kubernetes_cluster_spec(GPU_SETTINGS, name="x")
    with pytest.raises(InputError, match=r"kind DaskCluster, not 'kubernetes\.dask\.org/v1' / 'DaskJob'"):
        check_cluster_spec({**manifest, "kind": "DaskJob"})
    renamed = copy.deepcopy(manifest)
    renamed["metadata"]["name"] = "Has_Capitals"
    with pytest.raises(InputError, match=r"metadata\.name 'Has_Capitals' is not a valid DaskCluster name"):
        check_cluster_spec(renamed)


@pytest.mark.parametrize(("kubernetes", "message"), [
    ({"volumes": BASE["volumes"]}, "line 8, cluster.kubernetes: 'image' is a required property"),
    ({**BASE, "workers": "four"}, "line 13, cluster.kubernetes.workers: 'four' is not of type 'integer'"),
    ({**BASE, "gpus_per_worker": 1.5}, "cluster.kubernetes.gpus_per_worker: 1.5 is not of type 'integer'"),
    ({**BASE, "resources": {"limits": {"memory": "16GB"}}},
     "line 15, cluster.kubernetes.resources.limits.memory: '16GB' does not match"),
    ({**BASE, "resources": {"limits": {"gpu": 1}}}, "cluster.kubernetes.resources.limits.gpu: unknown key 'gpu'"),
    ({**BASE, "volumes": [{"mount_path": "/data"}]},
     "line 11, cluster.kubernetes.volumes[0]: give exactly one of the keys claim, nfs, host_path"),
    ({**BASE, "volumes": [{"claim": "d", "mount_path": "data"}]},
     "line 12, cluster.kubernetes.volumes[0].mount_path: 'data' does not match"),
    ({**BASE, "env": {"X": [1]}}, "line 14, cluster.kubernetes.env.X: [1] is not of type 'string', 'number', 'bool"),
    ({**BASE, "imagePullPolicy": "Always"}, "line 13, cluster.kubernetes.imagePullPolicy: unknown key 'imagePullP"),
    ({**BASE, "name": "Big_Name"}, "cluster.kubernetes.name: 'Big_Name' does not match"),
])  # fmt: skip
def test_bad_kubernetes_settings_name_the_key_and_line(tmp_path, kubernetes, message):
    with pytest.raises(InputError) as caught:
        load_pipeline(_pipeline(tmp_path, kubernetes))
    assert message in str(caught.value)
    assert "pipeline.schema.json" in str(caught.value)


def test_paths_the_workers_cannot_see_are_refused(shared_folder):
    folder = str(shared_folder)
    elsewhere = {**BASE, "volumes": [{"claim": "data", "mount_path": "/nowhere"}]}
    with pytest.raises(InputError, match=r"the workers read '.*a\.svs', but no volume is mounted there \(mounted: /n"):
        load_pipeline(_pipeline(shared_folder, elsewhere))
    read_only = {**BASE, "volumes": [{"claim": "data", "mount_path": folder, "read_only": True}]}
    with pytest.raises(InputError, match=r"the workers write to '.*out', but no writable volume is mounted there"):
        load_pipeline(_pipeline(shared_folder, read_only))
    pipeline = load_pipeline(_pipeline(shared_folder, {**BASE, "volumes": [{"claim": "data", "mount_path": folder}]}))
    with pytest.raises(InputError, match=r"the workers read '/elsewhere/model\.safetensors'"):
        pipeline.replace(model="/elsewhere/model.safetensors")


def test_print_cluster_spec_prints_yaml_that_round_trips_and_validates(shared_folder, monkeypatch):
    monkeypatch.setenv("WSI_ESPNET_DATA", str(shared_folder))
    result = run_cli("batch", EXAMPLE, "--print-cluster-spec", "--workers", 8)
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    check_cluster_spec(manifest)
    pipeline = load_pipeline(EXAMPLE)
    assert manifest == kubernetes_cluster_spec({**pipeline.cluster.settings, "workers": 8}, name=pipeline.name)
    assert manifest["spec"]["worker"]["replicas"] == 8
    assert not (shared_folder / "masks").exists()  # nothing was run


def test_print_cluster_spec_refuses_a_pipeline_not_on_kubernetes(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"")
    pipeline = write_yaml(tmp_path / "local.yaml", {
        "pipeline_version": 1, "inputs": {"slides": "slides"}, "outputs": {"folder": "out"}, "cluster": {"local": {}},
    })  # fmt: skip
    result = run_cli("batch", pipeline, "--print-cluster-spec")
    assert result.returncode == 2
    assert "--print-cluster-spec prints a Kubernetes DaskCluster or a SLURM/PBS job script" in result.stderr
    assert "runs on a 'local' cluster" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _kubeconfig(path: Path, server: str) -> Path:
    return write_yaml(path, {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "default"}}],
        "users": [{"name": "test", "user": {"token": "not-a-token"}}],
    })  # fmt: skip


@pytest.mark.parametrize(("kubeconfig", "message"), [
    ("missing", "found no usable Kubernetes credentials (KUBECONFIG="),
    ("empty", "found no usable Kubernetes credentials (KUBECONFIG="),
    ("refused", "cannot reach the Kubernetes API server of KUBECONFIG="),
])  # fmt: skip
def test_no_reachable_kubernetes_api_is_a_clear_error(tmp_path, monkeypatch, kubeconfig, message):
    path = tmp_path / f"{kubeconfig}.yaml"
    if kubeconfig == "empty":
        path.write_text("")
    elif kubeconfig == "refused":
        _kubeconfig(path, f"https://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("KUBECONFIG", str(path))
    started = time.perf_counter()
    with pytest.raises(InputError) as caught, open_client(ClusterSpec("kubernetes", BASE), name="unreachable"):
        pass
    assert time.perf_counter() - started < 15
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert "kubectl" in str(caught.value)


def test_a_silent_kubernetes_api_times_out(tmp_path, monkeypatch):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config.yaml", f"https://127.0.0.1:{port}")))
        started = time.perf_counter()
        with (
            pytest.raises(InputError, match=r"did not answer within 1 s; check that `kubectl version` answers"),
            open_kubernetes_client(BASE, name="silent", api_timeout=1),
        ):
            pass
        assert time.perf_counter() - started < 5


def test_the_cli_reports_an_unreachable_kubernetes_api_with_exit_2(shared_folder):
    kubeconfig = _kubeconfig(shared_folder / "config.yaml", f"https://127.0.0.1:{_closed_port()}")
    result = run_cli("batch", EXAMPLE, "--quiet", WSI_ESPNET_DATA=str(shared_folder), KUBECONFIG=str(kubeconfig))
    assert result.returncode == 2, result.stderr
    assert "cannot reach the Kubernetes API server" in result.stderr
    assert "Traceback" not in result.stderr


def test_dask_kubernetes_is_imported_only_on_the_kubernetes_path(shared_folder):
    pipeline = _pipeline(shared_folder, {**BASE, "volumes": [{"claim": "d", "mount_path": str(shared_folder)}]})
    script = f"""
import sys
import wsi_espnet.cli, wsi_espnet.batch.clusters
from wsi_espnet.batch import load_pipeline
load_pipeline({str(pipeline)!r})
assert "dask_kubernetes" not in sys.modules, "imported before a Kubernetes cluster is made"
sys.modules["dask_kubernetes"] = None  # as if it were not installed
from wsi_espnet.batch.kubernetes import kubernetes_cluster_spec
from wsi_espnet.errors import InputError
try:
    kubernetes_cluster_spec({BASE!r}, name="x")
except InputError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "needs dask-kubernetes, which is not installed here: pip install 'wsi-espnet[kubernetes]'" in result.stdout
