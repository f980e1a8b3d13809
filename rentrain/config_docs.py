"""The config reference in README.md, generated from the schema so the two cannot drift apart.

`python -m rentrain.config_docs --write README.md` rewrites the block between the markers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def _kohya_spelling(name: str) -> str:
    aliases = [alias for alias, target in KEY_ALIASES.items() if target == name]
    if name in RENTRAIN_ONLY:
        return "rentrain only"
    return ", ".join(f"`{a}`" for a in [name, *aliases])


def config_reference() -> str:
    lines = [START, "", "| section | key | default | kohya spelling | meaning |", "|---|---|---|---|---|"]
    for name, info in TrainConfig.model_fields.items():
        lines.append(
            f"| [{field_section(name)}] | `{name}` | {_default(info)} | {_kohya_spelling(name)} | {info.description} |"
        )
    for name, info in JobSettings.model_fields.items():
        lines.append(f"| [{JOB_SECTION}] | `{name}` | {_default(info)} | rentrain only | {info.description} |")
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
