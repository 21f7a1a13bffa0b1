"""Cohort jobs on Kubernetes: a DaskCluster of the Dask operator, made from a pipeline's ``cluster: {kubernetes: ...}``.

:func:`kubernetes_cluster_spec` fills ``dask_kubernetes.operator.make_cluster_spec``'s template with the
pipeline's image, workers, resources, GPUs, environment and volumes; :func:`check_cluster_spec` validates
the result against the DaskCluster CRD that dask-kubernetes ships, as the API server would (unknown fields
refused, as ``kubectl apply`` does); :func:`open_kubernetes_client` starts it with ``KubeCluster``.

Every path of a pipeline (slides, output folder, checkpoint) is opened by the workers as well as by the
driver, the process running ``wsi-espnet batch`` (it plans slides and writes the pyramid), so ``volumes``
mount shared storage on the workers at the paths the driver uses; :func:`check_shared_paths` refuses a
pipeline whose paths lie outside them.

dask-kubernetes is optional (``pip install 'wsi-espnet[kubernetes]'``) and imported here only when a
Kubernetes cluster is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import jsonschema
import yaml

from wsi_espnet.errors import InputError

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "API_TIMEOUT_S",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "check_cluster_spec",
    "check_shared_paths",
    "cluster_name",
    "kubernetes_cluster_spec",
    "open_kubernetes_client",
]

#: Seconds the Kubernetes API has to answer before a run gives up (credentials, server, operator).
API_TIMEOUT_S = 20.0
#: Seconds the scheduler pod and the first worker have to start (a large image's first pull counts).
DEFAULT_STARTUP_TIMEOUT_S = 600.0
GPU_RESOURCE = "nvidia.com/gpu"
INSTALL_HINT = "pip install 'wsi-espnet[kubernetes]'"
INSTALL_OPERATOR = (
    "helm install --repo https://helm.dask.org --create-namespace -n dask-operator --generate-name "
    "dask-kubernetes-operator"
)
#: The CRD as the operator's Helm chart installs it, inside the dask_kubernetes.operator package.
_CRD_FILE = "deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
_MAX_NAME = 53  # the operator's limit: "<name>-scheduler" must fit Kubernetes' 63 characters
_NAME = re.compile(rf"^(?=.{{1,{_MAX_NAME}}}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

_T = TypeVar("_T")


def cluster_name(pipeline_name: str) -> str:
    """The DaskCluster name for a pipeline: ``wsi-espnet-<name>`` in lower case, within the operator's 53 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", pipeline_name.lower()).strip("-")
    return f"wsi-espnet-{slug}"[:_MAX_NAME].rstrip("-") if slug else "wsi-espnet"


def kubernetes_cluster_spec(settings: Mapping[str, Any], *, name: str) -> dict[str, Any]:
    """The DaskCluster manifest for ``settings`` (a pipeline's ``cluster.kubernetes``), as ``kubectl apply`` takes it.

    name : the pipeline's name; the cluster is called ``settings["name"]`` or :func:`cluster_name` of it.

    GPUs, volumes, node selector and tolerations go to the worker pods only; the scheduler gets
    ``scheduler_resources`` (none by default). Raises :class:`InputError` without dask-kubernetes.
    """
    operator = _operator()
    gpus = int(settings.get("gpus_per_worker", 0))
    # distributed no longer installs the dask-scheduler / dask-worker scripts the template names.
    worker_command = ["dask", "worker", "--nthreads", str(settings.get("threads_per_worker", 1))]
    if gpus:
        worker_command += ["--resources", f"GPU={gpus}"]
    manifest: dict[str, Any] = operator.make_cluster_spec(
        name=settings.get("name") or cluster_name(name), image=settings["image"],
        n_workers=int(settings.get("workers", 1)), worker_command=worker_command,
        env={key: _env_value(value) for key, value in settings.get("env", {}).items()},
        idle_timeout=int(settings.get("idle_timeout", 0)),
    )  # fmt: skip
    manifest["metadata"]["labels"] = {"app.kubernetes.io/part-of": "wsi-espnet"}
    if settings.get("namespace"):
        manifest["metadata"]["namespace"] = settings["namespace"]
    scheduler_pod, worker_pod = manifest["spec"]["scheduler"]["spec"], manifest["spec"]["worker"]["spec"]
    (scheduler,), (worker,) = scheduler_pod["containers"], worker_pod["containers"]
    if scheduler["args"][:1] == ["dask-scheduler"]:
        scheduler["args"] = ["dask", "scheduler", *scheduler["args"][1:]]

    for container, wanted in (
        (scheduler, settings.get("scheduler_resources", {})),
        (worker, settings.get("resources", {})),
    ):
        given = _resources(wanted, gpus=gpus if container is worker else 0)
        if given:
            container["resources"] = given
        else:
            container.pop("resources", None)
    for pod, container in ((scheduler_pod, scheduler), (worker_pod, worker)):
        if "image_pull_policy" in settings:
            container["imagePullPolicy"] = settings["image_pull_policy"]
        if settings.get("image_pull_secrets"):
            pod["imagePullSecrets"] = [{"name": secret} for secret in settings["image_pull_secrets"]]
        if "service_account" in settings:
            pod["serviceAccountName"] = settings["service_account"]

    worker_pod["volumes"], worker["volumeMounts"] = [], []
    for index, volume in enumerate(settings.get("volumes", ())):
        source, mount = _volume(volume, name=f"shared-{index}")
        worker_pod["volumes"].append(source)
        worker["volumeMounts"].append(mount)
    if settings.get("node_selector"):
        worker_pod["nodeSelector"] = dict(settings["node_selector"])
    if settings.get("tolerations"):
        worker_pod["tolerations"] = [dict(toleration) for toleration in settings["tolerations"]]
    return manifest


