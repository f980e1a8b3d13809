#!/usr/bin/env bash
# Prepares a rented machine for the trainer. Idempotent: a second run skips what is done.
#
#   bash bootstrap.sh JOB_DIR [MODEL_REFERENCE] [GPUS] [PART=URL ...]
#
# Phases, each reported as one JSON line in JOB_DIR/bootstrap.jsonl with its duration:
#   python    find a Python >= 3.11 (the trainer's floor: remote/config.py reads TOML with tomllib):
#             $RENTRAIN_PYTHON when the host sets it (a conda env on a machine rented by hand), else the
#             image's (a PyTorch CUDA image is the default); none: fail, naming the version found
#   packages  install what the image lacks from remote/requirements.txt (uv when present, else pip);
#             torch is kept as the image has it
#   gpu       one torch call: the GPU's name and memory (RENTRAIN_ALLOW_CPU=1 accepts a CPU-only host);
#             a host where torch sees fewer than GPUS GPUs (default 1) fails here, before any training
#   warm      (GPU hosts, background, not reported) remote/warm_cache.py reads the trainer's libraries
#   model     a Hugging Face hub id or https URL is fetched into JOB_DIR/model/, and each PART=URL (Flux.1's
#             ae, clip_l, t5xxl) into JOB_DIR/model/PART/ (runs in the background while the client uploads the
#             dataset; the trainer waits for JOB_DIR/model/.ready)
set -uo pipefail

JOB_DIR=${1:?usage: bootstrap.sh JOB_DIR [MODEL_REFERENCE] [GPUS]}
MODEL=${2:-}
GPUS=${3:-1}
PARTS=("${@:4}")
PAYLOAD_DIR=$(cd "$(dirname "$0")/.." && pwd)
EVENTS="$JOB_DIR/bootstrap.jsonl"
mkdir -p "$JOB_DIR"

now() { date +%s%3N; }  # milliseconds
json_escape() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr '\n\r\t' '   '; }
phase() {  # name ok started_ms detail
    local ms=$(($(now) - $3))
    printf '{"event":"phase","time":%s,"name":"%s","ok":%s,"seconds":%d.%03d,"detail":"%s"}\n' \
        "$(date +%s)" "$1" "$2" $((ms / 1000)) $((ms % 1000)) "$(json_escape "$4")" >>"$EVENTS"
}
fail() {  # name started_ms detail
    phase "$1" false "$2" "$3"
    exit 1
}

