"""A local GPU market for end-to-end tests: HTTP on 127.0.0.1 speaking the Vast (REST v0, and v1 for the
instance list) and RunPod (REST v2) shapes, whose instances are real sshd processes on loopback ports.

It answers as the services do today (vast-ai/docs api-reference/openapi/yaml/show_instances.yaml, runpod/docs
api-reference-v2/openapi.json): Vast's v0 instance list answers 410 `deprecated_endpoint` (unless
`vast_v0_instance_list`, an account not yet migrated) and `GET /api/v1/instances/` pages 25 rows with
`next_token`/`after_token`; a wrong Vast key answers reads with 404 `auth_error`, writes with 401; RunPod's
catalog lists `cudaVersions` as `{"version", "available"}` objects.

Reach it through the adapters' base-URL overrides:
    RENTRAIN_VAST_URL   = <base>/vast/api/v0   (the adapter derives <base>/vast/api/v1)
    RENTRAIN_RUNPOD_URL = <base>/runpod

Billing is by the second from create to destroy, at the instance's price in every state but stopped (a dead
host's too, until destroyed), and `storage_per_hour` while stopped; a RunPod pod bills as RunPod's pricing page
says: its GPU plus its disk and volume while running, its volume while stopped. Instances carry the times the
services give: Vast `start_date` (when it was made), RunPod `createdAt` and `startedAt` (when its container last
started). Faults are
switched on per test: offers that are gone at create, hosts whose SSH never comes up, 429 and 5xx storms,
a host that dies mid-run, and answers that come after the client's timeout.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.sim.sshd import SshdInstance

VAST_KEY = "sim-vast-account-key"
RUNPOD_KEY = "sim-runpod-account-key"
VAST_V1_PAGE_SIZE = 25  # show_instances.yaml: "Default 25, max 25. Values <= 0 are treated as 5."
VAST_V0_LIST_GONE = {
    "success": False,
    "error": "deprecated_endpoint",
    "msg": "/api/v0/instances/ is deprecated. Use /api/v1/instances/ instead.",
}
VAST_AUTH_ERROR = {"success": False, "error": "auth_error", "msg": "Invalid user key"}
VAST_LABEL_MAX = 1024
# runpod/docs pods/pricing.mdx: running, the container disk and the volume at $0.10/GB/month each; stopped, the
# volume at $0.20/GB/month (the container disk is erased)
RUNPOD_DISK_USD_PER_GB_MONTH_RUNNING = 0.10
RUNPOD_VOLUME_USD_PER_GB_MONTH_STOPPED = 0.20
RUNPOD_DEFAULT_DISK_GB = 20
HOURS_PER_MONTH = 730


@dataclass
class SimOffer:
    provider: str  # "vast" or "runpod"
    offer_id: str  # vast: ask id; runpod: the GPU type id
    gpu_name: str
    price_per_hour: float
    vram_gb: float = 24
    reliability: float = 0.995
    inet_down: float = 800.0
    inet_up: float = 600.0
    inet_down_cost: float = 0.002  # $/GB, as Vast offers carry it
    inet_up_cost: float = 0.005
    storage_cost: float = 0.15  # $/GB/month
    gone: bool = False  # create answers "no such ask" / no capacity
    never_reachable: bool = False  # the instance runs but sshd never comes up


@dataclass
class SimInstance:
    id: str
    provider: str
    offer: SimOffer
    label: str
    price_per_hour: float
    created_at: float
    instance_key: str
    sshd: SshdInstance
    state: str = "loading"  # loading, running, stopped, exited, destroyed
    booted_at: float | None = None  # when its container last started (RunPod `startedAt`)
    disk_gb: int | None = None  # RunPod: the pod's container disk and volume; None on Vast
    volume_gb: int | None = None
    ended_at: float | None = None
    stopped: list[tuple[float, float | None]] = field(default_factory=list)  # (stopped at, started again at)

    def billed_cost(self, storage_per_hour: float, now: float | None = None) -> float:
        """Full price while it exists, storage only while stopped: `storage_per_hour`, or a pod's volume."""
        if self.volume_gb is not None:
            storage_per_hour = self.volume_gb * RUNPOD_VOLUME_USD_PER_GB_MONTH_STOPPED / HOURS_PER_MONTH
        end = self.ended_at if self.ended_at is not None else (now if now is not None else time.time())
        stopped = sum((restart if restart is not None else end) - since for since, restart in self.stopped)
        total = max(0.0, end - self.created_at)
        return ((total - stopped) * self.price_per_hour + stopped * storage_per_hour) / 3600


