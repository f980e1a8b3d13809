"""Every `rentrain <command> ...` that a message or a help text suggests names a real command and real
options: each suggestion found in the source is parsed by the command's own click parser."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

from providers import gpuflow
from rentrain.cli import main

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*REPO.glob("rentrain/**/*.py"), *REPO.glob("providers/*.py")])
SUGGESTION = re.compile(r"\brentrain ([a-z][a-z-]*)((?: +[^\s`\"']+)*)")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z_]*|\{X\}|<[^>]*>)$")
USAGE_START = re.compile(r"^(?:-|[A-Z][A-Z_]*$)")  # an option or a placeholder such as CONFIG
TRAILING = re.compile(r"(?:\[/[a-z ]*\]|[.,;:)])+$")


def _message_strings(path: Path) -> list[str]:
    """The module's string literals; an f-string's replacement fields become {X}."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            texts.append("".join(p.value if isinstance(p, ast.Constant) else "{X}" for p in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
            texts.append(node.value)
    return texts


def suggestions(text: str) -> list[tuple[str, list[str]]]:
    """(command, the words after it that belong to the command line) for each `rentrain <word> ...` in text
    where <word> is a command, or is followed by an option or CONFIG-like placeholder (so a wrong command
    name is caught; "a rentrain client" in prose is not a suggestion)."""
    found = []
    for match in SUGGESTION.finditer(text):
        name, words = match.group(1), match.group(2).split()
        if name in main.commands or (words and USAGE_START.match(TRAILING.sub("", words[0]))):
            found.append((name, words))
    return found


def command_line(command: click.Command, words: list[str], sample_file: Path) -> list[str]:
    """The words that form the suggested command line, placeholders replaced by values of the right type.
    Prose may name a command without its arguments ("`rentrain check --json` lists them"): missing required
    arguments and options are filled in, so that what is checked is what the text names: the command, options
    and values."""
    args: list[str] = []
    positionals = [p for p in command.params if isinstance(p, click.Argument)]
    options = {name: p for p in command.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}
    index = 0
    while index < len(words):
        word = TRAILING.sub("", words[index])
        if word.startswith("-"):
            option = options.get(word)
            args.append(word)
            if option is not None and not option.is_flag:
                index += 1
                args.append(_sample(option, TRAILING.sub("", words[index]) if index < len(words) else "", sample_file))
        elif PLACEHOLDER.match(word) and positionals:
            args.append(_sample(positionals.pop(0), word, sample_file))
        else:
            break
        index += 1
    for param in command.params:
        if isinstance(param, click.Option) and param.required and not set(param.opts) & set(args):
            args += [param.opts[0], _sample(param, "X", sample_file)]
    return args + [_sample(p, "X", sample_file) for p in positionals if p.required]


def _sample(param: click.Parameter, word: str, sample_file: Path) -> str:
    if word and not PLACEHOLDER.match(word):
        return word.split("|")[0]  # "local|vast|runpod|ssh": one of them
    if isinstance(param.type, click.Path):
        return str(sample_file)
    if isinstance(param.type, click.Choice):
        return str(param.type.choices[0])
    if param.type.name in ("integer", "number", "float"):
        return "1"
    return "job123"


def _all_suggestions() -> list[tuple[str, str, list[str]]]:
    found = [("providers/gpuflow.py REFUSAL", name, words) for name, words in suggestions(gpuflow.REFUSAL)]
    for path in SOURCES:
        for text in _message_strings(path):
            for name, words in suggestions(text):
                found.append((str(path.relative_to(REPO)), name, words))
    return found


def test_gpuflow_refusal_suggests_a_command_line_that_parses() -> None:
    assert suggestions(gpuflow.REFUSAL), "GPUFlow's refusal should tell the user what to run instead"


def test_the_extractor_catches_a_wrong_option_and_a_wrong_command(tmp_path: Path) -> None:
    sample = tmp_path / "config.toml"
    sample.write_text("", encoding="utf-8")
    ((name, words),) = suggestions("run it with: rentrain run --provider ssh --config CONFIG")
    with pytest.raises(click.UsageError, match="--config"):
        main.commands[name].make_context(name, command_line(main.commands[name], words, sample))
    assert suggestions("try rentrain statsu --all") == [("statsu", ["--all"])]


def _row_id(value: str | list[str]) -> str:
    return value if isinstance(value, str) else " ".join(value)


@pytest.mark.parametrize(("where", "name", "words"), _all_suggestions(), ids=_row_id)
def test_suggested_command_lines_parse(tmp_path: Path, where: str, name: str, words: list[str]) -> None:
    sample = tmp_path / "config.toml"
    sample.write_text("", encoding="utf-8")
    command = main.commands.get(name)
    assert command is not None, f"{where} suggests `rentrain {name}`, which is not a command"
    args = command_line(command, words, sample)
    try:
        command.make_context(name, args)
    except click.UsageError as exc:
        pytest.fail(f"{where} suggests `rentrain {name} {' '.join(words)}`: {exc.format_message()}")