# --- python
start=$(now)
PYTHON=""
found=""
for candidate in ${RENTRAIN_PYTHON:-} python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    version=$("$candidate" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || continue
    if [[ "$version" =~ ^([0-9]+)\.([0-9]+) ]] &&
        { [ "${BASH_REMATCH[1]}" -gt 3 ] || { [ "${BASH_REMATCH[1]}" -eq 3 ] && [ "${BASH_REMATCH[2]}" -ge 11 ]; }; }; then
        PYTHON=$(command -v "$candidate")
        break
    fi
    [ -n "$found" ] || found="found Python $version at $(command -v "$candidate")"
done
[ -n "$PYTHON" ] || fail python "$start" \
    "${found:-found no Python on PATH}; the trainer needs 3.11+ (set RENTRAIN_PYTHON or use an image with 3.11+)"
echo "$PYTHON" >"$JOB_DIR/python"
phase python true "$start" "Python $version at $PYTHON"

# --- packages
start=$(now)
REQUIREMENTS="$PAYLOAD_DIR/remote/requirements.txt"
STAMP="$JOB_DIR/.packages-$(sha256sum "$REQUIREMENTS" | cut -c1-16)"
if [ -f "$STAMP" ]; then
    phase packages true "$start" "already installed"
else
    missing=$("$PYTHON" - "$REQUIREMENTS" <<'EOF'
import importlib.metadata as md, re, sys
from pathlib import Path
missing = []
for line in Path(sys.argv[1]).read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
    pinned = line.partition("==")[2].strip()
    try:
        if md.version(name) != (pinned or md.version(name)):  # a pin: the version the tests ran with
            missing.append(line)
    except md.PackageNotFoundError:
        missing.append(line)
print("\n".join(missing))
EOF
)
    if [ -z "$missing" ]; then
        detail="the image has everything"
    else
        mapfile -t packages <<<"$missing"
        if command -v uv >/dev/null 2>&1; then
            installer=(uv pip install --python "$PYTHON" --system)
        else
            installer=("$PYTHON" -m pip install --no-input --disable-pip-version-check)
        fi
        # torch stays as the image has it: a package that needs another torch fails here, never replaces it.
        # Images with the system's Python (PEP 668) take installs into it: the container is their only user.
        "$PYTHON" -c 'import torch; print("torch==" + torch.__version__)' >"$JOB_DIR/keep-torch.txt" 2>/dev/null || true
        if ! PIP_BREAK_SYSTEM_PACKAGES=1 UV_BREAK_SYSTEM_PACKAGES=1 \
            "${installer[@]}" -c "$JOB_DIR/keep-torch.txt" "${packages[@]}" >"$JOB_DIR/packages.log" 2>&1; then
            fail packages "$start" "install failed: $(tail -n 5 "$JOB_DIR/packages.log")"
        fi
        detail="installed: ${packages[*]}"
    fi
    touch "$STAMP"
    phase packages true "$start" "$detail"
fi

# --- gpu
start=$(now)
if ! gpu=$("$PYTHON" -c '
import os, sys, torch
wanted = int(sys.argv[1])
if torch.cuda.is_available():
    count = torch.cuda.device_count()
    if count < wanted:
        sys.exit(f"torch sees {count} GPU(s), the job needs {wanted}: the host or its container is short of GPUs")
    p = torch.cuda.get_device_properties(0)
    for index in range(wanted):
        torch.zeros(1, device=f"cuda:{index}").add_(1)
    print(f"{count} x {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
elif os.environ.get("RENTRAIN_ALLOW_CPU") == "1":
    print(f"CPU only (allowed), torch {torch.__version__}" + (f", {wanted} CPU processes" if wanted > 1 else ""))
else:
    sys.exit("torch sees no GPU: the driver, the image or the host is broken")
' "$GPUS" 2>&1); then
    fail gpu "$start" "$gpu"
fi
phase gpu true "$start" "$gpu"

# --- warm (background, GPU hosts): the trainer's libraries into the page cache while the model and the dataset
# arrive; a fresh machine's first import of them and its first CUDA calls otherwise read them cold
case "$gpu" in
    "CPU only"*) ;;
    *) nice -n 10 "$PYTHON" "$PAYLOAD_DIR/remote/warm_cache.py" </dev/null >/dev/null 2>"$JOB_DIR/warm.log" & ;;
esac

# --- model (background; the trainer waits for .ready)
# a download that still runs (this script run again after an SSH drop, or by a client that came back) is kept
fetching() { [ -f "$JOB_DIR/model.pid" ] && kill -0 "$(cat "$JOB_DIR/model.pid")" 2>/dev/null; }
FETCH_MODEL=$MODEL
[[ "$MODEL" == /* ]] && FETCH_MODEL=""  # a path: uploaded, nothing to fetch
case "$FETCH_MODEL" in https://*|*/*) ;; *) FETCH_MODEL="" ;; esac
if [ -n "$FETCH_MODEL" ] || [ ${#PARTS[@]} -gt 0 ]; then
    if [ ! -f "$JOB_DIR/model/.ready" ] && ! fetching; then
        mkdir -p "$JOB_DIR/model"
        rm -f "$JOB_DIR/model/.failed"
        (
            start=$(now)
            if "$PYTHON" "$PAYLOAD_DIR/remote/fetch_model.py" "$FETCH_MODEL" "$JOB_DIR/model" "${PARTS[@]}" \
                >"$JOB_DIR/model.log" 2>&1; then
                touch "$JOB_DIR/model/.ready"
                phase model true "$start" "$FETCH_MODEL ${PARTS[*]}"
            else
                echo failed >"$JOB_DIR/model/.failed"
                phase model false "$start" "$(tail -n 3 "$JOB_DIR/model.log")"
            fi
        ) </dev/null >/dev/null 2>&1 &
        echo $! >"$JOB_DIR/model.pid"
    fi
fi
exit 0
