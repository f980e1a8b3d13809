"""Vast.ai, REST /api/v0 and, for the instance list, /api/v1. One offer = one host's ask; `id` is what create rents.

Sources: vast-ai/docs `api-reference/openapi/yaml/*.yaml` (search_offers, create_instance, show_instance,
show_instances = the paged v1 list, destroy_instance) and vast-ai/vast-cli `vastai/api/*.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict

from providers.base import (
    HOURS_PER_MONTH,
    LABEL_PREFIX,
    LABEL_VARIABLE,
    AuthError,
    BadRequest,
    HttpCall,
    Instance,
    InstanceStatus,
    InsufficientFunds,
    LaunchSpec,
    NotFound,
    Offer,
    OfferGone,
    ProviderDown,
    ProviderError,
    ProviderInfo,
    Requirements,
    SelfDestructRecipe,
    SshEndpoint,
    split_stop_mark,
    stop_marked_label,
)
from providers.gpu_names import normalise_gpu_name, vast_wire_names
from providers.http import ApiClient, RetryPolicy, parse_model, parse_rows
from remote.watchdog import NOW_VARIABLE

NAME = "vast"
DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
BASE_URL_ENV = "RENTRAIN_VAST_URL"

# What the official CLI sends for `--ssh --direct` (note "direc"): vastai/cli/commands/instances.py::get_runtype
RUNTYPE_SSH_DIRECT = "ssh_direc ssh_proxy"
SEARCH_LIMIT = 64
# GET /api/v1/instances/ pages (show_instances.yaml: "max 25 per page"); a list longer than this many pages is
# refused rather than cut short, since a missing row could be an instance that bills
LIST_PAGE_SIZE = 25
MAX_LIST_PAGES = 400

# Documented minimum intervals (spec `x-rate-limit`), used as the first backoff step after a 429
ENDPOINT_INTERVAL_S = {
    "search": 6.0,  # "10 per minute per IP"
    "create": 4.5,
    "get": 2.0,
    "list": 1.0,  # v1 list: threshold 1.0 (show_instances.yaml)
    "list_v0": 2.0,
    "destroy": 3.0,
    "attach_ssh": 1.0,
    "manage": 1.0,
}

# actual_status -> ours. exited/unknown/offline never become running again (vastai/SKILL.md)
_STATUS: dict[str | None, InstanceStatus] = {
    None: "provisioning",
    "created": "provisioning",
    "loading": "provisioning",
    "rebooting": "provisioning",
    "running": "running",
    "stopped": "stopped",
    "frozen": "stopped",
    "exited": "exited",
    "unknown": "exited",
    "offline": "exited",
}


class VastOffer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    gpu_name: str
    num_gpus: int
    gpu_ram: float  # MB per GPU
    dph_total: float
    reliability: float | None = None
    reliability2: float | None = None
    inet_down: float | None = None  # Mbit/s in practice (the spec says MB/s, the CLI's help Mb/s)
    inet_up: float | None = None
    inet_down_cost: float | None = None  # $/GB received
    inet_up_cost: float | None = None  # $/GB sent
    storage_cost: float | None = None  # $/GB/month
    cuda_max_good: float | None = None
    geolocation: str | None = None
    verification: str | None = None
    min_bid: float | None = None


class VastInstance(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    actual_status: str | None = None
    intended_status: str | None = None
    status_msg: str | None = None
    label: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    public_ipaddr: str | None = None
    ports: dict[str, Any] | list[Any] | None = None
    gpu_name: str | None = None
    dph_total: float | None = None
    start_date: float | None = None
    storage_cost: float | None = None  # $/GB/month
    storage_total_cost: float | None = None  # $/h for this instance's disk
    disk_space: float | None = None  # GB allocated to this instance


class VastInstancePage(BaseModel):
    """One answer of GET /api/v1/instances/ (show_instances.yaml); rows are read as VastInstance later."""

    model_config = ConfigDict(extra="ignore")

    instances: list[Any] = []
    next_token: str | None = None


class VastProvider:
    info = ProviderInfo(name=NAME, display_name="Vast.ai")

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
        policy = policy or RetryPolicy(endpoint_base_delay_s=dict(ENDPOINT_INTERVAL_S))
        session = session or requests.Session()

        def client(base_url: str) -> ApiClient:
            return ApiClient(
                NAME,
                base_url,
                api_key,
                classify=_classify,
                policy=policy,
                session=session,
                key_source=key_source,
                **extra,
            )

        self._api = client(self.base_url)
        self._api_v1 = client(v1_base_url(self.base_url))

    def __repr__(self) -> str:
        return f"VastProvider(base_url={self.base_url!r})"

    # ------------------------------------------------------------------------------------------ offers

    def search(self, requirements: Requirements) -> list[Offer]:
        """Offers that parse; a row that does not is dropped and described in `last_search_skipped`."""
        self.last_search_skipped = []
        offers = self._search(requirements, "on-demand")
        if requirements.include_interruptible:
            offers += self._search(requirements, "bid")
        return offers

    def _search(self, req: Requirements, offer_type: str) -> list[Offer]:
        body = search_query(req, offer_type)
        data = self._api.json("POST", "/bundles/", endpoint="search", idempotent=True, json=body)
        raw = (data or {}).get("offers") or []
        if isinstance(raw, dict):  # the spec's example shows one object; clients read a list
            raw = [raw]
        parsed, skipped = parse_rows(NAME, VastOffer, raw, f"{offer_type} offer")
        self.last_search_skipped += skipped
        return [_offer(item, offer_type == "bid", req.disk_gb) for item in parsed]

    # ------------------------------------------------------------------------------------------ lifecycle

    def create(self, offer: Offer, launch: LaunchSpec) -> Instance:
        body: dict[str, Any] = {
            "client_id": "me",
            "image": launch.image,
            "disk": launch.disk_gb,
            "runtype": RUNTYPE_SSH_DIRECT,
            # the label in the container too: its watchdog writes it back with the stop mark (self_destroy_recipe)
            "env": {**launch.env, LABEL_VARIABLE: launch.label},
            "label": launch.label,
            "cancel_unavail": True,  # a host that cannot start us answers 410 instead of leaving a stopped instance
        }
        if launch.onstart:
            body["onstart"] = launch.onstart
        if offer.interruptible:
            body["price"] = offer.bid_price_per_hour
        data = self._api.json("PUT", f"/asks/{offer.offer_id}/", endpoint="create", idempotent=False, json=body)
        if not isinstance(data, dict) or not data.get("success", True) or "new_contract" not in data:
            raise ProviderError(NAME, f"create answered without an instance id: {_safe_keys(data)}")
        instance_id = str(data["new_contract"])
        try:
            self._api.json(
                "POST",
                f"/instances/{instance_id}/ssh/",
                endpoint="attach_ssh",
                idempotent=False,
                json={"ssh_key": launch.ssh_public_key},
            )
        except ProviderError as exc:
            # an instance we cannot log into only costs money
            try:
                self.destroy(instance_id)
            except ProviderError as cleanup:
                raise type(exc)(
                    NAME, f"{exc.message}; destroying instance {instance_id} failed too: {cleanup.message}", exc.status
                ) from None
            raise
        return Instance(
            provider=NAME,
            id=instance_id,
            label=launch.label,
            status="provisioning",
            price_per_hour=offer.price_per_hour,
            gpu_model=offer.gpu_model,
        )

    def get(self, instance_id: str) -> Instance:
        data = self._api.json(
            "GET", f"/instances/{instance_id}/", endpoint="get", idempotent=True, params={"owner": "me"}
        )
        raw = (data or {}).get("instances")
        if not raw:
            raise NotFound(NAME, f"instance {instance_id} not found", 404)
        return _instance(parse_model(NAME, VastInstance, raw))

    def list_instances(self, label_prefix: str = LABEL_PREFIX) -> list[Instance]:
        """Every page of `GET /api/v1/instances/`; the v0 list only where v1 itself is missing (404).

        v0's list answers 410 `deprecated_endpoint` on a growing share of accounts, so it is never tried first.
        A 404 whose body says `auth_error` is a rejected key (AuthError), not a missing route.
        """
        try:
            rows = self._list_v1()
        except NotFound:
            rows = self._list_v0()
        found = [_instance(parse_model(NAME, VastInstance, item)) for item in rows]
        return [i for i in found if (i.label or "").startswith(label_prefix)]

    def _list_v1(self) -> list[Any]:
        rows: list[Any] = []
        token: str | None = None
        seen: set[str] = set()
        for number in range(1, MAX_LIST_PAGES + 1):
            params: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
            if token:
                params["after_token"] = token
            try:
                data = self._api_v1.json("GET", "/instances/", endpoint="list", idempotent=True, params=params)
            except NotFound as exc:
                if number == 1:
                    raise  # no v1 list here at all
                raise ProviderDown(NAME, f"page {number} of the instance list: {exc.message}", exc.status) from None
            page = parse_model(NAME, VastInstancePage, data or {})
            rows += page.instances
            token = page.next_token or None
            if token is None:
                return rows
            if token in seen:
                raise ProviderDown(NAME, f"the instance list repeated a page token after {len(rows)} instances")
            seen.add(token)
        raise ProviderDown(NAME, f"the instance list did not end after {MAX_LIST_PAGES} pages ({len(rows)} instances)")

    def _list_v0(self) -> list[Any]:
        data = self._api.json("GET", "/instances/", endpoint="list_v0", idempotent=True, params={"owner": "me"})
        return list((data or {}).get("instances") or [])

    def stop(self, instance_id: str) -> None:
        self._api.json(
            "PUT", f"/instances/{instance_id}/", endpoint="manage", idempotent=True, json={"state": "stopped"}
        )

    def start(self, instance_id: str) -> None:
        self._api.json(
            "PUT", f"/instances/{instance_id}/", endpoint="manage", idempotent=True, json={"state": "running"}
        )

    def destroy(self, instance_id: str) -> None:
        self._api.json("DELETE", f"/instances/{instance_id}/", endpoint="destroy", idempotent=True, json={})

    def forget_ssh_key(self, public_key: str) -> None:
        """Nothing to undo: the key was attached to one instance only, and goes with it."""

    def self_destroy_recipe(self) -> SelfDestructRecipe:
        url = f"{self.base_url}/instances/$CONTAINER_ID/"
        auth = {"Authorization": "Bearer $CONTAINER_API_KEY"}
        # Vast's answers say an instance is stopped, not since when, and the watchdog's log is on the stopped disk
        marked = stop_marked_label(f"${LABEL_VARIABLE}", f"${NOW_VARIABLE}")
        return SelfDestructRecipe(
            provider=NAME,
            env_vars=["CONTAINER_ID", "CONTAINER_API_KEY", LABEL_VARIABLE],
            destroy=[HttpCall(method="DELETE", url=url, headers=auth, body="{}")],
            before_stop=[HttpCall(method="PUT", url=url, headers=auth, body=json.dumps({"label": marked}))],
            stop=[HttpCall(method="PUT", url=url, headers=auth, body=json.dumps({"state": "stopped"}))],
            cli_fallback_destroy="vastai destroy instance $CONTAINER_ID --api-key $CONTAINER_API_KEY -y",
            cli_fallback_stop="vastai stop instance $CONTAINER_ID --api-key $CONTAINER_API_KEY",
            notes=(
                "Vast sets CONTAINER_ID and CONTAINER_API_KEY (a key limited to this instance) in the container's "
                "environment but not always in SSH sessions: export them from onstart, e.g. "
                "`env | grep -E '^(CONTAINER_ID|CONTAINER_API_KEY)=' >> /etc/environment`. "
                "A stopped instance still bills its storage: destroy once results are home. Before a stop the "
                f"label becomes `{marked}`: when it stopped, for a client that cannot read the stopped disk."
            ),
        )


def search_query(req: Requirements, offer_type: str = "on-demand") -> dict[str, Any]:
    """The POST /bundles/ body. gpu_ram is MB per GPU on the wire; dph_total includes allocated_storage GB."""
    query: dict[str, Any] = {
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "external": {"eq": False},
        "num_gpus": {"eq": req.gpu_count},
        "gpu_ram": {"gte": round(req.min_vram_gb * 1000)},
        "reliability": {"gte": req.min_reliability},
        "direct_port_count": {"gte": 1},
        "order": [["dph_total", "asc"]],
        "type": offer_type,
        "allocated_storage": req.disk_gb,
        "limit": SEARCH_LIMIT,
    }
    if req.verified_only:
        query["verified"] = {"eq": True}
    if req.min_cuda is not None:
        query["cuda_max_good"] = {"gte": req.min_cuda}
    if req.max_price_per_hour is not None:
        query["dph_total"] = {"lte": req.max_price_per_hour}
    if req.min_download_mbps is not None:
        query["inet_down"] = {"gte": req.min_download_mbps}
    if req.gpu_models:
        query["gpu_name"] = {"in": [wire for model in req.gpu_models for wire in vast_wire_names(model)]}
    return query


def _offer(raw: VastOffer, interruptible: bool, disk_gb: int) -> Offer:
    """One ask as an Offer. `dph_total` already includes the storage of the `allocated_storage` GB we searched
    with (search_query), while the instance runs; `storage_cost` ($/GB/month) x those GB / 730 h is what the
    disk bills in every state but offline, stopped included (guides/instances/pricing.mdx). Bandwidth is
    billed on top, per GB: `inet_down_cost` in, `inet_up_cost` out (search_offers.yaml)."""
    reliability = raw.reliability if raw.reliability is not None else raw.reliability2
    return Offer(
        provider=NAME,
        offer_id=str(raw.id),
        gpu_model=normalise_gpu_name(raw.gpu_name),
        gpu_name_raw=raw.gpu_name,
        gpu_count=raw.num_gpus,
        vram_gb=round(raw.gpu_ram / 1024, 1),  # "24 GB" cards report 24564-24576 MB
        price_per_hour=raw.dph_total,
        reliability=reliability,
        download_mbps=raw.inet_down,
        upload_mbps=raw.inet_up,
        inet_down_usd_per_gb=raw.inet_down_cost,
        inet_up_usd_per_gb=raw.inet_up_cost,
        storage_usd_per_hour=None if raw.storage_cost is None else raw.storage_cost * disk_gb / HOURS_PER_MONTH,
        location=raw.geolocation,
        verified=None if raw.verification is None else raw.verification == "verified",
        max_cuda=raw.cuda_max_good,
        interruptible=interruptible,
        availability="available",
        bid_price_per_hour=raw.min_bid if interruptible else None,
    )


def _instance(raw: VastInstance) -> Instance:
    label, watchdog_stopped_at = split_stop_mark(raw.label)
    return Instance(
        provider=NAME,
        id=str(raw.id),
        label=label,
        watchdog_stopped_at=watchdog_stopped_at,
        status=_STATUS.get(raw.actual_status, "provisioning"),
        provider_status=raw.actual_status,
        status_message=raw.status_msg,
        ssh=_ssh_endpoint(raw),
        price_per_hour=raw.dph_total,
        started_at=datetime.fromtimestamp(raw.start_date, tz=UTC) if raw.start_date else None,
        # when the instance was made: its storage bills from then, its GPU from `running` (vast-cli vastai/SKILL.md)
        billed_since=datetime.fromtimestamp(raw.start_date, tz=UTC) if raw.start_date else None,
        gpu_model=normalise_gpu_name(raw.gpu_name) if raw.gpu_name else None,
        storage_usd_per_hour=_storage_usd_per_hour(raw),
    )


def _storage_usd_per_hour(raw: VastInstance) -> float | None:
    """What the instance's disk bills per hour; Vast bills it in every state but offline, stopped included.

    Vast's own figure `storage_total_cost` ($/h) where the row has it; else `storage_cost` ($/GB/month) x
    `disk_space` (GB allocated to the instance) / 730 h; else None. Sources: vast-ai/docs show_instances.yaml
    (fields), guides/instances/pricing.mdx (storage bills while stopped).
    """
    if raw.storage_total_cost is not None:
        return raw.storage_total_cost
    if raw.storage_cost is not None and raw.disk_space is not None:
        return raw.storage_cost * raw.disk_space / HOURS_PER_MONTH
    return None


def v1_base_url(base_url: str) -> str:
    """`.../api/v0` -> `.../api/v1`: the instance list moved there (show_instances.yaml)."""
    return base_url.rstrip("/").removesuffix("/v0") + "/v1"


def _ssh_endpoint(raw: VastInstance) -> SshEndpoint | None:
    """As the official CLI's ssh-url: the direct 22/tcp mapping if any, else Vast's SSH proxy."""
    if raw.actual_status != "running":
        return None
    if isinstance(raw.ports, dict) and raw.public_ipaddr:
        mappings = raw.ports.get("22/tcp") or []
        if mappings and mappings[0].get("HostPort"):
            return SshEndpoint(host=raw.public_ipaddr.strip(), port=int(mappings[0]["HostPort"]), via="direct")
    if raw.ssh_host and raw.ssh_port:
        return SshEndpoint(host=raw.ssh_host, port=raw.ssh_port, via="proxy")
    return None


def _classify(status: int, message: str, endpoint: str) -> ProviderError:
    lowered = message.lower()
    # a wrong or revoked key may answer 404 with an auth_error body instead of 401, on any endpoint
    if status in (401, 403) or "auth_error" in lowered:
        return AuthError(NAME, message, status)
    if status == 402 or "insufficient" in lowered:  # Vast documents no error shape for an empty balance
        return InsufficientFunds(NAME, message, status)
    if endpoint == "create" and (status in (404, 410) or "no_such_ask" in lowered):
        return OfferGone(NAME, message, status)
    if status == 404:
        return NotFound(NAME, message, status)
    return BadRequest(NAME, message, status)


def _safe_keys(data: Any) -> str:
    # never echo instance_api_key back
    return ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