class ProviderSimulator:
    def __init__(
        self,
        root: Path,
        offers: list[SimOffer],
        instance_env: dict[str, str] | None = None,
        boot_seconds: float = 0.3,
        storage_per_hour: float = 0.01,
        vast_v0_instance_list: bool = False,  # True: an account the v0 list still answers (not yet migrated)
    ):
        self.root = root
        self.vast_v0_instance_list = vast_v0_instance_list
        self.offers = {(o.provider, o.offer_id): o for o in offers}
        self.instance_env = instance_env or {}
        self.boot_seconds = boot_seconds
        self.storage_per_hour = storage_per_hour
        self.instances: dict[str, SimInstance] = {}
        self.runpod_account_keys: list[str] = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUsersOwnKey user@laptop"]
        self.requests: list[tuple[str, str]] = []
        self.storm: list[int] = []  # status codes to answer the next requests with (429, 500, ...)
        # (method, path regex, status, act_first): the next matching request answers `status`; with
        # act_first the request is carried out before the error is returned (a gateway timing out late)
        self.faults: list[tuple[str, str, int, bool]] = []
        # (method, path regex, act_after, answer_after): the next matching request is carried out
        # `act_after` seconds after it arrives and answered `answer_after` seconds after it arrived (a create
        # that the provider finishes after the client's HTTP timeout)
        self.late_answers: list[tuple[str, str, float, float]] = []
        self._lock = threading.RLock()
        self._next_id = 1000
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle of the simulator

    def start(self) -> str:
        simulator = self

        class Handler(BaseHTTPRequestHandler):
            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                status, payload, headers = simulator.handle(
                    self.command, self.path, self.headers.get("Authorization", ""), body
                )
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def vast_url(self) -> str:
        return f"{self.base_url}/vast/api/v0"

    @property
    def runpod_url(self) -> str:
        return f"{self.base_url}/runpod"

    def shutdown(self) -> None:
        for instance in list(self.instances.values()):
            instance.sshd.kill()
        if self._server is not None:
            self._server.shutdown()

    # ------------------------------------------------------------------ what tests look at

    def live_instances(self, provider: str | None = None) -> list[SimInstance]:
        """Instances not destroyed; with `provider`, only that account's (each market sees its own)."""
        return [
            i
            for i in self.instances.values()
            if i.state not in ("destroyed",) and (provider is None or i.provider == provider)
        ]

    def _own(self, provider: str, instance_id: str | None) -> SimInstance | None:
        instance = self.instances.get(instance_id or "")
        return instance if instance is not None and instance.provider == provider else None

    def total_billed(self) -> float:
        return sum(i.billed_cost(self.storage_per_hour) for i in self.instances.values())

    def create_orphan(self, provider: str, label: str, boot: bool = False) -> SimInstance:
        """An instance created directly through the provider's API, as another client (or a rentrain that died
        before writing its ledger) would: no ledger knows it, it bills from now. Without `boot` its sshd never
        starts (cheap enough to make dozens); with it, it comes up like a rented one."""
        with self._lock:
            offer = next((o for (p, _), o in self.offers.items() if p == provider and not o.gone), None)
            if offer is None:
                raise ValueError(f"the simulator has no {provider} offer to create an orphan from")
            return self._create(provider, replace(offer, never_reachable=not boot), label, {})

    def kill_host(self, instance_id: str) -> None:
        """The host dies mid-run: every process on it ends, SSH is gone, the provider says exited."""
        with self._lock:
            instance = self.instances[instance_id]
            instance.state = "exited"
        instance.sshd.kill()

    # ------------------------------------------------------------------ HTTP

    def handle(self, method: str, path: str, auth: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        late = self._take_late_answer(method, path)
        if late is not None:  # sleeps outside the lock: the simulator answers other requests meanwhile
            act_after, answer_after = late
            time.sleep(act_after)
            answer = self.handle(method, path, auth, body)
            time.sleep(max(0.0, answer_after - act_after))
            return answer
        with self._lock:
            self.requests.append((method, path))
            if self.storm:
                status = self.storm.pop(0)
                headers = {"Retry-After": "0"} if status == 429 and path.startswith("/runpod") else {}
                return status, {"detail": "API requests too frequent"} if status == 429 else {"error": "down"}, headers
            route = path.split("?", 1)[0]
            for fault in self.faults:
                fault_method, pattern, status, act_first = fault
                if fault_method == method and re.search(pattern, route):
                    self.faults.remove(fault)
                    if act_first:
                        self.handle(method, path, auth, body)
                        self.requests.pop()
                    return status, {"error": "bad gateway"}, {}
            if route.startswith("/vast/api/v1"):
                return self._vast_v1(method, route[len("/vast/api/v1") :], auth, parse_qs(urlsplit(path).query))
            if route.startswith("/vast/api/v0"):
                return self._vast(method, route[len("/vast/api/v0") :], auth, body)
            if route.startswith("/runpod"):
                return self._runpod(method, route[len("/runpod") :], auth, body)
            return 404, {"error": "no such route"}, {}

    def _take_late_answer(self, method: str, path: str) -> tuple[float, float] | None:
        with self._lock:
            route = path.split("?", 1)[0]
            for late in self.late_answers:
                late_method, pattern, act_after, answer_after = late
                if late_method == method and re.search(pattern, route):
                    self.late_answers.remove(late)
                    return act_after, answer_after
        return None

    def _authorised(self, auth: str, account_key: str, instance_id: str | None = None) -> bool:
        token = auth.removeprefix("Bearer ").strip()
        if token == account_key:
            return True
        instance = self.instances.get(instance_id or "")
        return instance is not None and token == instance.instance_key

    # ------------------------------------------------------------------ Vast

    def _vast(self, method: str, route: str, auth: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        match = re.fullmatch(r"/instances/(\d+)/(ssh/)?", route)
        instance_id = match.group(1) if match else None
        if not self._authorised(auth, VAST_KEY, instance_id):
            return (404 if method == "GET" else 401), VAST_AUTH_ERROR, {}
        if method == "POST" and route == "/bundles/":
            offers = [self._vast_offer(o) for (p, _), o in self.offers.items() if p == "vast"]
            return 200, {"offers": offers}, {}
        ask = re.fullmatch(r"/asks/(\w+)/", route)
        if method == "PUT" and ask:
            offer = self.offers.get(("vast", ask.group(1)))
            if offer is None or offer.gone:
                return 404, {"success": False, "error": "no_such_ask", "msg": "Instance type no longer available."}, {}
            instance = self._create("vast", offer, body.get("label") or "", body.get("env") or {})
            return (
                200,
                {"success": True, "new_contract": int(instance.id), "instance_api_key": instance.instance_key},
                {},
            )
        if method == "GET" and route == "/instances/":
            if not self.vast_v0_instance_list:
                return 410, VAST_V0_LIST_GONE, {}
            return 200, {"instances": [self._vast_instance(i) for i in self.live_instances("vast")]}, {}
        if instance_id is None:
            return 404, {"success": False, "error": "not_found", "msg": route}, {}
        instance = self._own("vast", instance_id)
        if instance is None or instance.state == "destroyed":
            if method == "GET":
                return 200, {"instances": None}, {}
            return 404, {"success": False, "error": "no_such_instance", "msg": f"instance {instance_id}"}, {}
        if method == "POST" and match and match.group(2):
            instance.sshd.authorized_key = body["ssh_key"]
            self._write_keys(instance)
            return 200, {"success": True, "msg": "SSH key attached successfully"}, {}
        if method == "GET":
            return 200, {"instances": self._vast_instance(instance)}, {}
        if method == "PUT" and body and "label" in body:  # manage_instance.yaml: a label of 1024 chars at most
            if not isinstance(body["label"], str) or len(body["label"]) > VAST_LABEL_MAX:
                return 400, {"success": False, "error": "invalid_args", "msg": "label: at most 1024 chars"}, {}
            instance.label = body["label"]
            return 200, {"success": True}, {}
        if method == "PUT" and body and body.get("state") == "stopped":
            self._stop(instance)
            return 200, {"success": True}, {}
        if method == "PUT" and body and body.get("state") == "running":
            self._start(instance)
            return 200, {"success": True}, {}
        if method == "DELETE":
            self._destroy(instance)
            return 200, {"success": True}, {}
        return 400, {"success": False, "error": "invalid_args", "msg": "unsupported"}, {}

    def _vast_v1(
        self, method: str, route: str, auth: str, query: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        """GET /api/v1/instances/: keyset pages by id, at most 25 rows, `next_token` null on the last page."""
        if not self._authorised(auth, VAST_KEY):
            return 404, VAST_AUTH_ERROR, {}
        if method != "GET" or route != "/instances/":
            return 404, {"success": False, "error": "not_found", "msg": route}, {}
        limit = int((query.get("limit") or [VAST_V1_PAGE_SIZE])[0])
        limit = min(VAST_V1_PAGE_SIZE, limit) if limit > 0 else 5
        token = (query.get("after_token") or [""])[0]
        try:
            after = json.loads(base64.b64decode(token))["values"]["id"] if token else 0
        except (ValueError, KeyError, TypeError, binascii.Error):
            return 400, {"error": "invalid_token", "msg": "after_token cannot be decoded"}, {}
        rows = sorted(self.live_instances("vast"), key=lambda i: int(i.id))
        later = [i for i in rows if int(i.id) > after]
        page = later[:limit]
        more = len(later) > limit
        last = {"values": {"id": int(page[-1].id)}} if more else None
        next_token = base64.b64encode(json.dumps(last).encode()).decode() if last else None
        labels: dict[str, int] = {}
        for instance in rows:
            labels[instance.label] = labels.get(instance.label, 0) + 1
        return (
            200,
            {
                "success": True,
                "instances_found": len(page),
                "total_instances": len(rows),
                "label_counts": labels,
                "next_token": next_token,
                "instances": [self._vast_instance(i) for i in page],
            },
            {},
        )

    def _vast_offer(self, offer: SimOffer) -> dict[str, Any]:
        return {
            "id": int(offer.offer_id),
            "ask_contract_id": int(offer.offer_id),
            "machine_id": int(offer.offer_id) * 10,
            "gpu_name": offer.gpu_name,
            "num_gpus": 1,
            "gpu_ram": offer.vram_gb * 1024,
            "dph_total": offer.price_per_hour,
            "reliability": offer.reliability,
            "reliability2": offer.reliability,
            "inet_down": offer.inet_down,
            "inet_up": offer.inet_up,
            "inet_down_cost": offer.inet_down_cost,
            "inet_up_cost": offer.inet_up_cost,
            "storage_cost": offer.storage_cost,
            "cuda_max_good": 12.4,
            "geolocation": "Loopback, LO",
            "verification": "verified",
            "direct_port_count": 4,
            "disk_space": 100,
        }

    def _vast_instance(self, instance: SimInstance) -> dict[str, Any]:
        status = {"loading": "loading", "running": "running", "stopped": "stopped", "exited": "exited"}[instance.state]
        running = instance.state == "running"
        contract = "stopped" if instance.state == "stopped" else "running"
        return {
            "id": int(instance.id),
            "label": instance.label,
            "actual_status": status,
            "intended_status": contract,
            "cur_state": contract,
            "next_state": contract,
            "status_msg": None,
            "public_ipaddr": "127.0.0.1" if running else None,
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(instance.sshd.port)}]} if running else {},
            "ssh_host": None,
            "ssh_port": None,
            "dph_total": instance.price_per_hour,
            "start_date": instance.created_at,  # unix seconds, when the instance was made
            "gpu_name": instance.offer.gpu_name,
            "storage_total_cost": self.storage_per_hour,  # $/h, billed in every state
        }

    # ------------------------------------------------------------------ RunPod

    def _runpod(self, method: str, route: str, auth: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        match = re.fullmatch(r"/v2/pods/(\w+)(/action)?", route)
        pod_id = match.group(1) if match else None
        if not self._authorised(auth, RUNPOD_KEY, pod_id):
            return 401, {"title": "Unauthorized", "status": 401, "detail": "invalid api key"}, {}
        if method == "GET" and route == "/v2/catalog/gpus":
            gpus = [self._runpod_gpu(o) for (p, _), o in self.offers.items() if p == "runpod"]
            return 200, {"gpus": gpus}, {}
        if route == "/v2/account/ssh-keys":
            if method == "PUT":
                self.runpod_account_keys = list(body["keys"])
            return 200, {"keys": self.runpod_account_keys}, {}
        if method == "POST" and route == "/v2/pods":
            offer = self.offers.get(("runpod", body["gpu"]["id"]))
            if offer is None or offer.gone:
                return 400, {"title": "Bad Request", "status": 400, "detail": "There are no instances available"}, {}
            env = body.get("env") or {}
            instance = self._create("runpod", offer, body.get("name") or "", env, body)
            instance.sshd.authorized_key = env.get("PUBLIC_KEY", "")
            self._write_keys(instance)
            return 201, self._pod(instance), {}
        if method == "GET" and route == "/v2/pods":
            return 200, {"pods": [self._pod(i) for i in self.live_instances("runpod")]}, {}
        instance = self._own("runpod", pod_id)
        if instance is None or instance.state == "destroyed":
            return 404, {"title": "Not Found", "status": 404, "detail": f"pod {pod_id} not found"}, {}
        if method == "GET":
            return 200, self._pod(instance), {}
        if method == "POST" and match and match.group(2):
            if body.get("action") == "stop":
                self._stop(instance)
                return 200, self._pod(instance), {}
            if body.get("action") == "start":
                self._start(instance)
                return 200, self._pod(instance), {}
            if body.get("action") == "terminate":
                self._destroy(instance)
                return 204, None, {}
        if method == "DELETE":
            self._destroy(instance)
            return 204, None, {}
        return 422, {"title": "Unprocessable", "status": 422, "detail": "unsupported"}, {}

    def _runpod_gpu(self, offer: SimOffer) -> dict[str, Any]:
        return {
            "id": offer.offer_id,
            "name": offer.gpu_name,
            "memory": offer.vram_gb,
            "secure": False,
            "community": True,
            "price": {"community": offer.price_per_hour, "secure": None},
            "maxCount": {"community": 4, "secure": 0},
            "availability": "HIGH",
            "dataCenters": [{"id": "LO-1", "name": "Loopback", "availability": "HIGH"}],
            "cudaVersions": [{"version": "12.4", "available": True}, {"version": "12.8", "available": False}],
        }

    def _pod(self, instance: SimInstance) -> dict[str, Any]:
        status = {"loading": "STARTING", "running": "RUNNING", "stopped": "EXITED", "exited": "ERROR"}[instance.state]
        running = instance.state == "running"
        return {
            "id": instance.id,
            "name": instance.label,
            "status": status,
            # the GPU's price ("0.0 when EXITED or TERMINATED"); the disks bill on top
            "cost": 0 if instance.state == "stopped" else instance.offer.price_per_hour,
            "gpu": {"id": instance.offer.offer_id, "count": 1},
            "disk": instance.disk_gb,
            "mounts": {"persistent": {"size": instance.volume_gb, "path": "/workspace"}},
            "ssh": {"direct": {"host": "127.0.0.1", "port": instance.sshd.port, "username": instance.sshd.user}}
            if running
            else {"direct": None},
            "runtime": {
                "uptime": int(time.time() - (instance.booted_at or instance.created_at)),
                "ports": [{"private": 22, "public": instance.sshd.port, "type": "tcp", "ip": "127.0.0.1"}],
            }
            if running
            else None,
            "createdAt": _rfc3339(instance.created_at),
            "startedAt": _rfc3339(instance.booted_at) if instance.booted_at is not None else None,
        }

    def _runpod_volume_gb(self) -> int:
        """A volume whose stopped price is what this simulator bills a stopped instance (a pod made by hand)."""
        return max(10, round(self.storage_per_hour * HOURS_PER_MONTH / RUNPOD_VOLUME_USD_PER_GB_MONTH_STOPPED))

    # ------------------------------------------------------------------ instances

    def _create(
        self, provider: str, offer: SimOffer, label: str, env: dict[str, str], body: dict[str, Any] | None = None
    ) -> SimInstance:
        self._next_id += 1
        instance_id = str(self._next_id)
        instance_key = f"sim-instance-key-{instance_id}"
        provider_env = (
            {"CONTAINER_ID": instance_id, "CONTAINER_API_KEY": instance_key}
            if provider == "vast"
            else {"RUNPOD_POD_ID": instance_id, "RUNPOD_API_KEY": instance_key}
        )
        asked = env if provider == "vast" else {}  # Vast puts create's `env` in the container
        sshd = SshdInstance(
            self.root / f"{provider}-{instance_id}", "", env={**self.instance_env, **asked, **provider_env}
        )
        instance = SimInstance(
            id=instance_id,
            provider=provider,
            offer=offer,
            label=label,
            price_per_hour=offer.price_per_hour,
            created_at=time.time(),
            instance_key=instance_key,
            sshd=sshd,
        )
        if provider == "runpod":  # the sizes asked for, and the GPU's price with both disks on top
            persistent = ((body or {}).get("mounts") or {}).get("persistent") or {}
            instance.disk_gb = int((body or {}).get("disk") or RUNPOD_DEFAULT_DISK_GB)
            instance.volume_gb = int(persistent.get("size") or self._runpod_volume_gb())
            disks = (instance.disk_gb + instance.volume_gb) * RUNPOD_DISK_USD_PER_GB_MONTH_RUNNING / HOURS_PER_MONTH
            instance.price_per_hour = offer.price_per_hour + disks
        self.instances[instance_id] = instance
        if not offer.never_reachable:
            threading.Timer(self.boot_seconds, self._boot, args=(instance,)).start()
        return instance

    def _boot(self, instance: SimInstance) -> None:
        with self._lock:
            if instance.state != "loading":
                return
            instance.sshd.start()
            instance.state = "running"
            instance.booted_at = time.time()

    def _write_keys(self, instance: SimInstance) -> None:
        instance.sshd.root.mkdir(parents=True, exist_ok=True)
        (instance.sshd.root / "authorized_keys").write_text(instance.sshd.authorized_key + "\n")

    def _stop(self, instance: SimInstance) -> None:
        instance.sshd.kill()
        if instance.state != "stopped":
            instance.stopped.append((time.time(), None))
        instance.state = "stopped"

    def _start(self, instance: SimInstance) -> None:
        if instance.state != "stopped":
            return
        instance.stopped[-1] = (instance.stopped[-1][0], time.time())
        instance.state = "loading"
        threading.Timer(self.boot_seconds, self._boot, args=(instance,)).start()

    def _destroy(self, instance: SimInstance) -> None:
        instance.sshd.kill()
        instance.state = "destroyed"
        instance.ended_at = time.time()


def _rfc3339(at: float) -> str:
    """A RunPod time (api-reference-v2/openapi.json: `date-time`, e.g. "2026-03-13T20:00:00Z"), to the millisecond:
    this simulator bills by the millisecond, and the date-time format allows the fraction."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


def wait_until(predicate: Callable[[], bool], timeout: float = 30, interval: float = 0.1) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
