"""RunPod, REST v2 (runpod/docs `api-reference-v2/openapi.json`). v1 is retired; GraphQL (retiring early 2027) is
only the in-pod self-destroy fallback.

RunPod has no offer marketplace: the catalog gives one list price per GPU type per cloud (COMMUNITY,
SECURE) and a stock level; the scheduler picks the host. So one Offer per GPU type per cloud, and no
per-host reliability (shown as unknown, never invented).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict, field_validator

from providers.base import (
    HOURS_PER_MONTH,
    LABEL_PREFIX,
    AuthError,
    BadRequest,
    HttpCall,
    Instance,
    InstanceStatus,
    InsufficientFunds,
    LaunchSpec,
    NoCapacity,
    NotFound,
    Offer,
    OfferGone,
    ProviderError,
    ProviderInfo,
    Requirements,
    SelfDestructRecipe,
    SshEndpoint,
    Unsupported,
)
from providers.gpu_names import normalise_gpu_name
from providers.http import ApiClient, RetryPolicy, parse_model, parse_rows

NAME = "runpod"
DEFAULT_BASE_URL = "https://api.runpod.io"
BASE_URL_ENV = "RENTRAIN_RUNPOD_URL"
CLOUDS = ("COMMUNITY", "SECURE")

# $/GB/month (runpod/docs pods/pricing.mdx): container disk while running (a stopped pod's is erased, not billed);
# the volume while running, and twice that while stopped
CONTAINER_DISK_USD_PER_GB_MONTH = 0.10
VOLUME_USD_PER_GB_MONTH = 0.10
STOPPED_VOLUME_USD_PER_GB_MONTH = 0.20
VOLUME_PATH = "/workspace"
MIN_VOLUME_GB = 10  # PersistentMount.size minimum (api-reference-v2/openapi.json)

_STATUS: dict[str, InstanceStatus] = {
    "PROVISIONING": "provisioning",
    "STARTING": "provisioning",
    "RUNNING": "running",
    "EXITED": "stopped",
    "ERROR": "exited",
    "TERMINATED": "gone",
}


class CudaVersion(BaseModel):
    """Schema CudaVersionAvailability: `available` is false when every machine on this version is full."""

    model_config = ConfigDict(extra="ignore")

    version: str
    available: bool


class CatalogGpu(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    name: str | None = None
    memory: float
    secure: bool = True
    community: bool = True
    price: dict[str, float | None] = {}
    maxCount: dict[str, int | None] = {}
    availability: str | None = None
    dataCenters: list[dict[str, Any]] = []
    # schema GpuType: objects {"version": "12.4", "available": true}; missing means none. Older answers listed
    # bare version strings, read as available.
    cudaVersions: list[CudaVersion] = []

    @field_validator("cudaVersions", mode="before")
    @classmethod
    def _bare_versions_are_available(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):
            return [{"version": str(v), "available": True} if isinstance(v, (str, int, float)) else v for v in value]
        return value


class PodSshDirect(BaseModel):
    model_config = ConfigDict(extra="ignore")
    host: str
    port: int
    username: str = "root"


class Pod(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    name: str | None = None
    status: str
    cost: float | None = None
    gpu: dict[str, Any] | None = None
    ssh: dict[str, Any] | None = None
    createdAt: datetime | None = None
    startedAt: datetime | None = None  # when the container last started
    disk: int | None = None  # container disk GB
    mounts: dict[str, Any] | None = None


class RunPodProvider:
    info = ProviderInfo(name=NAME, display_name="RunPod", runs_onstart=False)

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] | None = None,
        policy: RetryPolicy | None = None,
        key_source: str | None = None,
    ):
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.last_search_skipped: list[str] = []
        extra: dict[str, Any] = {k: v for k, v in (("sleep", sleep), ("clock", clock)) if v is not None}
        self._api = ApiClient(
            NAME,
            self.base_url,
            api_key,
            classify=_classify,
            policy=policy,
            session=session,
            key_source=key_source,
            **extra,
        )

    def __repr__(self) -> str:
        return f"RunPodProvider(base_url={self.base_url!r})"

    # ------------------------------------------------------------------------------------------ offers

    def search(self, requirements: Requirements) -> list[Offer]:
        """Catalog rows that parse; a row that does not is dropped and described in `last_search_skipped`."""
        self.last_search_skipped = []
        offers: list[Offer] = []
        for cloud in CLOUDS:
            params: dict[str, Any] = {
                "include": "AVAILABILITY",
                "product": "POD",
                "cloud": cloud,
                "count": requirements.gpu_count,
            }
            if requirements.min_cuda is not None:
                params["minCudaVersion"] = _cuda(requirements.min_cuda)
            data = self._api.json("GET", "/v2/catalog/gpus", endpoint="catalog", idempotent=True, params=params)
            gpus, skipped = parse_rows(NAME, CatalogGpu, (data or {}).get("gpus") or [], f"{cloud} catalog")
            self.last_search_skipped += skipped
            offers += [offer for gpu in gpus if (offer := _offer(gpu, cloud, requirements)) is not None]
        return offers

    # ------------------------------------------------------------------------------------------ lifecycle

    def create(self, offer: Offer, launch: LaunchSpec) -> Instance:
        if launch.onstart:
            raise Unsupported(
                NAME,
                "RunPod v2 has no boot hook that keeps the image's own start script (which starts sshd); "
                "start the watchdog over SSH instead",
            )
        if offer.cloud not in CLOUDS:
            raise BadRequest(NAME, f"offer {offer.offer_id} is not a RunPod catalog offer")
        self._register_ssh_key(launch.ssh_public_key)
        gpu: dict[str, Any] = {"id": offer.gpu_name_raw, "count": offer.gpu_count}
        if launch.min_cuda is not None:
            gpu["minCudaVersion"] = _cuda(launch.min_cuda)  # the scheduler picks the host, so it must know
        body = {
            "name": launch.label,
            "image": launch.image,
            "gpu": gpu,
            "cloud": offer.cloud,
            "disk": launch.disk_gb,
            # the job's folder lives on a volume: a stopped pod erases its container disk but keeps this
            "mounts": {"persistent": {"size": _volume_gb(launch.disk_gb), "path": VOLUME_PATH}},
            "ports": ["22/tcp"],
            "startSsh": True,
            # both names: the v2 spec says PUBLIC_KEY, use-ssh.mdx says SSH_PUBLIC_KEY
            "env": {**launch.env, "PUBLIC_KEY": launch.ssh_public_key, "SSH_PUBLIC_KEY": launch.ssh_public_key},
        }
        data = self._api.json("POST", "/v2/pods", endpoint="create", idempotent=False, json=body)
        pod = parse_model(NAME, Pod, data)
        created = pod.model_copy(update={"disk": pod.disk or launch.disk_gb, "mounts": pod.mounts or body["mounts"]})
        return _instance(created)

    def get(self, instance_id: str) -> Instance:
        data = self._api.json("GET", f"/v2/pods/{instance_id}", endpoint="get", idempotent=True)
        return _instance(parse_model(NAME, Pod, data))

    def list_instances(self, label_prefix: str = LABEL_PREFIX) -> list[Instance]:
        data = self._api.json("GET", "/v2/pods", endpoint="list", idempotent=True)
        pods = [_instance(parse_model(NAME, Pod, item)) for item in (data or {}).get("pods") or []]
        return [p for p in pods if (p.label or "").startswith(label_prefix)]

    def stop(self, instance_id: str) -> None:
        self._api.json(
            "POST", f"/v2/pods/{instance_id}/action", endpoint="action", idempotent=True, json={"action": "stop"}
        )

    def start(self, instance_id: str) -> None:
        self._api.json(
            "POST", f"/v2/pods/{instance_id}/action", endpoint="action", idempotent=True, json={"action": "start"}
        )

    def destroy(self, instance_id: str) -> None:
        self._api.json("DELETE", f"/v2/pods/{instance_id}", endpoint="destroy", idempotent=True)

    # ------------------------------------------------------------------------------------------ ssh keys

    def account_ssh_keys(self) -> list[str]:
        data = self._api.json("GET", "/v2/account/ssh-keys", endpoint="ssh_keys", idempotent=True)
        return list((data or {}).get("keys") or [])

    def _register_ssh_key(self, public_key: str) -> None:
        """PUT replaces the whole set: read, add ours, write back everything that was there."""
        keys = self.account_ssh_keys()
        if any(_same_key(k, public_key) for k in keys):
            return
        self._write_keys([*keys, public_key.strip()])

    def forget_ssh_key(self, public_key: str) -> None:
        keys = self.account_ssh_keys()
        kept = [k for k in keys if not _same_key(k, public_key)]
        if len(kept) != len(keys):
            self._write_keys(kept)

    def _write_keys(self, keys: list[str]) -> None:
        self._api.json("PUT", "/v2/account/ssh-keys", endpoint="ssh_keys", idempotent=True, json={"keys": keys})

    # ------------------------------------------------------------------------------------------ in-pod

    def self_destroy_recipe(self) -> SelfDestructRecipe:
        """No `before_stop`: the v2 pod answer says neither when a pod stopped nor has a field documented as
        writable by a PATCH from inside the pod, so a stop nobody saw is placed at rentrain's last sight of it
        running until the watchdog's log on the volume is read (docs/costs.md, "What the ledger counts")."""
        auth = {"Authorization": "Bearer $RUNPOD_API_KEY"}
        pod_url = f"{self.base_url}/v2/pods/$RUNPOD_POD_ID"
        graphql = f"{self.base_url}/graphql"
        terminate = json.dumps({"query": 'mutation { podTerminate(input:{podId:"$RUNPOD_POD_ID"}) }'})
        stop = json.dumps({"query": 'mutation { podStop(input:{podId:"$RUNPOD_POD_ID"}) { id desiredStatus } }'})
        return SelfDestructRecipe(
            provider=NAME,
            env_vars=["RUNPOD_POD_ID", "RUNPOD_API_KEY"],
            destroy=[
                HttpCall(method="DELETE", url=pod_url, headers=auth),
                HttpCall(method="POST", url=graphql, headers=auth, body=terminate),
            ],
            stop=[
                HttpCall(method="POST", url=f"{pod_url}/action", headers=auth, body=json.dumps({"action": "stop"})),
                HttpCall(method="POST", url=graphql, headers=auth, body=stop),
            ],
            cli_fallback_destroy="runpodctl remove pod $RUNPOD_POD_ID",
            cli_fallback_stop="runpodctl stop pod $RUNPOD_POD_ID",
            notes=(
                "RUNPOD_API_KEY inside a pod is pod-scoped; whether v2 accepts it is not documented, hence the "
                "GraphQL fallback (retires early 2027) and then the preinstalled runpodctl. Minimal images need "
                "ca-certificates for TLS. A finished main process restarts the pod rather than stopping it: "
                "end it explicitly."
            ),
        )


