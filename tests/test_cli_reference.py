"""The generated command-line parser against its documentation: docs/cli.md is exactly the
reference the parser generates, and the README's command table names every command.

Run ``python tests/test_cli_reference.py`` to regenerate docs/cli.md after adding a field."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from steerloop.evaluation.cli import build_parser
from steerloop.evaluation.flags import add_flags, field_docs, flag_name, markdown_reference

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "cli.md"


def _subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


def test_docs_cli_md_is_the_generated_reference():
    assert REFERENCE.read_text() == markdown_reference(build_parser()) + "\n", \
        "docs/cli.md is stale: run python tests/test_cli_reference.py"


def test_readme_command_table_names_every_command():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `steerloop ([a-z-]+)", readme, flags=re.M))
    assert documented == set(_subcommands()), (sorted(documented), sorted(_subcommands()))


def test_every_config_field_is_a_flag_with_its_docstring_as_help():
    from steerloop.training.record import RecordConfig
    from steerloop.training.train import TrainConfig

    commands = _subcommands()
    for command, config in (("train", TrainConfig), ("record", RecordConfig)):
        options = {opt: action for action in commands[command]._actions for opt in action.option_strings}
        docs = field_docs(config)
        for field in dataclasses.fields(config):
            if field.name == "extra":
                continue
            action = options[flag_name(field.name)]
            assert action.help.startswith(docs[field.name].split(" (")[0][:40]), field.name


def test_a_new_field_becomes_a_flag_with_no_other_edit():
    import argparse

    @dataclasses.dataclass
    class Config:
        horizon_s: float = 3.0
        """Rollout horizon [s]."""
        names: tuple[str, ...] = ("a",)
        """Comma-separated names."""

    parser = argparse.ArgumentParser()
    add_flags(parser, Config)
    args = parser.parse_args(["--horizon-s", "1.5", "--names", "x,y"])
    assert (args.horizon_s, args.names) == (1.5, ("x", "y"))
    assert "Rollout horizon [s]. (default: 3.0)" in parser.format_help().replace("\n", " ").replace("  ", " ")


def test_every_documented_flag_parses():
    """Each flag in docs/cli.md is accepted by its command (the walk the issue asks for)."""
    commands = _subcommands()
    current = None
    for line in REFERENCE.read_text().splitlines():
        if match := re.match(r"## `steerloop ([a-z-]+)`", line):
            current = commands[match.group(1)]
        elif match := re.match(r"\| `(--[a-z-]+)", line):
            assert match.group(1) in current._option_string_actions, (current.prog, match.group(1))


if __name__ == "__main__":
    REFERENCE.write_text(markdown_reference(build_parser()) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
