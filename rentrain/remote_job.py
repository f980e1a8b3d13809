"""The job's folder on the rented machine, and the shell commands that act on it (all built with shlex.quote).

    <workdir>/rentrain/<job-id>/
        payload/remote/      the trainer, bootstrap and watchdog (this repo's remote/ package)
        dataset/  reg/       the kohya image folders
        model/               an uploaded base model, or one fetched there
        config.toml          the training config with these paths
        output/              events.jsonl, checkpoints, states, samples, the final LoRA
        trainer.pid  watchdog.json  watchdog.pid  heartbeat  fetched  bootstrap.jsonl  bootstrap.pid

<workdir> is $RENTRAIN_WORKDIR when set, else /workspace when writable (the volume on RunPod and the
usual data disk on Vast), else $HOME.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel

import remote
from remote.config import FLUX_PARTS, TrainConfig, model_source_kind
from remote.fetch_model import url_file_name
from rentrain.multigpu import trainer_argv
from rentrain.transport import Remote, TransportError

WORKDIR_PROBE = (
    'd="${RENTRAIN_WORKDIR:-}"; '
    'if [ -z "$d" ]; then if [ -d /workspace ] && [ -w /workspace ]; then d=/workspace; else d="$HOME"; fi; fi; '
    'echo "$d"'
)


SAFE_ABSOLUTE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")


def probe_workdir(remote: Remote) -> str:
    """The folder jobs go in on this host; the last line only, so a chatty shell start-up file cannot
    smuggle text into every later command."""
    lines = [line.strip() for line in remote.run(WORKDIR_PROBE).stdout.splitlines() if line.strip()]
    if not lines or not SAFE_ABSOLUTE_PATH.match(lines[-1]) or ".." in lines[-1].split("/"):
        raise TransportError(f"the instance named no usable work folder (got {lines[-1:]!r})")
    return lines[-1]


class RemoteLayout(BaseModel):
    root: str

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def payload(self) -> str:
        return self._join("payload")

    @property
    def dataset(self) -> str:
        return self._join("dataset")

    @property
    def reg(self) -> str:
        return self._join("reg")

    @property
    def model(self) -> str:
        return self._join("model")

    @property
    def output(self) -> str:
        return self._join("output")

    @property
    def config(self) -> str:
        return self._join("config.toml")

    @property
    def events(self) -> str:
        return self._join("output", "events.jsonl")

    @property
    def trainer_log(self) -> str:
        return self._join("trainer.log")

    @property
    def trainer_pid(self) -> str:
        return self._join("trainer.pid")

    @property
    def heartbeat(self) -> str:
        return self._join("heartbeat")

    @property
    def fetched(self) -> str:
        return self._join("fetched")

    @property
    def bootstrap_events(self) -> str:
        return self._join("bootstrap.jsonl")

    @property
    def bootstrap_exit(self) -> str:
        return self._join("bootstrap.exit")

    @property
    def bootstrap_pid(self) -> str:
        return self._join("bootstrap.pid")

    @property
    def watchdog_settings(self) -> str:
        return self._join("watchdog.json")

    @property
    def watchdog_pid(self) -> str:
        return self._join("watchdog.pid")

    @property
    def watchdog_log(self) -> str:
        return self._join("watchdog.jsonl")

    @property
    def sample_prompts(self) -> str:
        return self._join("sample_prompts.txt")


def job_root(workdir: str, job_id: str) -> str:
    return posixpath.join(workdir.rstrip("/") or "/", "rentrain", job_id)


def payload_source() -> Path:
    """The remote/ package this client ships: the same code that the tests run."""
    return Path(remote.__file__).resolve().parent


def remote_model_reference(train: TrainConfig, layout: RemoteLayout) -> str:
    reference = train.pretrained_model_name_or_path
    kind = model_source_kind(reference)
    if kind == "local_file":
        return posixpath.join(layout.model, Path(reference).name)
    if kind == "local_dir":
        return layout.model
    if kind == "url":
        return posixpath.join(layout.model, url_file_name(reference))
    return reference  # hub id (prefetched into the hub cache by bootstrap) or builtin


def remote_train_config(train: TrainConfig, layout: RemoteLayout) -> str:
    """The training config as the instance must read it: the same settings, the instance's paths."""
    values: dict[str, Any] = train.model_dump(mode="json", exclude_none=True)
    values["pretrained_model_name_or_path"] = remote_model_reference(train, layout)
    values["train_data_dir"] = layout.dataset
    values["output_dir"] = layout.output
    if train.reg_data_dir is not None:
        values["reg_data_dir"] = layout.reg
    if isinstance(train.sample_prompts, Path):
        values["sample_prompts"] = layout.sample_prompts
    if train.vae is not None and Path(train.vae).is_absolute():
        values["vae"] = posixpath.join(layout.model, "vae", Path(train.vae).name)
    for part in FLUX_PARTS:
        reference = getattr(train, part)
        if reference is not None:
            name = url_file_name(reference) if reference.startswith("https://") else Path(reference).name
            values[part] = posixpath.join(layout.model, part, name)  # uploaded or fetched there (prepare.py)
    return tomli_w.dumps(values)