def _offer(gpu: CatalogGpu, cloud: str, req: Requirements) -> Offer | None:
    key = cloud.lower()
    in_cloud = gpu.community if cloud == "COMMUNITY" else gpu.secure
    per_gpu = gpu.price.get(key)
    max_count = gpu.maxCount.get(key)
    if not in_cloud or not per_gpu or (max_count is not None and max_count < req.gpu_count):
        return None
    # What our create asks for (create): a container disk and a volume of disk_gb each (the volume at least
    # MIN_VOLUME_GB). Running, both bill inside the price; stopped, the volume alone at twice the rate.
    volume_gb = _volume_gb(req.disk_gb)
    disk_per_hour = (
        req.disk_gb * CONTAINER_DISK_USD_PER_GB_MONTH + volume_gb * VOLUME_USD_PER_GB_MONTH
    ) / HOURS_PER_MONTH
    return Offer(
        provider=NAME,
        offer_id=f"{cloud}/{gpu.id}",
        gpu_model=normalise_gpu_name(gpu.name or gpu.id),
        gpu_name_raw=gpu.id,
        gpu_count=req.gpu_count,
        vram_gb=gpu.memory,
        price_per_hour=round(per_gpu * req.gpu_count + disk_per_hour, 4),
        reliability=None,
        download_mbps=None,
        inet_down_usd_per_gb=0.0,  # no ingress or egress fees (pods/pricing.mdx)
        inet_up_usd_per_gb=0.0,
        storage_usd_per_hour=volume_gb * STOPPED_VOLUME_USD_PER_GB_MONTH / HOURS_PER_MONTH,
        location=_locations(gpu.dataCenters),
        verified=None,
        max_cuda=_max_cuda(gpu.cudaVersions),
        interruptible=False,
        availability=gpu.availability,
        cloud=cloud,
    )


