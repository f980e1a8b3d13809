"""One HTTP client for every adapter: auth header, bounded retries, per-endpoint pacing, key-free errors.

Retries:
- 429 is retried for every method (the server refused before doing anything). A `Retry-After` header is
  honoured (RunPod sends one); without it (Vast never sends one) the wait grows exponentially from the
  endpoint's documented minimum interval, with jitter. After a 429 the same endpoint is paced for
  later calls too; other endpoints are not slowed.
- 500/502/503/504 and connection errors are retried only for idempotent calls: a create that timed out may
  have rented a machine, and the runner finds it by label instead of renting a second one.
- Everything is bounded: attempts, each wait, and the total wait. Then the error is raised.

Error text from a provider is redacted (the key, `api_key=`, `Bearer ...`) before it is cut to length, so no
part of a key survives a cut. An AuthError names where the key came from (`key_source`), never the key.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import requests
from pydantic import BaseModel, SecretStr, ValidationError

from providers.base import AuthError, ProviderDown, ProviderError, RateLimited

# RunPod: "5xx: retry the same candidate"; Vast's SDK retries 502-504. Only idempotent calls are retried.
RETRYABLE_GATEWAY = frozenset({500, 502, 503, 504})
MAX_MESSAGE_CHARS = 500
MAX_BODY_CHARS = 200  # of a body that should have been JSON
MAX_ROW_ID_CHARS = 80

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# classify(status, message, endpoint) -> the error to raise for a non-2xx answer that is not retried
Classifier = Callable[[int, str, str], ProviderError]


@dataclass
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_total_wait_s: float = 90.0
    max_retry_after_s: float = 120.0  # a longer Retry-After is raised as RateLimited, not slept through
    endpoint_base_delay_s: dict[str, float] = field(default_factory=dict)


class ApiClient:
    def __init__(
        self,
        provider: str,
        base_url: str,
        api_key: str,
        *,
        classify: Classifier,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        timeout_s: float = 30.0,
        key_source: str | None = None,
    ):
        self.provider = provider
        self.key_source = key_source
        self.base_url = base_url.rstrip("/")
        self._key = SecretStr(api_key)
        self._classify = classify
        self.policy = policy or RetryPolicy()
        self._session = session or requests.Session()
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        # RENTRAIN_HTTP_TIMEOUT_SECONDS: for tests of answers that come after the timeout
        self._timeout_s = float(os.environ.get("RENTRAIN_HTTP_TIMEOUT_SECONDS") or timeout_s)
        self._paced_until: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"ApiClient(provider={self.provider!r}, base_url={self.base_url!r})"

    def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        idempotent: bool,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> requests.Response:
        url = self.base_url + path
        waited = 0.0
        for attempt in range(1, self.policy.max_attempts + 1):
            waited += self._wait_for_pace(endpoint)
            try:
                response = self._session.request(
                    method,
                    url,
                    json=json,
                    params=params,
                    headers={"Authorization": f"Bearer {self._key.get_secret_value()}", "Accept": "application/json"},
                    timeout=self._timeout_s,
                    allow_redirects=False,  # a redirect to another host must not carry the key along
                )
            except requests.RequestException as exc:
                message = self.redact_and_cut(f"could not reach {self.base_url}: {_describe(exc)}")
                if (
                    not idempotent
                    or attempt == self.policy.max_attempts
                    or not self._schedule_retry(endpoint, attempt, waited, None)
                ):
                    raise ProviderDown(self.provider, message) from None
                continue

            status = response.status_code
            if status < 300:
                return response
            message = self.redact_and_cut(extract_message(response))
            if status == 429:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is not None and retry_after > self.policy.max_retry_after_s:
                    raise RateLimited(self.provider, message, 429, retry_after)
                if attempt == self.policy.max_attempts or not self._schedule_retry(
                    endpoint, attempt, waited, retry_after
                ):
                    # the next call to this endpoint, whoever makes it, still keeps its distance
                    self._paced_until[endpoint] = self._clock() + self._delay(endpoint, attempt, retry_after)
                    raise RateLimited(self.provider, f"{message} (gave up after {attempt} tries)", 429, retry_after)
                continue
            if (
                status in RETRYABLE_GATEWAY
                and idempotent
                and attempt < self.policy.max_attempts
                and self._schedule_retry(
                    endpoint, attempt, waited, parse_retry_after(response.headers.get("Retry-After"))
                )
            ):
                continue
            if status >= 500:
                raise ProviderDown(self.provider, message, status)
            raise self._named_key_source(self._classify(status, message, endpoint))
        raise AssertionError("unreachable")  # pragma: no cover

    def json(self, method: str, path: str, *, endpoint: str, idempotent: bool, **kwargs: Any) -> Any:
        response = self.request(method, path, endpoint=endpoint, idempotent=idempotent, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            body = self.redact_and_cut(response.text, MAX_BODY_CHARS)
            raise ProviderDown(self.provider, f"expected JSON from {path}, got: {body}") from None

    def redact(self, text: str) -> str:
        key = self._key.get_secret_value()
        if key:
            text = text.replace(key, "***")
        text = re.sub(r"(api_key=)[^&\s\"']+", r"\1***", text, flags=re.IGNORECASE)
        return re.sub(r"(Bearer\s+)[^\s\"',}]+", r"\1***", text, flags=re.IGNORECASE)

    def redact_and_cut(self, text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
        """Redact first: a cut made before redacting could leave a key's first characters unmatched."""
        return self.redact(text)[:limit]

    def _named_key_source(self, error: ProviderError) -> ProviderError:
        if isinstance(error, AuthError) and self.key_source and error.key_source is None:
            return AuthError(error.provider, error.message, error.status, key_source=self.key_source)
        return error

    def _wait_for_pace(self, endpoint: str) -> float:
        until = self._paced_until.get(endpoint)
        if until is None:
            return 0.0
        remaining = until - self._clock()
        if remaining > 0:
            self._sleep(remaining)
            return remaining
        return 0.0

    def _schedule_retry(self, endpoint: str, attempt: int, waited: float, retry_after: float | None) -> bool:
        """Set the wait before the next attempt (the attempt sleeps it); False when the wait budget is spent."""
        delay = self._delay(endpoint, attempt, retry_after)
        if waited + delay > self.policy.max_total_wait_s:
            return False
        # the retry, and any other call to this endpoint meanwhile (e.g. the runner's next poll), waits
        self._paced_until[endpoint] = self._clock() + delay
        return True

    def _delay(self, endpoint: str, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.policy.max_retry_after_s)
        base = self.policy.endpoint_base_delay_s.get(endpoint, self.policy.base_delay_s)
        ceiling = min(self.policy.max_delay_s, base * 2.0 ** (attempt - 1))
        return ceiling / 2 + self._jitter() * ceiling / 2


