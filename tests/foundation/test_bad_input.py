"""Bad input, as a careless or hostile user gives it: each row is refused with exit code 2 and a message that
names the file, key or option and the value, never a traceback, and nothing is rented (rows with code 0 are
inputs that must be accepted; code 1 rows fail for a reason that is not the input).

One row per case: Row(id, the job to write, the command line, exit code, a phrase the output must contain).
`training("key = value")` (and `model`, `dataset`, `sample`, `settings` for [rentrain]) writes a small valid
job with that line in place of the default; `data(change)` changes its dataset folder; `job(...)` does both
and more. Commands run in-process against Vast at a closed port behind the `responses` mock: a code-2 row may
make no request at all, no row may make one other than the offer search, and the ledger must stay empty.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import responses
from click.testing import CliRunner
from PIL import Image

from rentrain.cli import main
from rentrain.ledger import Ledger
from tests.foundation.helpers import write_captioned, write_image

DEFAULTS: dict[str, dict[str, str]] = {
    "model": {"pretrained_model_name_or_path": '"builtin:tiny-sd15"'},
    "dataset": {"train_data_dir": '"dataset"', "resolution": "64"},
    "training": {"output_dir": '"output"', "max_train_epochs": "1", "learning_rate": "1e-4"},
    "sample": {},
    "rentrain": {},
}
Build = Callable[[Path], Path]  # writes a job under tmp_path, returns its folder
Change = Callable[[Path], object]  # changes the dataset folder


def config_text(**sections: str) -> str:
    """The default config with each section's "key = value" lines put in place of (or next to) the defaults;
    a line that is not key = value (a table header...) is appended to the file as it is."""
    tables = {name: dict(values) for name, values in DEFAULTS.items()}
    tail = []
    for section, lines in sections.items():
        for line in filter(None, lines.split("\n")):
            key, sep, value = line.partition(" = ")
            if sep and section in tables:
                tables[section][key.strip()] = value
            else:
                tail.append(line)
    body = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()) for name, table in tables.items())
    return body + "\n".join(tail) + "\n"


def job(
    files: Change | None = None, encode: Callable[[str], bytes] = str.encode, folder: str = "job", **sections: str
) -> Build:
    """A job in tmp/<folder>: config.toml and dataset/2_zed/ with two captioned 64x64 images."""

    def build(tmp: Path) -> Path:
        root = tmp / folder
        subset = root / "dataset" / "2_zed"
        write_captioned(subset, "a", (64, 64), (200, 10, 10), "zed, red")
        write_captioned(subset, "b", (64, 64), (10, 200, 10), "zed, green")
        (root / "config.toml").write_bytes(encode(config_text(**sections)))
        if files is not None:
            files(root / "dataset")
        return root

    return build


def model(text: str) -> Build:
    return job(model=text)


TINY_FLUX = (
    'pretrained_model_name_or_path = "builtin:tiny-flux"\nnetwork_module = "networks.lora_flux"\n'
    "network_train_unet_only = true"
)
HUB_REPO = "o/r"


def flux(model: str = "", training: str = "") -> Build:
    """A job on the built-in tiny Flux.1 model (kohya's Flux network module), with these lines changed."""
    return job(model=f"{TINY_FLUX}\n{model}", training=training)


def dataset(text: str) -> Build:
    return job(dataset=text)


def training(text: str) -> Build:
    return job(training=text)


def sample(text: str) -> Build:
    return job(sample=text)


def settings(text: str) -> Build:
    return job(rentrain=text)


def data(*changes: Change) -> Build:
    return job(files=lambda folder: [change(folder) for change in changes])


def raw(encode: Callable[[str], bytes]) -> Build:
    return job(encode=encode)


# --- dataset changes -----------------------------------------------------------------------------------------


def add_file(name: str, content: bytes = b"") -> Change:
    def change(folder: Path) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)

    return change


def add_image(name: str, size: tuple[int, int] = (64, 64)) -> Change:
    return lambda folder: write_image(folder / name, size, (1, 2, 3))


def images(subset: str, count: int) -> Change:
    return lambda folder: [write_image(folder / subset / f"{i}.png", (64, 64), (i, 0, 0)) for i in range(count)]