def _locations(data_centers: list[dict[str, Any]]) -> str | None:
    names = [dc.get("id") or dc.get("name") for dc in data_centers if dc.get("availability", "NONE") != "NONE"]
    names = [n for n in names if n]
    if not names:
        return None
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"


def _max_cuda(versions: list[CudaVersion]) -> float | None:
    """The newest CUDA version with free capacity now; None when none is listed or available (unknown)."""
    parsed: list[tuple[int, int]] = []
    for cuda in versions:
        major, _, minor = cuda.version.strip().partition(".")
        if cuda.available and major.isdigit() and (minor or "0").isdigit():
            parsed.append((int(major), int(minor or "0")))
    if not parsed:
        return None
    newest = max(parsed)  # as numbers: 12.10 is newer than 12.9
    return float(f"{newest[0]}.{newest[1]}")


def _volume_gb(disk_gb: int) -> int:
    return max(MIN_VOLUME_GB, disk_gb)


def _instance(pod: Pod) -> Instance:
    direct = (pod.ssh or {}).get("direct")
    ssh = None
    if direct:
        endpoint = parse_model(NAME, PodSshDirect, direct)
        ssh = SshEndpoint(host=endpoint.host, port=endpoint.port, user=endpoint.username, via="direct")
    gpu_id = (pod.gpu or {}).get("id")
    return Instance(
        provider=NAME,
        id=pod.id,
        label=pod.name,
        status=_STATUS.get(pod.status, "provisioning"),
        provider_status=pod.status,
        # the proxy (ssh.runpod.io) is an interactive shell only: no scp/rsync, so it is not offered here
        ssh=ssh,
        price_per_hour=pod.cost,
        started_at=pod.startedAt,
        billed_since=pod.createdAt,
        gpu_model=normalise_gpu_name(gpu_id) if gpu_id else None,
        storage_usd_per_hour=_storage_usd_per_hour(pod),
    )


