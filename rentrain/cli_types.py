"""Numeric command-line options: finite, range-checked numbers.

click's FloatRange lets "nan" and "inf" through (every comparison with NaN is false), which silently
disables a budget or a deadline. `Number` refuses them; `setting_type` takes an option's range from the
`[rentrain]` key it overrides (remote/config.py JobSettings), so the file and the command line agree.
A refused value is a usage error: exit code 2, naming the option and the value.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable
from typing import Any

import annotated_types
import click

from remote.config import JobSettings


class Number(click.ParamType[float]):
    """A finite number within [low, high]; `low_open`/`high_open` exclude the bound; `whole` wants an integer."""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
        whole: bool = False,
    ):
        self.low, self.high, self.low_open, self.high_open, self.whole = low, high, low_open, high_open, whole
        self.name = "integer" if whole else "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = self._parse(value, param, ctx)
        if not self._in_range(number):
            self.fail(f"{value!r} is not {self.describe_range()}", param, ctx)
        return number

    def _parse(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number", param, ctx)
        if self.whole:
            if isinstance(value, int):
                return value
            try:
                return int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def _in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or (number < self.high if self.high_open else number <= self.high)

    def describe_range(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"{kind} from {_number(self.low)} to {_number(self.high)}"
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {_number(self.high)}")
        return f"{kind} {' and '.join(parts)}" if parts else kind

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "INTEGER" if self.whole else "NUMBER"

    def __repr__(self) -> str:
        return f"Number({self.describe_range()})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting_type(name: str) -> Number:
    """The option type for overriding the [rentrain] key `name`, with that key's range and kind."""
    field = JobSettings.model_fields[name]
    bounds: dict[str, Any] = {}
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Gt):
            bounds.update(low=rule.gt, low_open=True)
        elif isinstance(rule, annotated_types.Ge):
            bounds.update(low=rule.ge)
        elif isinstance(rule, annotated_types.Lt):
            bounds.update(high=rule.lt, high_open=True)
        elif isinstance(rule, annotated_types.Le):
            bounds.update(high=rule.le)
    whole = field.annotation is int
    return Number(whole=whole, **bounds)


# Timing overrides read from the environment (the tests shorten the job's waits with them), by RunSettings field.
TIMING_ENV = {
    "poll_seconds": "RENTRAIN_POLL_SECONDS",
    "ssh_wait_seconds": "RENTRAIN_SSH_WAIT_SECONDS",
    "ssh_lost_seconds": "RENTRAIN_SSH_LOST_SECONDS",
    "watchdog_poll_seconds": "RENTRAIN_WATCHDOG_POLL_SECONDS",
    "setup_timeout_seconds": "RENTRAIN_SETUP_TIMEOUT_SECONDS",
    "create_window_seconds": "RENTRAIN_CREATE_WINDOW_SECONDS",
}
# Read by providers/http.py, which may not import rentrain: checked here, before any command runs.
HTTP_TIMEOUT_ENV = "RENTRAIN_HTTP_TIMEOUT_SECONDS"


def seconds_from_environment(name: str) -> float | None:
    """A number of seconds above 0 from the environment variable `name`; None when it is unset or empty."""
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise click.UsageError(f"environment variable {name}={value!r} is not a number of seconds above 0")
    return seconds


def timing_overrides() -> dict[str, float]:
    """The RunSettings fields that the environment overrides (TIMING_ENV), each checked."""
    found = {field: seconds_from_environment(name) for field, name in TIMING_ENV.items()}
    return {field: seconds for field, seconds in found.items() if seconds is not None}


def check_timing_environment() -> None:
    """Every timing variable rentrain reads: a bad one is a usage error (exit 2) before anything runs."""
    timing_overrides()
    seconds_from_environment(HTTP_TIMEOUT_ENV)


class ClockTime(click.ParamType[float]):
    """A time to be done by, as unix time: "07:00" (the next 07:00 on this machine's clock) or "2026-12-06 07:00"
    (also with a T). A time that has passed is refused."""

    name = "time"

    def __init__(self, now: Callable[[], float] = time.time):
        self.now = now

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        now = datetime.datetime.fromtimestamp(self.now())
        try:
            if len(text) <= 5:
                clock = datetime.datetime.strptime(text, "%H:%M")
                at = now.replace(hour=clock.hour, minute=clock.minute, second=0, microsecond=0)
                if at <= now:
                    at += datetime.timedelta(days=1)
            else:
                at = datetime.datetime.fromisoformat(text.replace(" ", "T", 1))
        except ValueError:
            self.fail(f"{text!r} is not a time: give HH:MM (the next one) or YYYY-MM-DD HH:MM", param, ctx)
        if at.tzinfo is not None:
            at = at.astimezone().replace(tzinfo=None)
        if at <= now:
            self.fail(f"{text!r} has passed already", param, ctx)
        return at.timestamp()