def add_link(name: str, target: str) -> Change:
    return lambda folder: (folder / name).symlink_to(target)


def add_folder(name: str) -> Change:
    return lambda folder: (folder / name).mkdir(parents=True)


def rename_subset(name: str) -> Change:
    return lambda folder: (folder / "2_zed").rename(folder / name)


def empty(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


def non_utf8_name(folder: Path) -> None:
    write_image(Path(os.fsdecode(bytes(folder / "2_zed") + b"/bad\xffname.png")), (64, 64), (5, 5, 5))


def sixteen_bit_png(folder: Path) -> None:
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey).save(folder / "2_zed" / "grey16.png")


# --- command lines and values --------------------------------------------------------------------------------

CONFIG = "{job}/config.toml"
CHECK = ("check", CONFIG)
JSON = ("check", "--json", CONFIG)
RUN = ("run", CONFIG, "--provider", "vast", "--yes")
LOCAL = ("run", CONFIG, "--provider", "local")
SSH = ("run", CONFIG, "--provider", "ssh")
OFFERS = ("offers", "--provider", "vast", "--config", CONFIG)
ESTIMATE = ("estimate", "--provider", "vast", "--config", CONFIG)
INIT = ("init", "{job}/new")
DEEP = "[" * 5000 + "]" * 5000
HF_URL = "https://huggingface.co/o/r/resolve/main/m.safetensors?download=true"
PROMPT_FILE = 'sample_prompts = "dataset/p.txt"'
NAMELESS_URL = "https://x.ai/models/12?type=M"  # the file name is in a Content-Disposition header only
ADAFACTOR_RELATIVE = 'optimizer_type = "Adafactor"\noptimizer_args = ["relative_step=True"]'
CONFUSABLE = "l\u0435arning_rate"  # a Cyrillic "e"
OK = "OK: ready to train"
FINITE = "input should be a finite number"
AT_LEAST_1 = "input should be greater than or equal to 1"


def latin_1(text: str) -> bytes:
    return text.encode("latin-1")


def _duplicate_key(text: str) -> bytes:
    return ("seed = 1\nseed = 2\n" + text).encode()


@dataclass(frozen=True)
class Row:
    id: str
    build: Build
    argv: tuple[str, ...]
    code: int
    phrase: str
    vast_offers: tuple[dict[str, object], ...] | None = None  # Vast's offer search answer; None: every request fails
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the command


def vast_offer(**fields: object) -> dict[str, object]:
    """An offer as Vast's POST /bundles/ returns it (tests/providers/fixtures/vast_bundles.json), changed."""
    fixture = Path(__file__).parents[1] / "providers" / "fixtures" / "vast_bundles.json"
    return {**json.loads(fixture.read_text())["offers"][0], **fields}


MARKUP = (vast_offer(geolocation="[red]Oslo[/red]", gpu_name="RTX 4090 [/]"),)