def check_cluster_spec(manifest: Mapping[str, Any]) -> None:
    """Raise :class:`InputError` unless ``manifest`` is a DaskCluster the installed operator's CRD accepts.

    ``spec`` is validated against the CRD's openAPIV3Schema (``x-kubernetes-*`` extensions ignored, unknown
    fields refused as ``kubectl apply`` refuses them); the message names the first bad field's path.
    """
    crd = _crd()
    if manifest.get("apiVersion") != crd.api_version or manifest.get("kind") != crd.kind:
        raise InputError(
            f"a DaskCluster manifest has apiVersion {crd.api_version} and kind {crd.kind}, not "
            f"{manifest.get('apiVersion')!r} / {manifest.get('kind')!r}."
        )
    name = manifest.get("metadata", {}).get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"metadata.name {name!r} is not a valid DaskCluster name: lower-case letters, digits and '-', at most "
            f"{_MAX_NAME} characters, starting and ending with a letter or digit."
        )
    error = jsonschema.exceptions.best_match(crd.validator.iter_errors(manifest.get("spec")))
    if error is None:
        return
    keys: list[str | int] = ["spec", *error.absolute_path]
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {})) if isinstance(error.schema, dict) else set()
        unknown = sorted(str(key) for key in error.instance if key not in allowed)
        if unknown:
            keys.append(unknown[0])
            message = f"unknown field {unknown[0]!r}"
    raise InputError(
        f"the DaskCluster {name!r} is not valid at {_field_path(keys)}: {message} (checked against {crd.path})."
    )


def check_shared_paths(settings: Mapping[str, Any], *, reads: Iterable[Path], writes: Path) -> None:
    """Raise :class:`InputError` unless each of ``reads`` lies under a volume and ``writes`` under a writable one.

    The workers open the slides and write the masks at the paths the driver gave, so those paths must be
    mounts of shared storage (``settings["volumes"]``), at the same place on both sides.
    """
    mounts = [
        (Path(volume["mount_path"]), bool(volume.get("read_only", False))) for volume in settings.get("volumes", ())
    ]
    relative = [str(mount) for mount, _ in mounts if not mount.is_absolute()]
    if relative:
        raise InputError(f"cluster.kubernetes: volume mount_path {relative[0]!r} must be an absolute path.")

    def mounted(path: Path, *, writable: bool) -> bool:
        return any(
            path == mount or mount in path.parents for mount, read_only in mounts if not (writable and read_only)
        )

    listed = ", ".join(str(mount) + (" (read-only)" if read_only else "") for mount, read_only in mounts) or "none"
    for path in reads:
        if not mounted(path, writable=False):
            raise InputError(
                f"cluster.kubernetes: the workers read {str(path)!r}, but no volume is mounted there (mounted: "
                f"{listed}); add the shared folder that holds it to volumes, mounted at the same path."
            )
    if not mounted(writes, writable=True):
        raise InputError(
            f"cluster.kubernetes: the workers write to {str(writes)!r}, but no writable volume is mounted there "
            f"(mounted: {listed}); put the output folder on a volume the workers mount read-write, at the same path."
        )


