"""What one job's client measures as it runs, and the ledger's record of it when the job closes (`job_runs`, read
back by rentrain.history and `rentrain costs`).

Phases, in seconds, by this client's clock unless said; one after another on the bill (history.BILLED_PHASES):
- image_pull: the create sent until the instance answers SSH (the provider pulls the image and boots it);
- prepare: SSH answered until the trainer is started: the job's files go up while the instance's setup script
  runs; inside it, as details: upload (all the files sent), bootstrap (the setup script, by the instance's clock)
  and model_download (the base model the instance downloads itself, by its clock);
- trainer_setup, latent_cache, text_cache: the trainer's own clock (its start event): loading the model, encoding
  the images' latents, encoding the captions (when the text encoders are not trained);
- samples: the trainer's sample grids (from its events' times: each grid's event less the event before it);
- training: the trainer started until its last event was read, less the trainer's setup, caches and samples;
  train_extra is what of it the steps at the median step time do not explain (warm-up, saving checkpoints);
- fetch: the result and its state brought home at the end; teardown: destroying instances, confirmed gone;
- other: the billed seconds that no phase above explains (the provider's billing before our create call answered,
  polls, reconnects).
A phase that happened more than once (a lost host, resumed on the next offer) counts each time.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from providers.base import Offer
from remote.config import LoadedConfig
from remote.events import Event, SampleEvent, StartEvent, StepEvent
from rentrain.dataset_check import inspect_dataset
from rentrain.history import BYTES_PER_GB, after_warm_up, settings_key
from rentrain.job_profile import profile_from_check
from rentrain.ledger import InstanceRecord, JobRecord, JobRun, Ledger

log = logging.getLogger(__name__)

# The phases whose seconds the trainer's clock measures inside the client's "training" phase
INSIDE_TRAINING = ("trainer_setup", "latent_cache", "text_cache", "samples")
# The client's own spans, one after another: with the trainer's phases above they cover what it saw billed
CLIENT_SPANS = ("image_pull", "prepare", "training", "fetch", "teardown", *INSIDE_TRAINING)


class JobMeter:
    """One client's measurements of one job: phase seconds, bytes moved, step times after warm-up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes_up = 0
        self.model_download_bytes = 0
        self.bytes_fetched: Callable[[], int] = lambda: 0  # set by the job's fetcher
        self.offers: dict[str, Offer] = {}  # the offers the job may rent, by offer id: their $/GB
        self.step_seconds: dict[int, float] = {}  # step -> its seconds, past warm-up only; a re-read step replaces
        self.steps_seen: set[int] = set()  # every step whose event this client read, warm-up included
        self._resumed_from_step = 0  # of the trainer start whose steps come in now (0 until a start is seen)
        self._last_event_time: float | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the block's seconds (by this client's clock) to the phase, whether it ends well or not."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] += time.monotonic() - started

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += max(0.0, seconds)

    def saw_event(self, event: Event) -> None:
        """One of the trainer's events, as the client reads it; one older than the last seen was read before (a
        client re-reading the events from their start)."""
        if self._last_event_time is not None and event.time < self._last_event_time:
            return
        if isinstance(event, StartEvent):
            self._resumed_from_step = event.resumed_from_step
            setup = event.setup_seconds
            self.add("trainer_setup", setup.get("setup", 0.0))
            self.add("latent_cache", setup.get("cache_latents", 0.0))
            self.add("text_cache", setup.get("cache_text", 0.0))
        elif isinstance(event, StepEvent):
            self.steps_seen.add(event.step)
            if after_warm_up(event.step, event.total_steps, self._resumed_from_step):
                self.step_seconds[event.step] = event.seconds_per_step
        elif isinstance(event, SampleEvent) and self._last_event_time is not None:
            self.add("samples", event.time - self._last_event_time)
        self._last_event_time = event.time

    def phases(self, billed_seconds: float | None = None) -> dict[str, float]:
        """Each phase's seconds; training without what the trainer's own clock counted inside it, and what of it
        the steps at the median step time leave (train_extra); with the billed seconds, what no phase explains
        (other)."""
        phases = dict(self.seconds)
        if "training" in phases:
            inside = sum(phases.get(name, 0.0) for name in INSIDE_TRAINING)
            phases["training"] = max(0.0, phases["training"] - inside)
            median = self.seconds_per_step()
            if median is not None:
                phases["train_extra"] = max(0.0, phases["training"] - len(self.steps_seen) * median)
        if billed_seconds is not None:
            spans = sum(phases.get(name, 0.0) for name in CLIENT_SPANS)
            phases["other"] = max(0.0, billed_seconds - spans)
        return phases

    def seconds_per_step(self) -> float | None:
        return statistics.median(self.step_seconds.values()) if self.step_seconds else None

    def bandwidth_usd(self, offer: Offer | None) -> float:
        """What the provider bills for the bytes: the instance receives the uploads and the model download, and
        sends what is fetched. No offer, or no rate: nothing."""
        if offer is None:
            return 0.0
        received = (self.bytes_up + self.model_download_bytes) / BYTES_PER_GB * (offer.inet_down_usd_per_gb or 0.0)
        sent = self.bytes_fetched() / BYTES_PER_GB * (offer.inet_up_usd_per_gb or 0.0)
        return received + sent


