"""One CLI vocabulary: old spellings still parse (hidden, with a note), --help shows defaults in every
(nested) subcommand, a unified flag means one thing everywhere, and `megadoc run` keeps its stage keys."""

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest

from megadoc_megatron.cli import RENAMED, HelpFormatter, build_parser, parser_tree
from megadoc_megatron.experiment.stages import Graph, Stage

REPO = Path(__file__).resolve().parent.parent
PARSERS = dict(parser_tree(build_parser()))

# a valid command line of every parser with renamed flags, giving each of its (new) flags
ARGV = {
    "synth rephrase": ["--input", "a.jsonl", "--output-dir", "out", "--dry-run"],
    "synth rationale": ["--input", "a.jsonl", "--output-dir", "out", "--dry-run"],
    "synth textbook": ["--input", "a.jsonl", "--output-dir", "out", "--dry-run"],
    "synth tune": ["--input", "a.jsonl", "--output-dir", "out"],
    "megadocs": ["--kind", "stitch", "--input", "a.jsonl", "--generation-records", "synth", "--output", "m.jsonl"],
    "merge": ["--data-path", "a_text_document", "--output-prefix", "b", "--seed", "7"],
    "blend": ["--real-data-path", "r", "--synthetic-data-path", "s", "-w", "0.5", "-E", "2", "--seq-length", "8",
              "--global-batch-size", "2", "--valid-data-path", "v", "--output-dir", "out"],
    "train": ["train.yaml", "--dry-run"],
    "eval loss": ["ckpt", "--valid-data-path", "h", "--micro-batch-size", "8", "--eval-name", "n"],
    "eval long-context": ["ckpt", "--valid-data-path", "h", "--micro-batch-size", "8", "--eval-name", "n"],
    "eval ensemble": ["ckpt", "--valid-data-path", "h", "--micro-batch-size", "8", "--eval-name", "n"],
    "eval downstream": ["ckpt", "--eval-name", "n"],
    "report": ["run1", "--output-dir", "out"],
}
RENAMES = [(path, old, new) for path, renamed in RENAMED.items() for old, new in renamed.items()]


def respelled(argv: list[str], new: str, old: str) -> list[str]:
    assert new in argv, f"add {new} to ARGV[...] of its parser"
    return [old if token == new else token for token in argv]


@pytest.mark.parametrize("path,old,new", RENAMES)
def test_an_old_spelling_parses_as_the_new_one_with_a_note(path, old, new, capsys):
    argv = [*path.split(), *ARGV[path]]
    assert build_parser().parse_args(respelled(argv, new, old)) == build_parser().parse_args(argv)
    assert capsys.readouterr().err.splitlines() == [f"megadoc {path}: {old} is deprecated, use {new}"]


@pytest.mark.parametrize("path,old,new", RENAMES)
def test_an_old_spelling_is_hidden_from_help(path, old, new):
    assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", PARSERS[path].format_help())
    assert new in PARSERS[path].format_help()


def test_an_old_spelling_with_equals_and_once_per_parser(capsys):
    parser = build_parser()
    old = parser.parse_args(["merge", "--input=a", "--output-prefix", "b", "--sample-seed=3"])
    again = parser.parse_args(["merge", "--input", "a", "--output-prefix", "b", "--sample-seed", "3"])
    assert old == again and (old.data_path, old.seed) == (["a"], 3)
    assert capsys.readouterr().err.count("deprecated") == 2  # --input and --sample-seed, each noted once


def test_required_flags_stay_required_and_values_after_a_double_dash_are_kept(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["megadocs", "--kind", "stitch", "--generation-records", "g", "--output", "o"])
    assert "the following arguments are required: --input" in capsys.readouterr().err
    args = build_parser().parse_args(["report", "--output-dir", "out", "--", "--output"])
    assert args.runs == ["--output"]


def test_the_parser_tree_reaches_every_nested_subcommand():
    assert {"", "synth", "synth rephrase", "synth tune", "synth styles", "eval", "eval loss", "eval fit",
            "megadocs", "run", "sweep"} <= PARSERS.keys()
    assert all(parser.formatter_class is HelpFormatter for parser in PARSERS.values())


