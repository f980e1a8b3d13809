"""What every GPU market adapter offers the rest of rentrain: offers, instances, typed errors.

Prices are USD per hour for the whole machine (all GPUs, plus the disk we will ask for); VRAM is GB
per GPU; reliability is 0..1, or None when the provider publishes none. Nothing here waits: the job
runner polls `get`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from remote.watchdog import NOW_VARIABLE

LABEL_PREFIX = "rentrain-"
# The instance's own label, in its environment from create on, for its watchdog's stop mark (`stop_marked_label`)
LABEL_VARIABLE = "RENTRAIN_LABEL"
STOP_MARK = "|stopped@"
# a label, the stop mark and a Unix time (9 or 10 digits of seconds, 1973 to 2286; up to 3 decimals), nothing else
_STOP_MARKED = re.compile(r"(?P<label>[^|]{1,256})" + re.escape(STOP_MARK) + r"(?P<at>[1-9][0-9]{8,9}(\.[0-9]{1,3})?)")
HOURS_PER_MONTH = 730  # storage is priced per GB per month: 365 x 24 / 12 hours

InstanceStatus = Literal["provisioning", "running", "stopped", "exited", "gone"]


# ---------------------------------------------------------------------------------------------- errors


class ProviderError(Exception):
    """A provider said no, or could not be reached. `message` is the provider's own text, key-free."""

    def __init__(self, provider: str, message: str, status: int | None = None):
        self.provider = provider
        self.message = message
        self.status = status
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.provider} (HTTP {self.status})" if self.status else self.provider
        return f"{where}: {self.message}"


class AuthError(ProviderError):
    """The API key is missing, wrong, revoked, or lacks a permission.

    `key_source` names where the key came from (an environment variable, a file), never the key; with it the
    message reads "vast rejected the API key from <source> (HTTP 404): <the provider's words>".
    """

    def __init__(self, provider: str, message: str, status: int | None = None, key_source: str | None = None):
        self.key_source = key_source
        if key_source:
            http = f" (HTTP {status})" if status else ""
            message = f"{provider} rejected the API key from {key_source}{http}: {message}"
        super().__init__(provider, message, status)

    def _describe(self) -> str:
        return self.message if self.key_source else super()._describe()


class OfferGone(ProviderError):
    """The offer was taken or withdrawn between search and create: try the next one."""


class NoCapacity(ProviderError):
    """The provider has no machine for this request right now: try the next offer."""


class RateLimited(ProviderError):
    """Too many requests, still refused after bounded retries."""

    def __init__(self, provider: str, message: str, status: int | None = 429, retry_after: float | None = None):
        super().__init__(provider, message, status)
        self.retry_after = retry_after


class InsufficientFunds(ProviderError):
    """The account balance is too low to rent: stop, do not try other offers."""


class ProviderDown(ProviderError):
    """Server errors, timeouts, refused connections."""


class NotFound(ProviderError):
    """No such instance (already destroyed, or never ours)."""


class Unsupported(ProviderError):
    """The provider cannot do this at all; the message says why and what to use instead."""


class BadRequest(ProviderError):
    """The provider rejected the request as malformed or not allowed now; retrying the same call cannot help."""


# ---------------------------------------------------------------------------------------------- data


class Requirements(BaseModel):
    """What an offer must satisfy. Checks on a field the provider does not publish pass (unknown is not 'bad').
    The caller states every filter the user can set: their defaults are the config's `[rentrain]` table's."""

    gpu_count: int = Field(ge=1)
    min_vram_gb: float = Field(gt=0)
    min_reliability: float = Field(ge=0, le=1)
    min_cuda: float | None
    verified_only: bool
    include_interruptible: bool
    max_price_per_hour: float | None = Field(gt=0)
    gpu_models: list[str] = Field(description="Normalised names; empty means any.")
    disk_gb: int = Field(ge=8, description="Disk we will create; every price includes it.")
    min_download_mbps: float | None = None


class Offer(BaseModel):
    model_config = ConfigDict(frozen=True)

    provider: str
    offer_id: str
    gpu_model: str = Field(description='Normalised across providers, e.g. "RTX 4090".')
    gpu_name_raw: str = Field(description="What the provider calls it (sent back on create).")
    gpu_count: int
    vram_gb: float = Field(description="Per GPU.")
    price_per_hour: float = Field(description="USD/h, whole machine, including the disk we will ask for.")
    reliability: float | None = None
    download_mbps: float | None = None
    upload_mbps: float | None = None
    inet_down_usd_per_gb: float | None = Field(
        None, description="What the provider bills per GB the instance receives (Vast `inet_down_cost`)."
    )
    inet_up_usd_per_gb: float | None = Field(
        None, description="What the provider bills per GB the instance sends (Vast `inet_up_cost`)."
    )
    storage_usd_per_hour: float | None = Field(
        None,
        description="USD/h the disk we ask for bills while the instance exists, stopped included; already part "
        "of price_per_hour while it runs. None when the provider does not say.",
    )
    location: str | None = None
    verified: bool | None = None
    max_cuda: float | None = None
    interruptible: bool = False
    availability: str | None = Field(None, description="Provider's stock level when it has one (RunPod: NONE..HIGH).")
    cloud: str | None = Field(None, description="RunPod: COMMUNITY or SECURE.")
    bid_price_per_hour: float | None = Field(None, description="Vast bid offers: the current minimum bid.")


class SshEndpoint(BaseModel):
    host: str
    port: int
    user: str = "root"
    via: Literal["direct", "proxy"] = "direct"

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}"