def gpu_model_of(record: InstanceRecord, offer: Offer | None) -> str:
    """The GPU as offers name it: the offer's, else the record's "2x RTX 4090" without its count."""
    if offer is not None:
        return offer.gpu_model
    return record.gpu.removeprefix(f"{record.gpu_count}x ")


def record_job_run(
    ledger: Ledger, job: JobRecord, loaded: LoadedConfig, meter: JobMeter, say: Callable[[str], None]
) -> JobRun | None:
    """Write what the closed job measured to the ledger, once it trained (else nothing). Never raises: a job's
    measurements must not fail the job; a failure is logged and said."""
    try:
        return _record(ledger, job, loaded, meter)
    except Exception as exc:
        log.exception("job %s: its measurements were not recorded", job.id)
        say(f"warning: the job's measurements were not recorded ({type(exc).__name__}: {exc})")
        return None


def _record(ledger: Ledger, job: JobRecord, loaded: LoadedConfig, meter: JobMeter) -> JobRun | None:
    if not any(t.to_state == "training" for t in ledger.transitions(job.id)):
        return None
    used = [i for i in ledger.instances(job.id) if i.instance_id or i.provider == "ssh"]
    if not used:
        return None
    trained_on = used[-1]
    offer = meter.offers.get(trained_on.offer_id)
    profile = profile_from_check(loaded.train, inspect_dataset(loaded.train))
    run = JobRun(
        job_id=job.id,
        provider=job.provider,
        gpu_model=gpu_model_of(trained_on, offer),
        gpu_count=trained_on.gpu_count,
        family=profile.model_key,
        settings_key=settings_key(profile),
        seconds_per_step=meter.seconds_per_step(),
        steps_measured=len(meter.step_seconds),
        phases=meter.phases(billed_seconds(used)),
        bytes_up=meter.bytes_up,
        model_download_bytes=meter.model_download_bytes,
        bytes_down=meter.bytes_fetched(),
        cost_usd=ledger.job_cost(job.id),
        bandwidth_usd=meter.bandwidth_usd(offer),
        recorded_at=time.time(),
        images=profile.images,
        sample_images=profile.sample_images,
    )
    ledger.record_run(run)
    return run


def billed_seconds(records: list[InstanceRecord]) -> float:
    """The seconds the provider billed the records' instances at their running price (the ledger's periods)."""
    return sum(
        max(0.0, period.ended_at - period.started_at)
        for record in records
        for period in record.periods
        if period.state == "running" and period.ended_at is not None
    )