def _storage_usd_per_hour(pod: Pod) -> float | None:
    """What the pod's storage bills per hour in its state now (runpod/docs pods/pricing.mdx).

    Stopped (EXITED): the volume at $0.20/GB/month; the container disk is erased and not billed. Running or
    starting: container disk and volume at $0.10/GB/month each. Terminated: nothing. Sizes come from the pod
    (`disk`, `mounts.persistent.size`), or on create from what we asked for; a network volume bills on its own,
    not here. None when the answer gives no size to go by.
    """
    status = _STATUS.get(pod.status, "provisioning")
    if status == "gone":
        return 0.0
    volume_gb = _persistent_volume_gb(pod.mounts)
    if status == "stopped":
        return None if volume_gb is None else volume_gb * STOPPED_VOLUME_USD_PER_GB_MONTH / HOURS_PER_MONTH
    if volume_gb is None or pod.disk is None:
        return None
    return (pod.disk * CONTAINER_DISK_USD_PER_GB_MONTH + volume_gb * VOLUME_USD_PER_GB_MONTH) / HOURS_PER_MONTH


def _persistent_volume_gb(mounts: dict[str, Any] | None) -> float | None:
    """GB of the pod's own volume: 0 when its mounts have none, None when the answer has no mounts at all."""
    if mounts is None:
        return None
    persistent = mounts.get("persistent")
    size = persistent.get("size") if isinstance(persistent, dict) else 0
    return float(size) if isinstance(size, (int, float)) else None


def _cuda(version: float) -> str:
    return f"{version:.1f}"  # "12.1", as the catalog lists CUDA versions


def _same_key(a: str, b: str) -> bool:
    """Same key type and body; the trailing comment does not matter."""
    return a.split()[:2] == b.split()[:2]


def _classify(status: int, message: str, endpoint: str) -> ProviderError:
    if status == 401:
        return AuthError(NAME, message, status)
    if status == 402:
        return InsufficientFunds(NAME, message, status)
    if status == 403:
        # on create: "pool not accessible", skip this candidate; elsewhere: a key without the permission
        return OfferGone(NAME, message, status) if endpoint == "create" else AuthError(NAME, message, status)
    if status == 404:
        return NotFound(NAME, message, status)
    if status == 400 and endpoint == "create":
        # a rule violation or no capacity; RunPod gives capacity no machine-readable code
        return NoCapacity(NAME, message, status)
    return BadRequest(NAME, message, status)
