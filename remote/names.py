"""The one rule for the names of files the trainer writes and the client fetches back.

`rentrain check` applies it to `output_name` before renting; the fetch side (rentrain/transport.py) applies
it to every name the instance sends. Standard library only: it runs on the laptop and on the instance.
"""

from __future__ import annotations

import re

# Letters, digits, dot, underscore and hyphen, not starting with a dot or a hyphen: safe unquoted in a
# shell, in rsync and SFTP paths, and on every file system.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # \Z: "$" would accept a trailing newline

# A stem leaves room within the usual 255-byte file-name limit for "-step00000001-state" and ".safetensors".
MAX_STEM_BYTES = 200


def file_stem_problem(stem: str) -> str | None:
    """Why `stem` cannot name the trainer's output files, or None when it can."""
    if not stem:
        return "is empty"
    size = len(stem.encode("utf-8", "surrogatepass"))
    if size > MAX_STEM_BYTES:
        return f"is {size} bytes long; at most {MAX_STEM_BYTES}"
    if not SAFE_NAME.match(stem):
        return (
            "must be a plain file name of ASCII letters, digits, '.', '_' and '-', starting with a letter or a "
            'digit (no spaces, slashes or folders), such as "my_lora"'
        )
    return None