def parse_model(provider: str, model: type[M], data: Any) -> M:
    """Validate an answer; a shape we do not understand is the provider's fault, reported without its values."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(answer)"
        raise ProviderDown(provider, f"unexpected {model.__name__} in the answer: {where}: {first['msg']}") from None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: an integer, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_rows(provider: str, model: type[M], rows: list[Any], what: str) -> tuple[list[M], list[str]]:
    """Validate each row of a list answer on its own: a bad row is dropped and described, the rest are kept.

    The description names the row (position, and its `id` when it has one), the field and the reason, never
    the field's value; each is logged as a warning too.
    """
    parsed: list[M] = []
    skipped: list[str] = []
    for position, row in enumerate(rows, start=1):
        try:
            parsed.append(model.model_validate(row))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(row)"
            reason = f"{what} row {position}{_row_id(row)}: {where}: {first['msg']}"
            log.warning("%s: skipped %s", provider, reason)
            skipped.append(reason)
    return parsed, skipped


def _row_id(row: Any) -> str:
    row_id = row.get("id") if isinstance(row, dict) else None
    return f" (id {str(row_id)[:MAX_ROW_ID_CHARS]})" if isinstance(row_id, (str, int)) else ""


def extract_message(response: requests.Response) -> str:
    """The provider's own words from an error body: Vast's msg/error, RFC 9457 title/detail, or the text.

    Not cut to length: the caller redacts secrets first, then cuts (`ApiClient.redact_and_cut`).
    """
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text or response.reason or f"HTTP {response.status_code}"
    if not isinstance(body, dict):
        return str(body)
    parts: list[str] = []
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message") or error.get("code")
    for candidate in (error, body.get("title"), body.get("msg"), body.get("message"), body.get("detail")):
        if isinstance(candidate, str) and candidate and not any(candidate in p for p in parts):
            parts.append(candidate)
    text = ": ".join(parts)
    details = body.get("errors")
    if isinstance(details, list) and details:
        listed = "; ".join(
            str(item.get("detail") or item.get("message") or item) if isinstance(item, dict) else str(item)
            for item in details
        )
        text = f"{text} ({listed})" if text else listed
    return text or str(body)


def _describe(exc: requests.RequestException) -> str:
    # str(exc) of a connection error embeds the URL; we put no key in URLs, and redact_and_cut() runs on it anyway
    return f"{type(exc).__name__}: {exc}"