@contextlib.contextmanager
def open_kubernetes_client(
    settings: Mapping[str, Any], *, name: str, api_timeout: float = API_TIMEOUT_S
) -> Iterator[Client]:
    """A client of a DaskCluster started with ``KubeCluster`` for ``settings``; the cluster is deleted on exit.

    The Kubernetes API is asked first, for at most ``api_timeout`` seconds, whether it answers and knows
    the DaskCluster kind; then the scheduler and the first worker get ``startup_timeout`` seconds. A
    DaskCluster of the same name that exists already (a run cut short) is connected to, and deleted on
    exit too. Every failure is an :class:`InputError` saying what to check.
    """
    manifest = kubernetes_cluster_spec(settings, name=name)
    check_cluster_spec(manifest)
    namespace = _check_api(settings.get("namespace"), timeout=api_timeout)
    operator = _operator()
    from distributed import Client

    cluster_id = manifest["metadata"]["name"]
    startup = float(settings.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT_S))
    look = (
        f"see `kubectl get daskcluster,pods -n {namespace} -l dask.org/cluster-name={cluster_id}` and "
        "`kubectl describe pod` of a pod that is not Running"
    )

    def start() -> Any:
        return operator.KubeCluster(
            custom_cluster_spec=manifest, namespace=namespace, resource_timeout=int(startup), quiet=True
        )

    try:
        cluster = _in_thread(start, timeout=startup, name="kube-cluster-start")
    except _StillRunningError:
        raise InputError(
            f"the scheduler of DaskCluster {cluster_id!r} did not start within {startup:g} s; {look} (image name "
            f"and pull secrets? quota?), then `kubectl delete daskcluster -n {namespace} {cluster_id}`."
        ) from None
    except Exception as exc:  # whatever the operator's client raises, the cause is in the cluster, not here
        raise InputError(
            f"could not start DaskCluster {cluster_id!r} in namespace {namespace!r} ({type(exc).__name__}: "
            f"{exc}); {look}, and that the Dask operator runs: `kubectl get pods -A -l "
            "app.kubernetes.io/name=dask-kubernetes-operator`."
        ) from exc
    with cluster, Client(cluster) as client:
        try:
            cluster.scale(int(settings.get("workers", 1)))
            client.wait_for_workers(1, timeout=startup)
        except Exception as exc:  # a worker pod that cannot be scheduled or pulled only ever times out
            raise InputError(
                f"no worker of DaskCluster {cluster_id!r} started within {startup:g} s ({type(exc).__name__}: {exc}); "
                f"{look} (GPUs, CPUs or memory no node has? node_selector? tolerations?)."
            ) from exc
        yield client


def _operator() -> Any:
    """``dask_kubernetes.operator``, or :class:`InputError` saying how to install it."""
    try:
        import dask_kubernetes.operator as operator
    except ImportError as exc:
        raise InputError(
            f"cluster kind 'kubernetes' needs dask-kubernetes, which is not installed here: {INSTALL_HINT}."
        ) from exc
    return operator


class _Crd:
    """The DaskCluster CRD of the installed operator: its apiVersion, kind and a validator of ``spec``."""

    def __init__(self, path: Path, document: Mapping[str, Any]) -> None:
        version = next(v for v in document["spec"]["versions"] if v.get("storage", True))
        self.path = path
        self.api_version = f"{document['spec']['group']}/{version['name']}"
        self.kind = str(document["spec"]["names"]["kind"])
        self.lookup = f"{document['spec']['names']['singular']}.{self.api_version}"
        spec_schema = _strict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
        self.validator = jsonschema.Draft7Validator(spec_schema)


@cache
def _crd() -> _Crd:
    operator = _operator()
    path = Path(str(resources.files(operator.__name__).joinpath(_CRD_FILE)))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(
            f"the installed dask-kubernetes has no DaskCluster CRD at {path} ({exc.strerror}); reinstall it: "
            f"{INSTALL_HINT}."
        ) from exc
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 280 kB
    return _Crd(path, yaml.load(text, Loader=loader))


