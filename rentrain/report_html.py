"""The building blocks of rentrain's HTML reports: the page and its style, tables, embedded images, and how
numbers read. Every text from outside our code goes through `esc` (html.escape)."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image

from rentrain.commands.offers import money
from rentrain.report_facts import EstimateCheck

# An image up to this size is embedded as it is; a larger one as a JPEG at most MAX_EMBEDDED_WIDTH wide (an SDXL
# grid PNG is tens of MB), with a link to the full-size file beside the report.
MAX_EMBEDDED_BYTES = 1_000_000
MAX_EMBEDDED_WIDTH = 2048
EMBEDDED_JPEG_QUALITY = 90
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1b1b1b; margin: 2em auto; max-width: 1100px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { padding: 0.25em 0.7em; border: 1px solid #ddd; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.9em; word-break: break-all; } .meta { color: #555; } .note { color: #555; font-style: italic; }
.error { color: #a40000; white-space: pre-wrap; } .bad { color: #a40000; font-weight: bold; } .good { color: #186a18; }
figure { margin: 1em 0; break-inside: avoid; } figcaption { color: #555; margin-bottom: 0.3em; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; } svg { max-width: 100%; height: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
@media print { body { margin: 0; max-width: none; font-size: 11pt; } a { color: inherit; } h2 { break-after: avoid; } }
"""


def esc(text: object) -> str:
    return html.escape(str(text))


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def table(headers: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """Headers are plain text (none: no header row); cells are HTML already (escape what came from outside)."""
    head = f"<tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr>\n" if headers else ""
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>\n"
        for row in rows
    )
    return f"<table>\n{head}{body}</table>\n"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>\n'


def image_data_uri(path: Path) -> str:
    """The image as a data: URI. OSError or ValueError when it cannot be read or decoded."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a truncated file fails here, not as a broken image in the browser
        if len(data) <= MAX_EMBEDDED_BYTES and data.startswith(PNG_SIGNATURE):
            return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        smaller = image.convert("RGB")
    smaller.thumbnail((MAX_EMBEDDED_WIDTH, smaller.height))
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=EMBEDDED_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def embedded_image(path: Path, caption: str, report_dir: Path) -> str:
    """A figure with the image embedded and a relative link to the file; a line saying why when it cannot be."""
    if not path.is_file():
        return f"<figure><figcaption>{esc(caption)}</figcaption>{note(f'not fetched: {path}')}</figure>\n"
    try:
        uri = image_data_uri(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"<figure><figcaption>{esc(caption)}</figcaption>{note(f'cannot be read: {path}: {exc}')}</figure>\n"
    link = esc(Path(os.path.relpath(path, report_dir)).as_posix())
    return (
        f'<figure><figcaption>{esc(caption)} · <a href="{link}">full size</a></figcaption>'
        f'<img src="{uri}" alt="{esc(caption)}"></figure>\n'
    )


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def hours(value: float) -> str:
    return duration(value * 3600)


def percent(value: float | None) -> str:
    """An error in % of the estimate, signed: "+12%"; "-" when there is none."""
    return "-" if value is None else f"{value:+.0f}%"


def step_time(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3g} s"


def check_rows(check: EstimateCheck) -> list[list[str]]:
    """Rows (label, estimate, actual) of a job's estimate against what it cost and measured, beyond time and money."""
    rows = []
    if check.bandwidth_usd:
        rows.append(["bandwidth (bytes moved x the offer's $/GB)", "-", money(check.bandwidth_usd, 4)])
    if check.error_pct is not None:
        rows.append(["error of the cost (billed + bandwidth)", "", percent(check.error_pct)])
    if check.measured_seconds_per_step is not None:
        measured, estimated = check.measured_seconds_per_step, check.estimated_seconds_per_step
        rows.append(["time per step (measured: the median after warm-up)", step_time(estimated), step_time(measured)])
        rows.append(["error of the step time", "", percent(check.speed_error_pct)])
    return rows


def size(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / 1e6:.1f} MB)"


def write_page(path: Path, text: str) -> Path:
    """Written whole or not at all: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path