def detached(command: str, log: str, pid_file: str | None = None) -> str:
    """Start `command` in its own session, immune to the SSH connection ending; optionally record its pid."""
    record = f" echo $! > {shlex.quote(pid_file)};" if pid_file else ""
    return f"setsid nohup sh -c {shlex.quote(command)} > {shlex.quote(log)} 2>&1 < /dev/null &{record}"


def bootstrap_command(
    layout: RemoteLayout, model_reference: str, gpus: int, parts: Sequence[str] = (), token_on_stdin: bool = False
) -> str:
    """Start bootstrap.sh JOB_DIR MODEL GPUS [PART=URL ...] detached, unless it runs already (a command retried
    after an SSH drop must not start a second one). Its gpu phase fails a host where torch sees fewer than `gpus`
    GPUs; its model phase fetches MODEL (unless "") and Flux.1's PART=URL files (remote/fetch_model.py).
    `token_on_stdin`: the command's first input line is a Hugging Face token, given to the setup (and so to the
    model download) as HF_TOKEN and to nothing else: it stands in no command line, file or log."""
    script = posixpath.join(layout.payload, "remote", "bootstrap.sh")
    arguments = shlex.join(["bash", script, layout.root, model_reference, str(gpus), *parts])
    inner = f"{arguments}; echo $? > {shlex.quote(layout.bootstrap_exit)}"
    token = "IFS= read -r HF_TOKEN && export HF_TOKEN; " if token_on_stdin else ""
    start = f"{token}rm -f {shlex.quote(layout.bootstrap_exit)};" + detached(
        inner, posixpath.join(layout.root, "bootstrap.log"), layout.bootstrap_pid
    )
    return f"{is_alive_command(layout.bootstrap_pid)} || {{ {start} }}"


# The watchdog starts before bootstrap has found the trainer's Python, so it takes the first Python 3.8+ there is.
WATCHDOG_LAUNCH = """for p in ${{RENTRAIN_PYTHON:-}} python3 python; do
if command -v "$p" >/dev/null 2>&1 && "$p" -c "import sys; sys.exit(sys.version_info < (3, 8))" 2>/dev/null; then
exec "$p" {script} {job_dir}; fi; done
echo "no Python 3.8+ on this image to run the watchdog with" >&2; exit 1"""


def watchdog_command(layout: RemoteLayout) -> str:
    """Start the watchdog unless it runs, then wait (10 s at most) until it has read its settings and written
    watchdog.pid. Exits non-zero, with the end of watchdog.log on stderr, when it did not start."""
    pid_file = layout.watchdog_pid
    log = posixpath.join(layout.root, "watchdog.log")
    launch = WATCHDOG_LAUNCH.format(
        script=shlex.quote(posixpath.join(layout.payload, "remote", "watchdog.py")), job_dir=shlex.quote(layout.root)
    )
    running = is_alive_command(pid_file)
    wait = (
        f"i=0; while [ $i -lt 50 ]; do if {running}; then exit 0; fi; sleep 0.2; i=$((i + 1)); done; "
        f"tail -n 5 {shlex.quote(log)} >&2; exit 1"
    )
    return f"{running} || {{ rm -f {shlex.quote(pid_file)}; {detached(launch, log)} {wait}; }}"


def trainer_command(layout: RemoteLayout, python: str, resume: str | None, gpus: int) -> str:
    """Start the trainer detached: one process, or `gpus` data-parallel ranks under `accelerate launch`
    (rentrain.multigpu.trainer_argv). The pid file holds the launcher's pid, the leader of the process group
    that the client and the watchdog signal, so every rank is stopped with it."""
    arguments = trainer_argv(python, layout.config, resume, gpus)
    # events go to output/events.jsonl; stdout (the same events) is not needed, stderr is the log
    run = (
        f"cd {shlex.quote(layout.root)} && PYTHONPATH={shlex.quote(layout.payload)} "
        f"exec {shlex.join(arguments)} > /dev/null"
    )
    # a retried SSH command must not start a second trainer
    return f"{is_alive_command(layout.trainer_pid)} || {{ {detached(run, layout.trainer_log, layout.trainer_pid)} }}"


def is_alive_command(pid_file: str) -> str:
    """True while the pid in pid_file runs; a zombie (exited, not reaped by a container's PID 1) is not alive."""
    pid = f"$(cat {shlex.quote(pid_file)} 2>/dev/null)"
    return f'p={pid}; [ -n "$p" ] && kill -0 "$p" 2>/dev/null && ! grep -q "^[0-9]* (.*) Z" /proc/"$p"/stat 2>/dev/null'