def _strict(schema: Any) -> Any:
    """The CRD schema as JSON Schema: ``x-kubernetes-*`` dropped, and objects with listed properties closed,
    since the API server refuses (``kubectl apply``) or drops unknown fields rather than keep them."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    if "properties" in schema and "additionalProperties" not in schema:
        strict["additionalProperties"] = False
    return strict


def _check_api(namespace: str | None, *, timeout: float) -> str:
    """The namespace to use, once the Kubernetes API answered and knows the DaskCluster kind, within ``timeout`` s."""
    import httpx
    import kr8s.asyncio

    lookup = _crd().lookup
    server: list[str] = []  # known once the API answered

    async def probe() -> str:
        api = await kr8s.asyncio.api(namespace=namespace)  # reads the credentials and asks the server's version
        server.append(str(api.auth.server))
        await api.lookup_kind(lookup)
        return namespace or str(api.namespace)

    kubeconfig = os.environ.get("KUBECONFIG")
    config = f"KUBECONFIG={kubeconfig}" if kubeconfig else "KUBECONFIG unset, so ~/.kube/config"
    try:
        return _in_thread(lambda: asyncio.run(probe()), timeout=timeout, name="kubernetes-api-check")
    except _StillRunningError:
        raise InputError(
            f"the Kubernetes API ({server[0] if server else config}) did not answer within {timeout:g} s; check that "
            "`kubectl version` answers from this machine (VPN? is the cluster up?)."
        ) from None
    except Exception as exc:  # kr8s raises TypeError for an empty kubeconfig, ValueError for none
        detail = f"{type(exc).__name__}: {exc}"
        if server and isinstance(exc, ValueError):
            message = (
                f"the Kubernetes API at {server[0]} has no DaskCluster resource, so the Dask operator is not "
                f"installed; install it ({INSTALL_OPERATOR}), then check `kubectl get crd "
                "daskclusters.kubernetes.dask.org`."
            )
        elif server:
            message = f"the Kubernetes API at {server[0]} refused to list its resources ({detail}); check your access."
        elif isinstance(exc, httpx.TransportError | OSError):
            message = (
                f"cannot reach the Kubernetes API server of {config} ({detail}); check that `kubectl version` "
                "answers from this machine (VPN? is the cluster up?)."
            )
        elif isinstance(exc, kr8s.ServerError):
            message = (
                f"the Kubernetes API server of {config} answered with an error ({detail}); check that "
                "`kubectl version` and `kubectl get pods` work from this machine."
            )
        else:
            message = (
                f"found no usable Kubernetes credentials ({config}; {detail}); check that `kubectl get pods` works "
                "from this machine, or, inside a cluster, that the pod has a service account."
            )
        raise InputError(message) from exc


class _StillRunningError(Exception):
    """A call given to :func:`_in_thread` did not return in time."""


def _in_thread(fn: Callable[[], _T], *, timeout: float, name: str) -> _T:
    """``fn()`` in a daemon thread, waited for at most ``timeout`` s; raises what it raised or _StillRunningError.

    A call that hangs (a server that accepts but never answers, a pod that never starts) is left
    behind instead of holding up the run.
    """
    outcome: list[tuple[_T | None, BaseException | None]] = []

    def run() -> None:
        try:
            outcome.append((fn(), None))
        except BaseException as exc:
            outcome.append((None, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise _StillRunningError(name)
    result, error = outcome.pop()  # popped: the error's frames must not keep the list (and it) alive
    if error is not None:
        raise error
    return result  # type: ignore[return-value]  # None only with an error


def _env_value(value: object) -> str:
    """Kubernetes takes only strings: YAML's ``1`` and ``true`` become "1" and "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quantity(value: object) -> str:
    """A quantity as Kubernetes' CRD takes it, a string: 2 -> "2", 0.5 -> "0.5"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _resources(settings: Mapping[str, Mapping[str, object]], *, gpus: int) -> dict[str, dict[str, str]]:
    given = {
        part: {key: _quantity(value) for key, value in settings.get(part, {}).items()}
        for part in ("requests", "limits")
    }
    if gpus:
        given["limits"][GPU_RESOURCE] = str(gpus)  # extended resources: the request defaults to the limit
    return {part: values for part, values in given.items() if values}


def _volume(volume: Mapping[str, Any], *, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pipeline volume as a pod's volume and its container's volumeMount."""
    if "claim" in volume:
        source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": volume["claim"]}}
    elif "nfs" in volume:
        source = {"nfs": {"server": volume["nfs"]["server"], "path": volume["nfs"]["path"]}}
    else:  # "Directory": a path missing on a node stops the pod, rather than becoming an empty folder there
        source = {"hostPath": {"path": volume["host_path"], "type": "Directory"}}
    mount: dict[str, Any] = {"name": name, "mountPath": volume["mount_path"]}
    if volume.get("sub_path"):
        mount["subPath"] = volume["sub_path"]
    if volume.get("read_only"):
        mount["readOnly"] = True
    return {"name": name, **source}, mount


def _field_path(keys: list[str | int]) -> str:
    """``spec.worker.spec.containers[0].resources.limits['nvidia.com/gpu']``."""
    text = ""
    for key in keys:
        if isinstance(key, int):
            text += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            text += f".{key}" if text else key
        else:
            text += f"[{key!r}]"
    return text
