"""The config reference in README.md, generated from the schema so the two cannot drift apart.

`python -m rentrain.config_docs --write README.md` rewrites the block between the markers.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from remote.config import IGNORED_KOHYA_KEYS, JOB_SECTION, KEY_ALIASES, JobSettings, TrainConfig, field_section

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
RENTRAIN_ONLY = {
    "trigger_word",
    "sdxl",
    "sample_weights",
    "sample_seeds",
    "sample_steps",
    "sample_guidance_scale",
}


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined:
        return "required"
    value = info.default
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _allowed(info: FieldInfo) -> str:
    """The values a key takes: its documented rule, its choices, or the range its constraints set."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "allowed" in extra:
        return str(extra["allowed"])
    choices = [arg for arg in typing.get_args(info.annotation) if typing.get_origin(arg) is typing.Literal]
    if typing.get_origin(info.annotation) is typing.Literal or choices:
        values = typing.get_args(info.annotation) if not choices else typing.get_args(choices[0])
        return ", ".join(f"`{json.dumps(v)}`" for v in values)
    bounds = []
    for rule in info.metadata:
        if isinstance(rule, annotated_types.Ge):
            bounds.append(f">= {_number(rule.ge)}")
        elif isinstance(rule, annotated_types.Gt):
            bounds.append(f"> {_number(rule.gt)}")
        elif isinstance(rule, annotated_types.Le):
            bounds.append(f"<= {_number(rule.le)}")
        elif isinstance(rule, annotated_types.Lt):
            bounds.append(f"< {_number(rule.lt)}")
    if bounds:
        return ", ".join(bounds) + (", finite" if _is_float(info.annotation) else "")
    return "finite" if _is_float(info.annotation) else ""


def _number(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() else f"{number:g}"


def _is_float(annotation: object) -> bool:
    return annotation is float or float in typing.get_args(annotation)


def _kohya_spelling(name: str) -> str:
    aliases = [alias for alias, target in KEY_ALIASES.items() if target == name]
    if name in RENTRAIN_ONLY:
        return "rentrain only"
    return ", ".join(f"`{a}`" for a in [name, *aliases])


def config_reference() -> str:
    lines = [
        START,
        "",
        'Numbers must be finite (no `nan` or `inf`); true/false is not a number. A value outside "allowed" is an '
        "error that `rentrain check` names before anything is rented.",
        "",
        "| section | key | default | allowed | kohya spelling | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in TrainConfig.model_fields.items():
        lines.append(
            f"| [{field_section(name)}] | `{name}` | {_default(info)} | {_allowed(info)} | {_kohya_spelling(name)} "
            f"| {info.description} |"
        )
    for name, info in JobSettings.model_fields.items():
        lines.append(
            f"| [{JOB_SECTION}] | `{name}` | {_default(info)} | {_allowed(info)} | rentrain only | {info.description} |"
        )
    lines += ["", "kohya keys that load but change nothing in rentrain:", ""]
    lines += [f"- `{key}`: {why}." for key, why in IGNORED_KOHYA_KEYS.items()]
    lines += ["", END]
    return "\n".join(lines)


def rewrite(readme: Path) -> bool:
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = head + config_reference() + tail
    if updated != text:
        readme.write_text(updated, encoding="utf-8")
    return updated != text


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        print("updated" if rewrite(Path(sys.argv[2])) else "unchanged")
    else:
        print(config_reference())