def options_with_defaults():
    for path, parser in PARSERS.items():
        for action in parser._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS and not (
                    action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS)):
                yield pytest.param(parser, action, id=f"{path or 'megadoc'} {action.option_strings[-1]}")


@pytest.mark.parametrize("parser,action", options_with_defaults())
def test_help_shows_every_default(parser, action):
    formatter = parser.formatter_class(prog=parser.prog)
    formatter.add_argument(action)
    shown = repr(action.default) if isinstance(action.default, str) and not action.default.isprintable() \
        else str(action.default)
    assert f"(default: {shown})" in " ".join(formatter.format_help().split())


@pytest.mark.parametrize("path", list(PARSERS))
def test_help_does_not_show_defaults_that_say_nothing(path):
    assert not re.search(r"\(default: (None|False|\[\]|)\)", PARSERS[path].format_help())


# the unified flags: what each means in every subcommand that has it
MEANING = {
    "--input": lambda action: "JSONL" in action.help,
    "--generation-records": lambda action: "megadoc synth" in action.help,
    "--held-out": lambda action: "JSONL" in action.help,
    "--data-path": lambda action: "prefix" in action.help,
    "--real-data-path": lambda action: "prefix" in action.help,
    "--synthetic-data-path": lambda action: "prefix" in action.help,
    "--valid-data-path": lambda action: "prefix" in action.help,
    "--output-dir": lambda action: "folder" in action.help,
    "--output": lambda action: "file" in action.help,
    "--output-prefix": lambda action: "prefix" in action.help.lower(),
    "--generations": lambda action: action.type is int,
    "--dry-run": lambda action: isinstance(action, argparse._StoreTrueAction),
    "--seed": lambda action: action.type is int,
    "--micro-batch-size": lambda action: action.type is int,
    "--eval-name": lambda action: "name" in action.help,
}


def test_every_renamed_flag_has_a_meaning():
    assert {new for _, _, new in RENAMES} <= MEANING.keys()


@pytest.mark.parametrize("flag", list(MEANING))
def test_a_unified_flag_means_the_same_in_every_subcommand(flag):
    users = {path: action for path, parser in PARSERS.items() for action in parser._actions
             if flag in action.option_strings}
    assert users, f"no subcommand has {flag}"
    assert [path for path, action in users.items() if not MEANING[flag](action)] == []


@pytest.mark.parametrize("path,old,new", RENAMES)
def test_stage_keys_hash_the_old_spelling(tmp_path, path, old, new):
    graph = Graph(tmp_path)
    argv = [*path.split(), *ARGV[path]]
    assert graph.key(Stage("s", [argv])) == graph.key(Stage("s", [respelled(argv, new, old)]))


SCRIPTS = {
    "eval.sbatch": {"CHECKPOINTS": "runs/a/ckpt", "DATA": "data/held"},
    "preprocess.sbatch": {"INPUT": "real/a.jsonl", "PREFIX": "data/real", "TOKENIZER_MODEL": "/models/tok"},
    "run.sbatch": {"CONFIG": "exp.yaml"},
    "synth.sbatch": {"INPUT": "real/a.jsonl", "OUTPUT": "synth/out", "MODEL": "/models/gen"},
    "train.sbatch": {"CONFIG": "train.yaml", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"},
}


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "examples/slurm").glob("*.sbatch")))
def test_slurm_scripts_take_the_dry_run_flag(script):
    env = {**{k: v for k, v in os.environ.items() if k != "DRY_RUN"}, **SCRIPTS[script]}
    path = str(REPO / "examples/slurm" / script)
    flag = subprocess.run(["bash", path, "--dry-run"], env=env, capture_output=True, text=True, check=True).stdout
    variable = subprocess.run(["bash", path], env={**env, "DRY_RUN": "1"}, capture_output=True, text=True,
                              check=True).stdout
    assert flag == variable and "megadoc_megatron.cli" in flag