ROWS = [
    # ---- issue 14, part 1 ----
    Row("name-parent", training('output_name = "../../x"'), RUN, 2, "output_name in [training]: '../../x' must be"),
    Row("name-absolute", training('output_name = "/abs"'), CHECK, 2, "'/abs' must be a plain file name"),
    Row("name-empty", training('output_name = ""'), CHECK, 2, "output_name in [training]: '' is empty"),
    Row("name-nul", training('output_name = "a\\u0000b"'), CHECK, 2, "'a\\x00b' must be a plain file name"),
    Row("name-201-bytes", training(f'output_name = "{"n" * 201}"'), CHECK, 2, "is 201 bytes long; at most 200"),
    Row("name-space", training('output_name = "my lora"'), LOCAL, 2, "'my lora' must be a plain file name"),
    Row("name-newline", training('output_name = "x\\n"'), CHECK, 2, "'x\\n' must be a plain file name"),
    Row("name-fetch-refuses", training('output_name = "ünï"'), CHECK, 2, "'ünï' must be a plain file name"),
    Row("lr-nan", training("learning_rate = nan"), RUN, 2, f"learning_rate in [training]: {FINITE}"),
    Row("lr-inf", training("learning_rate = inf"), CHECK, 2, f"learning_rate in [training]: {FINITE}"),
    Row("lr-negative", training("learning_rate = -1e-4"), CHECK, 2, "should be greater than 0 (got -0.0001)"),
    Row("unet_lr-nan", training("unet_lr = nan"), CHECK, 2, f"unet_lr in [training]: {FINITE}"),
    Row("te_lr-inf", training("text_encoder_lr = -inf"), CHECK, 2, f"text_encoder_lr in [training]: {FINITE}"),
    Row("te_lr-negative", training("text_encoder_lr = -1"), CHECK, 2, "should be greater than or equal to 0"),
    Row("repeats-huge", data(rename_subset("99999999999_zed")), RUN, 2, "repeat count 99999999999 must be from 1"),
    Row("resolution-0", dataset("resolution = 0"), CHECK, 2, "resolution in [dataset]: each side must be a multiple"),
    Row("resolution-1e5", dataset("resolution = 100000"), CHECK, 2, "from 64 to 4096, got 100000,100000"),
    Row("batch-0", dataset("batch_size = 0"), CHECK, 2, f"batch_size in [dataset]: {AT_LEAST_1} (got 0)"),
    Row("epochs-1e9", training("max_train_epochs = 1000000000"), CHECK, 2, "less than or equal to 10000 (got 1000"),
    Row("network_dim-0", training("network_dim = 0"), CHECK, 2, f"network_dim in [training]: {AT_LEAST_1} (got 0)"),
    Row("max-cost-nan", job(), (*RUN, "--max-cost", "nan"), 2, "'--max-cost': 'nan' is not a finite number"),
    Row("max-cost-inf", job(), (*RUN, "--max-cost", "inf"), 2, "'--max-cost': 'inf' is not a finite number"),
    Row("max-cost-negative", job(), (*RUN, "--max-cost", "-3"), 2, "'--max-cost': '-3' is not a number above 0"),
    Row("max-hours-nan", job(), (*RUN, "--max-hours", "nan"), 2, "'--max-hours': 'nan' is not a finite number"),
    Row("max-hours-0", job(), (*RUN, "--max-hours", "0"), 2, "'--max-hours': '0' is not a number above 0"),
    Row("idle-nan", job(), (*RUN, "--idle-timeout", "NaN"), 2, "'--idle-timeout': 'NaN' is not a finite number"),
    Row("idle-negative", job(), (*RUN, "--idle-timeout", "-1"), 2, "'--idle-timeout': '-1' is not a number above"),
    Row("min-vram-negative", job(), ("offers", "--min-vram", "-5"), 2, "'--min-vram': '-5' is not a number above"),
    Row("min-vram-nan", job(), ("offers", "--min-vram", "nan"), 2, "'--min-vram': 'nan' is not a finite number"),
    Row("max-price-inf", job(), ("offers", "--max-price", "inf"), 2, "'--max-price': 'inf' is not a finite number"),
    Row("limit-0", job(), ("offers", "--limit", "0"), 2, "'--limit': '0' is not a whole number from 1 to 10000"),
    Row("estimate-price", job(), (*ESTIMATE, "--max-price", "-1"), 2, "'--max-price': '-1' is not a number above"),
    Row("separator-empty", dataset('caption_separator = ""'), CHECK, 2, "caption_separator in [dataset]: is empty"),
    Row("opt-unknown", training('optimizer_args = ["foo=1"]'), RUN, 2, "'foo=1': AdamW takes no argument 'foo'"),
    Row("opt-lion-eps", training('optimizer_type = "Lion"\noptimizer_args = ["eps=0"]'), CHECK, 2, "Lion takes no"),
    Row("opt-lr", training('optimizer_args = ["lr=1"]'), CHECK, 2, "'lr=1': lr is not an optimizer argument here"),
    Row("opt-nan", training('optimizer_args = ["weight_decay=nan"]'), CHECK, 2, "the value must be a finite number"),
    Row(
        "prodigy-two-lrs",
        training('optimizer_type = "Prodigy"\nunet_lr = 1.0\ntext_encoder_lr = 0.5'),
        CHECK,
        2,
        "text_encoder_lr in [training]: 0.5 while the UNet's is 1: Prodigy takes one learning rate",
    ),
    Row("prodigy-one-lr", training('optimizer_type = "Prodigy"\nlearning_rate = 1.0'), CHECK, 0, OK),
    Row("prodigy-unet-only", training('optimizer_type = "Prodigy"\nunet_lr = 1.0\ntext_encoder_lr = 0'), CHECK, 0, OK),
    Row("opt-no-equals", training('optimizer_args = ["weight_decay"]'), CHECK, 2, "expected name=value"),
    Row("opt-adafactor", training(ADAFACTOR_RELATIVE), CHECK, 2, "relative_step=True is not supported"),
    Row("prompts-missing", sample('sample_prompts = "prompts.txt"'), RUN, 2, "prompts.txt does not exist"),
    Row("dangling-link", data(add_link("2_zed/c.png", "/nowhere/c.png")), RUN, 2, "c.png: is a symbolic link to"),
    Row("non-utf8-json", data(non_utf8_name), JSON, 2, 'bad\\\\xffname.png"'),
    Row("non-utf8-text", data(non_utf8_name), CHECK, 2, "bad\\xffname.png: the file name is not valid UTF-8"),
    Row("toml-recursion", training(f"x = {DEEP}"), CHECK, 2, "not valid TOML: its tables or arrays nest too deeply"),
    Row("png-16-bit", data(sixteen_bit_png), CHECK, 0, OK),
    Row("url-query", model(f'pretrained_model_name_or_path = "{HF_URL}"'), CHECK, 0, "m.safetensors?download=true"),
    Row("url-no-name", model(f'pretrained_model_name_or_path = "{NAMELESS_URL}"'), CHECK, 2, "file name '12' does"),
    Row("markup-config-path", job(folder="job[/]x"), CHECK, 0, "job[/]x/config.toml"),
    Row("markup-data-path", dataset('train_data_dir = "[red]no[/red]"'), CHECK, 2, "[red]no[/red]: train_data_dir"),
    Row("markup-file-name", data(add_file("2_zed/[bold]x.png", b"no")), CHECK, 2, "[bold]x.png: cannot be decoded"),
    Row("markup-gpu-filter", job(), (*OFFERS, "--gpu", "[/]"), 0, "GPU in [/]", vast_offers=()),
    Row("markup-offer-table", job(), OFFERS, 0, "[red]Oslo[/red]", vast_offers=MARKUP),
    Row("markup-estimate-table", job(), ESTIMATE, 0, "RTX 4090 [/]", vast_offers=MARKUP),
    Row("markup-chosen-offer", job(), (*RUN, "--max-cost", "0.0001"), 1, "[red]Oslo[/red] at $", vast_offers=MARKUP),
    # ---- the config file ----
    Row("config-missing", job(), ("check", "{job}/nope.toml"), 2, "nope.toml is not valid: ✗ no such file"),
    Row("config-folder", job(), ("check", "{job}/dataset"), 2, "is a folder, not a config file"),
    Row("config-empty", raw(lambda _: b""), CHECK, 2, "pretrained_model_name_or_path in [model]: missing"),
    Row("config-huge", raw(lambda text: (text + "#" * 2_000_000).encode()), CHECK, 2, "a config is a few KB"),
    Row("config-latin-1", job(training='output_name = "café"', encode=latin_1), CHECK, 2, "not UTF-8 text"),
    Row("config-binary", raw(lambda _: bytes(range(256)) * 4), CHECK, 2, "not UTF-8 text"),
    Row("config-bom", raw(lambda text: codecs.BOM_UTF8 + text.encode()), CHECK, 0, OK),
    Row("config-crlf", raw(lambda text: text.replace("\n", "\r\n").encode()), CHECK, 0, OK),
    Row("config-duplicate-key", raw(_duplicate_key), CHECK, 2, "not valid TOML"),
    Row("config-alias-twice", dataset("train_batch_size = 1\nbatch_size = 1"), CHECK, 2, "given twice: also as"),
    Row("config-unknown-key", training("learning_rat = 1"), CHECK, 2, "learning_rat: unknown key in [training]"),
    Row("config-confusable", training(f'"{CONFUSABLE}" = 1'), CHECK, 2, "did you mean learning_rate?"),
    Row("config-two-levels", training("[training.more]\nx = 1"), CHECK, 2, "more in [training]: tables nest one"),
    Row("config-kohya-datasets", training('[[datasets]]\nx = "y"'), CHECK, 2, "([[datasets]]) are not read"),
    Row("config-job-in-model", model("max_cost = 3"), CHECK, 2, "max_cost: unknown key in [model]; it belongs in"),
    Row("config-epochs-0", training("max_train_epochs = 0"), CHECK, 2, f"max_train_epochs in [training]: {AT_LEAST_1}"),
    # ---- wrong types, absurd values ----
    Row("batch-string", dataset('batch_size = "two"'), CHECK, 2, "input should be a valid integer"),
    Row("batch-bool", dataset("batch_size = true"), CHECK, 2, "batch_size in [dataset]: must be a number, got true"),
    Row("batch-fraction", dataset("batch_size = 2.5"), CHECK, 2, "got a number with a fractional part"),
    Row("batch-huge-int", dataset("batch_size = 99999999999999999999"), CHECK, 2, "less than or equal to 256"),
    Row("lr-date", training("learning_rate = 1979-05-27"), CHECK, 2, "input should be a valid number"),
    Row("lr-string-accepted", training('learning_rate = "1e-4"'), CHECK, 0, OK),
    Row("lr-11", training("learning_rate = 11"), CHECK, 2, "less than or equal to 10"),
    Row("name-int", training("output_name = 5"), CHECK, 2, "output_name in [training]: input should be a valid string"),
    Row("resolution-text", dataset('resolution = "512x512"'), CHECK, 2, 'must be "512" or "512,768"'),
    Row("resolution-100", dataset("resolution = 100"), CHECK, 2, "each side must be a multiple of 64"),
    Row("seed-negative", training("seed = -1"), CHECK, 2, "seed in [training]: input should be greater than or equal"),
    Row("warmup-150%", training('lr_scheduler = "cosine"\nlr_warmup_steps = "150%"'), CHECK, 2, "must be below 1"),
    Row("warmup-inf", training('lr_scheduler = "cosine"\nlr_warmup_steps = inf'), CHECK, 2, "lr_warmup_steps in"),
    Row("conv_dim-nan", training('network_args = ["conv_dim=nan"]'), CHECK, 2, "conv_dim must be a whole number"),
    Row("conv_alpha-inf", training('network_args = ["conv_alpha=inf"]'), CHECK, 2, "conv_alpha must be above 0"),
    # ---- issue 19: Flux.1 keys ----
    Row("flux-key-on-sd", training("guidance_scale = 4.0"), CHECK, 2, "guidance_scale in [training]: Flux.1 only"),
    Row("loss-huber", training('loss_type = "huber"'), CHECK, 2, "loss_type in [training]: 'huber' is not supported"),
    Row("flux-blocks-19", flux(training='network_args = ["train_double_block_indices=0-19"]'), CHECK, 2, "0-18"),
    Row("flux-blocks-text", flux(training='network_args = ["train_single_block_indices=odd"]'), CHECK, 2, "ranges"),
    Row("flux-sampling", flux(training='timestep_sampling = "logit"'), CHECK, 2, "timestep_sampling in [training]"),
    Row("flux-prediction", flux(training='model_prediction_type = "eps"'), CHECK, 2, "model_prediction_type in"),
    Row("flux-t5-0", flux(model="t5xxl_max_token_length = 0"), CHECK, 2, "t5xxl_max_token_length in [model]"),
    Row("flux-shift-0", flux(training="discrete_flow_shift = 0"), CHECK, 2, "discrete_flow_shift in [training]"),
    Row("flux-min-snr", flux(training="min_snr_gamma = 5"), CHECK, 2, "min_snr_gamma in [training]: SD/SDXL only"),
    Row("flux-ae-repo", flux(model=f'ae = "{HUB_REPO}"'), CHECK, 2, "ae in [model]: 'o/r' is not a file"),
    Row("flux-ok", flux(training='network_args = ["train_double_block_indices=all"]'), CHECK, 0, OK),
    Row("weights-nan", sample("sample_weights = [nan]"), CHECK, 2, f"sample_weights in [sample]: {FINITE}"),
    Row("seeds-empty", sample("sample_seeds = []"), CHECK, 2, "sample_seeds in [sample]: must be 1 to 16 seeds"),
    Row("keep_tokens-negative", dataset("keep_tokens = -1"), CHECK, 2, "keep_tokens in [dataset]: input should be"),
    Row("dropout-1.5", dataset("caption_dropout_rate = 1.5"), CHECK, 2, "less than or equal to 1"),
    Row("accumulation-0", training("gradient_accumulation_steps = 0"), CHECK, 2, "gradient_accumulation_steps in"),
    Row("clip_skip-13", model("clip_skip = 13"), CHECK, 2, "clip_skip in [model]: input should be less than"),
    Row("extension-path", dataset('caption_extension = "/etc/passwd"'), CHECK, 2, "must start with a dot"),
    Row("extension-dot", dataset('caption_extension = "."'), CHECK, 2, "caption_extension in [dataset]: must start"),
    Row("extension-slash", dataset('caption_extension = ".t/x"'), CHECK, 2, "got '.t/x'"),
    Row("optimizer-typo", training('optimizer_type = "Adam"'), CHECK, 2, "did you mean AdamW?"),
    Row("opt-bad-tuple", training('optimizer_args = ["betas=0.9,x"]'), CHECK, 2, "the value must be a finite number"),
    Row("precision-fp8", training('mixed_precision = "fp8"'), CHECK, 2, "input should be 'no', 'fp16' or 'bf16'"),
    Row("job-cost-nan", settings("max_cost = nan"), RUN, 2, f"max_cost in [rentrain]: {FINITE}"),
    Row("job-cost-negative", settings("max_cost = -1"), OFFERS, 2, "max_cost in [rentrain]: input should be greater"),
    Row("job-idle-inf", settings("idle_timeout_minutes = inf"), RUN, 2, "idle_timeout_minutes in [rentrain]: input"),
    Row("job-hours-9000", settings("max_hours = 9000"), RUN, 2, "max_hours in [rentrain]: input should be less than"),
    Row("job-gpus-0", settings("gpu_count = 0"), ESTIMATE, 2, f"gpu_count in [rentrain]: {AT_LEAST_1}"),
    Row("job-unknown-key", settings("budget = 3"), RUN, 2, "budget: unknown key in [rentrain]"),
    # ---- paths and the model ----
    Row("path-control-char", dataset('train_data_dir = "a\\u0001b"'), CHECK, 2, "train_data_dir does not exist"),
    Row("path-data-is-file", dataset('train_data_dir = "config.toml"'), CHECK, 2, "train_data_dir is not a folder"),
    Row("model-missing", model('pretrained_model_name_or_path = "./m.safetensors"'), RUN, 2, "m.safetensors does not"),
    Row("model-http", model('pretrained_model_name_or_path = "http://x.org/m.ckpt"'), CHECK, 2, "use an https:// URL"),
    Row("model-builtin", model('pretrained_model_name_or_path = "builtin:huge"'), CHECK, 2, "unknown built-in model"),
    Row("model-url-slash", model('pretrained_model_name_or_path = "https://x.org/"'), CHECK, 2, "cannot tell a file"),
    Row("vae-missing", model('vae = "./vae.safetensors"'), RUN, 2, "vae in [model]: "),
    Row("prompts-folder", sample('sample_prompts = "dataset"'), CHECK, 2, "dataset is not a file"),
    Row("prompts-latin-1", job(sample=PROMPT_FILE, files=add_file("p.txt", b"\xe9")), CHECK, 2, "p.txt is not UTF"),
    # ---- the dataset ----
    Row("data-empty", data(empty), RUN, 2, "no training images found"),
    Row("data-no-prefix", data(rename_subset("zed")), CHECK, 2, "zed: folder name must start with the repeat count"),
    Row("data-zero-repeats", data(rename_subset("0_zed")), CHECK, 2, "repeat count 0 must be from 1 to 10000"),
    Row("data-negative-repeats", data(rename_subset("-3_zed")), CHECK, 2, "-3_zed: folder name must start with"),
    Row("data-samples", data(images("10000_many", 101)), CHECK, 2, "samples per epoch (images x repeats); at most"),
    Row("data-loose-images", data(empty, add_image("loose.png")), CHECK, 2, "image(s) directly in train_data_dir"),
    Row("data-garbage-image", data(add_file("2_zed/c.png", b"not an image")), RUN, 2, "c.png: cannot be decoded"),
    Row("data-truncated-png", data(add_file("2_zed/c.png", b"\x89PNG\r\n\x1a\n\0")), CHECK, 2, "cannot be decoded"),
    Row("data-1x1", data(add_image("2_zed/c.png", (1, 1))), CHECK, 2, "1x1 is too small to train on"),
    Row("data-sliver", data(add_image("2_zed/c.png", (64, 4000))), CHECK, 2, "more than 8 times as long as it is"),
    Row("data-caption-dir", data(add_image("2_zed/c.png"), add_folder("2_zed/c.txt")), CHECK, 2, "c.txt: caption is"),
    Row("data-caption-empty", data(add_file("2_zed/a.txt", b"\n \n")), CHECK, 2, "a.txt: caption file is empty"),
    Row("data-caption-latin-1", data(add_file("2_zed/a.txt", b"\xe9t\xe9")), CHECK, 2, "caption is not UTF-8 text"),
    Row("data-caption-huge", data(add_file("2_zed/a.txt", b"zed " * 300_000)), CHECK, 2, "caption file is larger"),
    Row("data-link-loop", data(add_link("2_zed/l", "m"), add_link("2_zed/m", "l")), CHECK, 2, "l: is a symbolic link"),
    Row("data-glob-names", data(add_image("2_zed/a**[b].png")), CHECK, 0, OK),
    Row("data-unicode-names", data(rename_subset("2_ゼッド 🙂")), CHECK, 0, OK),
    Row("data-bom-caption", data(add_file("2_zed/a.txt", codecs.BOM_UTF8 + b"zed, red")), CHECK, 0, OK),
    # ---- command lines ----
    Row("run-gpuflow", job(), ("run", CONFIG, "--provider", "gpuflow"), 2, "rentrain cannot train on GPUFlow"),
    Row("run-provider-aws", job(), ("run", CONFIG, "--provider", "aws"), 2, "Invalid value for '--provider'"),
    Row("run-gpus-9", job(), (*RUN, "--gpus", "9"), 2, "Invalid value for '--gpus'"),
    Row("run-offers-0", job(), (*RUN, "--max-offers", "0"), 2, "'--max-offers': '0' is not a whole number from 1"),
    Row("run-retries-1.5", job(), (*RUN, "--max-retries", "1.5"), 2, "'--max-retries': '1.5' is not a whole"),
    Row("run-identity", job(), (*SSH, "--identity", "/no/key"), 2, "'--identity': File '/no/key' does not exist"),
    Row("run-ssh-host", job(), (*SSH, "--host", "me@box:port"), 2, "expected user@host[:port], got 'me@box:port'"),
    Row("run-local-config", training("learning_rate = nan"), LOCAL, 2, "learning_rate in [training]"),
    Row("run-deadline-text", job(), (*RUN, "--deadline", "tomorrow"), 2, "'tomorrow' is not a time: give HH:MM"),
    Row("run-deadline-past", job(), (*RUN, "--deadline", "2020-01-01 07:00"), 2, "'2020-01-01 07:00' has passed"),
    Row("run-deadline-25h", job(), (*RUN, "--deadline", "25:00"), 2, "'25:00' is not a time"),
    Row("run-parallel-0", job(), (*RUN, "--parallel", "0"), 2, "'--parallel': '0' is not a whole number from 1"),
    Row("run-parallel-one", job(), (*LOCAL, "--parallel", "2"), 2, "--parallel spreads a queue"),
    Row("run-notify-scheme", job(), (*RUN, "--notify", "nosuch://x/secret"), 2, "--notify #1"),
    Row("costs-since-text", job(), ("costs", "--since", "yesterday"), 2, "'yesterday'"),
    Row("queue-twice", job(), ("run", CONFIG, CONFIG, "--provider", "vast"), 2, "config.toml more than once"),
    Row("queue-local", job(), ("run", CONFIG, "{job}/dataset", "--provider", "local"), 2, "a folder with no .toml"),
    Row("continue-epochs-0", job(), ("continue", "nojob", "--epochs", "0"), 2, "'--epochs': '0' is not a whole"),
    Row("offers-dataset", data(add_file("2_zed/c.png", b"x")), OFFERS, 2, "c.png: cannot be decoded as an image"),
    Row("estimate-config", training('output_name = "../x"'), ESTIMATE, 2, "output_name in [training]"),
    Row("json-config", training("learning_rate = nan"), JSON, 2, f"learning_rate in [training]: {FINITE}"),
    Row("init-traversal", job(), (*INIT, "--trigger", "../x"), 2, "Invalid value for --trigger"),
    Row("init-newline", job(), (*INIT, "--trigger", "zed\n"), 2, "Invalid value for --trigger"),
    Row("init-repeats", job(), (*INIT, "--repeats", "99999999999"), 2, "Invalid value for '--repeats'"),
    # ---- environment variables ----
    Row(
        "env-poll-word",
        job(),
        RUN,
        2,
        "RENTRAIN_POLL_SECONDS='soon' is not a number",
        env=(("RENTRAIN_POLL_SECONDS", "soon"),),
    ),
    Row(
        "env-lost-nan",
        job(),
        RUN,
        2,
        "RENTRAIN_SSH_LOST_SECONDS='nan' is not",
        env=(("RENTRAIN_SSH_LOST_SECONDS", "nan"),),
    ),
    Row(
        "env-setup-0",
        job(),
        CHECK,
        2,
        "RENTRAIN_SETUP_TIMEOUT_SECONDS='0' is not",
        env=(("RENTRAIN_SETUP_TIMEOUT_SECONDS", "0"),),
    ),
    Row(
        "env-http-inf",
        job(),
        OFFERS,
        2,
        "RENTRAIN_HTTP_TIMEOUT_SECONDS='inf' is not",
        env=(("RENTRAIN_HTTP_TIMEOUT_SECONDS", "inf"),),
    ),
    Row("env-empty-is-unset", job(), CHECK, 0, OK, env=(("RENTRAIN_POLL_SECONDS", ""),)),
]