class Instance(BaseModel):
    provider: str
    id: str
    label: str | None
    status: InstanceStatus
    provider_status: str | None = Field(None, description="The provider's own word for the state.")
    status_message: str | None = None
    ssh: SshEndpoint | None = Field(None, description="An endpoint that allows scp/rsync; None until there is one.")
    price_per_hour: float | None = None
    started_at: datetime | None = None
    billed_since: datetime | None = Field(
        None,
        description="When the provider made the instance and began billing it, in its own answer (Vast "
        "`start_date`, RunPod `createdAt`); None when the answer does not say.",
    )
    gpu_model: str | None = None
    storage_usd_per_hour: float | None = Field(
        None,
        description="USD/h its storage bills in its current state (all a stopped instance bills); None when the "
        "provider does not say. Each adapter's `_storage_usd_per_hour` gives its rule.",
    )
    watchdog_stopped_at: datetime | None = Field(
        None,
        description="When its watchdog last stopped it, by the stop mark the watchdog put on its label "
        "(`split_stop_mark`); None where there is none. Provider text: check it against the instance's times.",
    )


def stop_marked_label(label: str, at: str) -> str:
    """`label` with the stop mark: `rentrain-JOB|stopped@1765000000.123`; `at` is a Unix time, or a `$VARIABLE`."""
    return f"{label}{STOP_MARK}{at}"


def split_stop_mark(label: str | None) -> tuple[str | None, datetime | None]:
    """(the label without its stop mark, the mark's time) for a label that ends in a well-formed stop mark;
    (the label as it is, None) for any other text."""
    marked = _STOP_MARKED.fullmatch(label or "")
    if marked is None:
        return label, None
    return marked["label"], datetime.fromtimestamp(float(marked["at"]), tz=UTC)


class LaunchSpec(BaseModel):
    """Everything `create` needs besides the offer."""

    job_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    image: str
    disk_gb: int = Field(ge=8)
    ssh_public_key: str = Field(min_length=16)
    env: dict[str, str] = Field(default_factory=dict)
    onstart: str | None = Field(None, description="Shell run at boot, where the provider supports it.")
    min_cuda: float | None = Field(
        None, description="Lowest host CUDA version, where placement is the provider's (RunPod)."
    )

    @property
    def label(self) -> str:
        return f"{LABEL_PREFIX}{self.job_id}"


class HttpCall(BaseModel):
    """One HTTP request, written with shell `$VARS` the instance has; no secret values, only their names."""

    method: str
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None

    def curl(self) -> str:
        """A shell command; the `$VARS` expand on the instance, so no secret is ever written down."""
        parts = ["curl", "-fsS", "--max-time", "30", "-X", self.method]
        for name, value in self.headers.items():
            parts += ["-H", _double_quoted(f"{name}: {value}")]
        if self.body is not None:
            parts += ["-H", _double_quoted("Content-Type: application/json"), "--data", _double_quoted(self.body)]
        parts.append(_double_quoted(self.url))
        return " ".join(parts)


def _double_quoted(text: str) -> str:
    """Shell double quotes: $VARS expand, nothing else does."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'


class SelfDestructRecipe(BaseModel):
    """How code running ON the instance ends (or stops) its own instance with the credentials it was given.

    Try the calls in order until one succeeds; `cli_fallback` is a last resort.
    """

    provider: str
    env_vars: list[str] = Field(description="Variables the instance must see (export them for SSH sessions too).")
    destroy: list[HttpCall]
    stop: list[HttpCall]
    before_stop: list[HttpCall] = Field(
        default_factory=list,
        description="Made once each, in order, before the stop calls, whatever their outcome: they publish when the "
        f"watchdog stopped the instance (`${NOW_VARIABLE}`) where a client can read it without starting it.",
    )
    cli_fallback_destroy: str | None = None
    cli_fallback_stop: str | None = None
    notes: str = ""


class ProviderInfo(BaseModel):
    name: str
    display_name: str
    can_search: bool = True
    can_provision: bool = True
    runs_onstart: bool = Field(True, description="LaunchSpec.onstart is honoured at boot.")
    unavailable_reason: str | None = None
    unavailable_summary: str | None = Field(None, description="A few words of the reason, for a table cell.")


# ---------------------------------------------------------------------------------------------- protocol


@runtime_checkable
class Provider(Protocol):
    info: ProviderInfo

    def search(self, requirements: Requirements) -> list[Offer]: ...

    def create(self, offer: Offer, launch: LaunchSpec) -> Instance: ...

    def get(self, instance_id: str) -> Instance: ...

    def list_instances(self, label_prefix: str = LABEL_PREFIX) -> list[Instance]: ...

    def stop(self, instance_id: str) -> None: ...

    def start(self, instance_id: str) -> None:
        """Start a stopped instance again (to fetch results the watchdog kept by stopping it)."""
        ...

    def destroy(self, instance_id: str) -> None: ...

    def forget_ssh_key(self, public_key: str) -> None:
        """Undo what `create` registered on the account for this key (no-op where nothing was registered)."""
        ...

    def self_destroy_recipe(self) -> SelfDestructRecipe: ...


@runtime_checkable
class ReportsSkippedRows(Protocol):
    """A provider whose `search` drops answer rows it cannot read instead of failing as a whole.

    `last_search_skipped` holds one line per row the last `search` dropped (which row, which field, why),
    for the caller to count and show; the adapter logs them too.
    """

    last_search_skipped: list[str]
