"""GPUFlow (PROVIDERS.md §3). Its current documentation gives renters no provisioning API, no SSH and no
shell: a rental is an API key for a hosted chat model (OpenAI-compatible /v1/models and
/v1/chat/completions), and searching, renting, extending and ending happen only in the web UI.

So this adapter does not pretend. `search` and every lifecycle call raise Unsupported with the reason,
`offers` shows GPUFlow as a row that says why, and the job runner refuses `--provider gpuflow` up front
(see REFUSAL). If GPUFlow publishes a renter API, this file is where it goes.
"""

from __future__ import annotations

from providers.base import (
    LABEL_PREFIX,
    Instance,
    LaunchSpec,
    Offer,
    ProviderInfo,
    Requirements,
    SelfDestructRecipe,
    Unsupported,
)

NAME = "gpuflow"
MARKETPLACE_URL = "https://gpuflow.app/en/marketplace"

REASON = (
    "GPUFlow has no renter API, SSH or shell: a rental there is an API key for a chat model the host "
    "already runs, and renting happens only in its web UI"
)

REFUSAL = (
    "rentrain cannot train on GPUFlow. GPUFlow's current documentation gives renters no API to rent or end "
    "a machine, and no SSH or shell access: a GPUFlow rental is an API key for a chat model that the host "
    f"already runs (OpenAI-compatible, inference only), and renting happens only in the web UI at {MARKETPLACE_URL}.\n"
    "If you rented a machine by hand elsewhere and can reach it over SSH, run it there with:\n"
    "  rentrain run CONFIG --provider ssh --host user@host[:port]"
)


class GpuFlowProvider:
    info = ProviderInfo(
        name=NAME,
        display_name="GPUFlow",
        can_search=False,
        can_provision=False,
        runs_onstart=False,
        unavailable_reason=REASON,
        unavailable_summary="no renter API or SSH",
    )

    def __init__(self, api_key: str | None = None, base_url: str | None = None):
        """GPUFlow needs no key here: there is nothing to call."""

    def __repr__(self) -> str:
        return "GpuFlowProvider()"

    def search(self, requirements: Requirements) -> list[Offer]:
        raise Unsupported(NAME, REASON)

    def create(self, offer: Offer, launch: LaunchSpec) -> Instance:
        raise Unsupported(NAME, REFUSAL)

    def get(self, instance_id: str) -> Instance:
        raise Unsupported(NAME, REFUSAL)

    def list_instances(self, label_prefix: str = LABEL_PREFIX) -> list[Instance]:
        return []  # rentrain can never have started one

    def stop(self, instance_id: str) -> None:
        raise Unsupported(NAME, REFUSAL)

    def start(self, instance_id: str) -> None:
        raise Unsupported(NAME, REFUSAL)

    def destroy(self, instance_id: str) -> None:
        raise Unsupported(NAME, REFUSAL)

    def forget_ssh_key(self, public_key: str) -> None:
        """Nothing was registered."""

    def self_destroy_recipe(self) -> SelfDestructRecipe:
        raise Unsupported(NAME, REFUSAL)