VAST_URL = "http://127.0.0.1:9"


@pytest.fixture
def vast(monkeypatch: pytest.MonkeyPatch) -> Iterator[responses.RequestsMock]:
    """Vast with a key, at a closed port, behind the `responses` mock: a request that a row does not answer
    is recorded and fails."""
    monkeypatch.setenv("VAST_API_KEY", "test-key-not-real")
    monkeypatch.setenv("RENTRAIN_VAST_URL", VAST_URL)
    monkeypatch.setenv("COLUMNS", "1000")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def test_row_ids_are_unique() -> None:
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_refused_before_renting(tmp_path: Path, vast: responses.RequestsMock, row: Row) -> None:
    job_dir = row.build(tmp_path)
    if row.vast_offers is not None:
        vast.add(responses.POST, f"{VAST_URL}/bundles/", json={"offers": list(row.vast_offers)})
    result = CliRunner().invoke(main, [arg.replace("{job}", str(job_dir)) for arg in row.argv], env=dict(row.env))

    assert result.exit_code == row.code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert _flat(row.phrase) in _flat(result.output), result.output
    if "--json" in row.argv:
        json.loads(result.stdout)
    searched_only = all(call.request.url == f"{VAST_URL}/bundles/" for call in vast.calls)
    assert searched_only and (row.code != 2 or not vast.calls), [call.request.url for call in vast.calls]
    assert Ledger().jobs() == []


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)
