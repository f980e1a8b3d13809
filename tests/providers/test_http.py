"""The shared HTTP client: bounded retries, per-endpoint pacing, key-free errors."""

from __future__ import annotations

import pytest
import requests
import responses

from providers.base import AuthError, BadRequest, ProviderDown, ProviderError, RateLimited
from providers.http import MAX_BODY_CHARS, MAX_MESSAGE_CHARS, ApiClient, RetryPolicy, extract_message, parse_retry_after

from .conftest import FakeClock

KEY = "k3y-SECRET-abcdef123456"
URL = "https://api.test"


def client(clock: FakeClock, **policy) -> ApiClient:
    return ApiClient(
        "testprov",
        URL,
        KEY,
        classify=lambda status, message, endpoint: BadRequest("testprov", message, status),
        policy=RetryPolicy(**policy),
        sleep=clock.sleep,
        clock=clock,
        jitter=lambda: 1.0,  # the top of each jitter range, so waits are exact
    )


def test_backoff_grows_per_attempt_from_the_endpoint_interval(mocked, clock):
    api = client(clock, endpoint_base_delay_s={"slow": 4.0}, max_attempts=4)
    for _ in range(3):
        mocked.add(responses.GET, f"{URL}/x", status=429, body="API requests too frequent")
    mocked.add(responses.GET, f"{URL}/x", json={"ok": True})
    assert api.json("GET", "/x", endpoint="slow", idempotent=True) == {"ok": True}
    assert clock.sleeps == [4.0, 8.0, 16.0]


def test_jitter_spreads_waits_inside_the_range(mocked, clock):
    api = ApiClient(
        "p",
        URL,
        KEY,
        classify=lambda s, m, e: BadRequest("p", m, s),
        sleep=clock.sleep,
        clock=clock,
        jitter=lambda: 0.0,
        policy=RetryPolicy(base_delay_s=2.0),
    )
    mocked.add(responses.GET, f"{URL}/x", status=429, body="too frequent")
    mocked.add(responses.GET, f"{URL}/x", json={})
    api.json("GET", "/x", endpoint="e", idempotent=True)
    assert clock.sleeps == [1.0]  # half the ceiling at jitter 0


def test_each_wait_and_the_total_are_capped(mocked, clock):
    api = client(clock, base_delay_s=10.0, max_delay_s=15.0, max_total_wait_s=40.0, max_attempts=10)
    mocked.add(responses.GET, f"{URL}/x", status=429, body="too frequent")
    with pytest.raises(RateLimited, match="gave up"):
        api.json("GET", "/x", endpoint="e", idempotent=True)
    assert clock.sleeps == [10.0, 15.0, 15.0]
    assert sum(clock.sleeps) <= 40.0


def test_a_429_paces_later_calls_to_the_same_endpoint_only(mocked, clock):
    api = client(clock, base_delay_s=5.0, max_attempts=2)
    mocked.add(responses.GET, f"{URL}/a", status=429, body="too frequent")
    with pytest.raises(RateLimited):
        api.json("GET", "/a", endpoint="a", idempotent=True)
    assert clock.sleeps == [5.0]
    mocked.add(responses.GET, f"{URL}/b", json={})
    api.json("GET", "/b", endpoint="b", idempotent=True)
    assert clock.sleeps == [5.0]  # another endpoint is not slowed down
    mocked.replace(responses.GET, f"{URL}/a", json={})
    api.json("GET", "/a", endpoint="a", idempotent=True)
    assert clock.sleeps == [5.0, 10.0]  # the next call to /a keeps the grown distance


def test_connection_errors_retry_idempotent_calls_only(mocked, clock):
    api = client(clock, max_attempts=3)
    mocked.add(responses.GET, f"{URL}/x", body=requests.ConnectionError("connection refused"))
    mocked.add(responses.GET, f"{URL}/x", json={"ok": 1})
    assert api.json("GET", "/x", endpoint="e", idempotent=True) == {"ok": 1}
    mocked.add(responses.POST, f"{URL}/create", body=requests.Timeout("read timed out"))
    with pytest.raises(ProviderDown, match="Timeout"):
        api.json("POST", "/create", endpoint="create", idempotent=False)
    assert sum(1 for c in mocked.calls if c.request.method == "POST") == 1


def test_non_retryable_status_goes_to_the_classifier(mocked, clock):
    api = client(clock)
    mocked.add(
        responses.GET, f"{URL}/x", status=400, json={"success": False, "error": "invalid_args", "msg": "bad field"}
    )
    with pytest.raises(BadRequest, match="invalid_args: bad field"):
        api.json("GET", "/x", endpoint="e", idempotent=True)
    assert clock.sleeps == []


