"""Before renting: can this machine's Hugging Face token read the repos a Flux.1 job downloads?

FLUX.1 [dev] is gated: its files download only for an account that accepted the license on the model page.
One request per repo to the Hub's access check (``/api/models/{repo}/auth-check``, which huggingface_hub's
``HfApi.auth_check`` uses; a plain ``/api/models/{repo}`` answers 200 for a gated repo without access). A public
repo (FLUX.1 [schnell]) answers 200 without a token. The token is sent to huggingface.co only, and never printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import requests
from pydantic import BaseModel

from remote.config import FLUX_PARTS, HUB_ID, TrainConfig, model_source_kind
from remote.fetch_model import sends_hf_token

HUB = "https://huggingface.co"
AUTH_CHECK = HUB + "/api/models/{repo}/auth-check"
TIMEOUT_SECONDS = 15
# https://huggingface.co/<owner>/<repo>/resolve/<revision>/<file>
RESOLVE_PATH = re.compile(r"^/([^/]+)/([^/]+)/resolve/")


class AccessFinding(BaseModel):
    severity: Literal["error", "warning"]
    message: str


def hub_token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` saved (HF_HOME/token, by default ~/.cache/huggingface/token)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    try:
        return (home / "token").read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def hub_repo(reference: str) -> str | None:
    """The Hub repo a model reference downloads from: a hub id, or a huggingface.co .../resolve/... URL."""
    kind = model_source_kind(reference)
    if kind == "hub" and HUB_ID.match(reference):
        return reference
    if kind == "url" and sends_hf_token(reference):
        match = RESOLVE_PATH.match(urlparse(reference).path)
        return f"{match[1]}/{match[2]}" if match else None
    return None


def token_for_download(references: list[str]) -> str | None:
    """This machine's Hugging Face token when the instance downloads any of `references` from a Hugging Face repo
    that an anonymous download cannot read (gated or private; a URL whose repo cannot be told counts as such):
    it then goes to the instance for that download only. None otherwise: a public repo needs no token."""
    token = hub_token()
    if token is None:
        return None
    for reference in filter(None, references):
        kind = model_source_kind(reference)
        if kind == "hub" or (kind == "url" and sends_hf_token(reference)):
            repo = hub_repo(reference)
            if repo is None or not _anonymous_can_read(repo):
                return token
    return None


def _anonymous_can_read(repo: str) -> bool:
    try:
        answer = requests.get(AUTH_CHECK.format(repo=repo), headers={"User-Agent": "rentrain"}, timeout=TIMEOUT_SECONDS)
    except requests.RequestException:
        return False  # unknown: better the download has the token than fails on a rented machine
    return answer.status_code == 200


def flux_repos(train: TrainConfig) -> list[str]:
    """The Hub repos a Flux.1 config downloads from, each once, in the config's order."""
    references = [train.pretrained_model_name_or_path, *(getattr(train, key) for key in FLUX_PARTS)]
    repos = [hub_repo(reference) for reference in references if reference is not None]
    return list(dict.fromkeys(repo for repo in repos if repo is not None))


def check_access(train: TrainConfig) -> list[AccessFinding]:
    """For a Flux.1 config, whether each Hub repo it downloads from can be read with this machine's token."""
    if not train.is_flux:
        return []
    token = hub_token()
    return [finding for repo in flux_repos(train) if (finding := _repo_access(repo, token)) is not None]


def _repo_access(repo: str, token: str | None) -> AccessFinding | None:
    headers = {"User-Agent": "rentrain"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = requests.get(AUTH_CHECK.format(repo=repo), headers=headers, timeout=TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        return AccessFinding(
            severity="warning",
            message=f"could not ask huggingface.co whether {repo} can be downloaded ({type(exc).__name__}); "
            "the instance's download will tell",
        )
    if response.status_code == 200:
        return None
    page = f"{HUB}/{repo}"
    accept = f'open {page}, log in and press "Agree and access repository" to accept its license'
    if response.status_code == 401 and not token:
        message = (
            f"{repo} is gated or private and no Hugging Face token was found: {accept}, then create a read token "
            f"at {HUB}/settings/tokens and set HF_TOKEN (or run `hf auth login`)"
        )
    elif response.status_code == 401:
        message = f"{repo}: the Hugging Face token (HF_TOKEN or `hf auth login`) was refused; is it still valid?"
    elif response.status_code == 403:
        message = f"{repo} is gated and this token's account has no access yet: {accept}"
    elif response.status_code == 404:
        message = f"{repo} does not exist on huggingface.co (or is private to another account)"
    else:
        return AccessFinding(
            severity="warning",
            message=f"huggingface.co answered {response.status_code} when asked about {repo}; not checked",
        )
    return AccessFinding(severity="error", message=message)