def test_key_never_appears_in_errors_even_when_the_server_echoes_it(mocked, clock):
    api = client(clock, max_attempts=1)
    mocked.add(
        responses.GET,
        f"{URL}/x",
        status=400,
        json={"msg": f"bad key {KEY} from https://x/?api_key={KEY}&y=1 with header Authorization: Bearer {KEY}"},
    )
    with pytest.raises(BadRequest) as caught:
        api.json("GET", "/x", endpoint="e", idempotent=True)
    text = str(caught.value) + repr(caught.value) + caught.value.message
    assert KEY not in text
    assert "api_key=***" in text and "Bearer ***" in text
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_key_never_appears_in_connection_errors(mocked, clock):
    api = client(clock, max_attempts=1)
    mocked.add(
        responses.GET, f"{URL}/x", body=requests.ConnectionError(f"failed GET {URL}/x?api_key={KEY} Bearer {KEY}")
    )
    with pytest.raises(ProviderDown) as caught:
        api.json("GET", "/x", endpoint="e", idempotent=True)
    assert KEY not in str(caught.value)
    assert caught.value.__suppress_context__ is True  # the requests exception (with its request) is not chained


def test_repr_does_not_show_the_key(clock):
    assert KEY not in repr(client(clock))


def test_redirects_are_not_followed(mocked, clock):
    """Following a redirect could hand the Authorization header to another host."""
    api = client(clock)
    mocked.add(responses.GET, f"{URL}/x", status=302, headers={"Location": "https://elsewhere.test/x"})
    with pytest.raises(BadRequest):
        api.json("GET", "/x", endpoint="e", idempotent=True)
    assert len(mocked.calls) == 1


def test_parse_retry_after():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_extract_message_shapes(mocked):
    cases = [
        ({"title": "Bad Request", "status": 400, "detail": "no capacity"}, "Bad Request: no capacity"),
        ({"success": False, "error": "not_found", "msg": "Instance not found"}, "not_found: Instance not found"),
        (
            {"title": "Unprocessable Entity", "errors": [{"detail": "a"}, {"message": "b"}]},
            "Unprocessable Entity (a; b)",
        ),
        (
            {"detail": "API requests too frequent endpoint threshold=4.5"},
            "API requests too frequent endpoint threshold=4.5",
        ),
        ({"error": {"message": "Invalid API key", "type": "auth", "code": "invalid_api_key"}}, "Invalid API key"),
    ]
    for payload, expected in cases:
        mocked.add(responses.GET, f"{URL}/m", json=payload)
        response = requests.get(f"{URL}/m")
        assert extract_message(response) == expected
    mocked.add(responses.GET, f"{URL}/t", body="API requests too frequent", status=429)
    assert extract_message(requests.get(f"{URL}/t")) == "API requests too frequent"


def test_a_key_cut_by_the_length_limit_is_still_redacted(mocked, clock):
    """The key straddles the 500-character cut: redacting after the cut would leave its first characters."""
    api = client(clock, max_attempts=1)
    message = "x" * (MAX_MESSAGE_CHARS - 10) + KEY + " and more"
    mocked.add(responses.GET, f"{URL}/x", status=400, json={"msg": message})
    with pytest.raises(BadRequest) as caught:
        api.json("GET", "/x", endpoint="e", idempotent=True)
    assert KEY[:10] not in caught.value.message
    assert "x*** and" in caught.value.message
    assert len(caught.value.message) <= MAX_MESSAGE_CHARS


def test_a_non_json_body_is_redacted_before_it_is_cut(mocked, clock):
    api = client(clock)
    mocked.add(responses.GET, f"{URL}/x", body="y" * (MAX_BODY_CHARS - 6) + KEY)
    with pytest.raises(ProviderDown) as caught:
        api.json("GET", "/x", endpoint="e", idempotent=True)
    assert KEY[:6] not in str(caught.value) and "y***" in str(caught.value)


def test_a_connection_error_is_redacted_before_it_is_cut(mocked, clock):
    api = client(clock, max_attempts=1)
    mocked.add(responses.GET, f"{URL}/x", body=requests.ConnectionError("z" * 190 + KEY))
    with pytest.raises(ProviderDown) as caught:
        api.json("GET", "/x", endpoint="e", idempotent=True)
    assert KEY[:6] not in str(caught.value)


def test_an_auth_error_names_the_key_source_and_other_errors_do_not_change(mocked, clock):
    def classify(status: int, message: str, endpoint: str) -> ProviderError:
        return AuthError("p", message, status) if status == 401 else BadRequest("p", message, status)

    api = ApiClient(
        "p", URL, KEY, classify=classify, sleep=clock.sleep, clock=clock, key_source="the environment variable P_KEY"
    )
    mocked.add(responses.GET, f"{URL}/a", status=401, json={"detail": "invalid key"})
    mocked.add(responses.GET, f"{URL}/b", status=400, json={"detail": "bad field"})
    with pytest.raises(AuthError) as caught:
        api.json("GET", "/a", endpoint="e", idempotent=True)
    assert str(caught.value) == "p rejected the API key from the environment variable P_KEY (HTTP 401): invalid key"
    assert caught.value.key_source == "the environment variable P_KEY"
    with pytest.raises(BadRequest) as other:
        api.json("GET", "/b", endpoint="e", idempotent=True)
    assert str(other.value) == "p (HTTP 400): bad field"
