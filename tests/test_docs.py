"""The docs against the code: the generated references are current, the README stays a landing page
whose links resolve, and CI runs exactly the README's test command."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "make_docs_reference.py"
README = ROOT / "README.md"


def _tool():
    spec = importlib.util.spec_from_file_location("make_docs_reference", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_references_match_the_code():
    tool = _tool()
    for path, text in tool.outputs().items():
        name = path.relative_to(ROOT)
        assert path.exists(), f"{name} is missing: run python tools/make_docs_reference.py to update"
        committed = path.read_text(encoding="utf-8")
        assert committed == text, (f"{name} differs from the code (argparse parsers, config dataclasses): "
                                   "run python tools/make_docs_reference.py to update")


def test_references_do_not_depend_on_the_machine(monkeypatch):
    texts = set()
    for cores in (2, 96):  # e.g. a default of os.cpu_count() would differ
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        texts.add(_tool().cli_reference())
    assert len(texts) == 1


def test_cli_reference_leaves_out_suppressed_options():
    text = _tool().cli_reference()
    assert "### `megadoc run`" in text and "#### `megadoc eval loss`" in text and "`megadoc synth rephrase`" in text
    assert "--array-task" not in text  # internal to --execute slurm (help=argparse.SUPPRESS)


def test_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; a landing page has at most 200: move text to docs/"


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith("#") or target.startswith("mailto:"):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.exists(), f"README.md links to {target}, which does not exist"


def test_ci_runs_the_readme_test_command_first():
    readme = README.read_text(encoding="utf-8")
    commands = [line for line in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in line.splitlines()]
    test_command = [c for c in commands if "python -m pytest -q" in c]
    assert len(test_command) == 1, "the README shows one test command, with `python -m pytest -q`"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    first = next(line for line in ci if line and not line.startswith(("#", "set ", "cd ")))
    assert first == test_command[0], ".ci/run's first command must be exactly the README's test command"
    assert "mkdocs build --strict" in "\n".join(ci), ".ci/run builds the docs with warnings as errors"
    if '-m "not slow"' in first:
        assert "python -m pytest -q -m slow" in "\n".join(ci), ".ci/run runs the slow tests the README leaves out"


def _documented_commands():
    """(file, `megadoc ...` command) for every command in the README and docs/: code-block lines (with
    their backslash continuations) and inline code spans."""
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        if "reference" in page.relative_to(ROOT).parts:
            continue  # generated from the parsers themselves
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                found = re.search(r"(?:^|[\s;&|(])(megadoc \S.*)$", line)
                if found:
                    yield page.name, " ".join(found.group(1).split(" # ")[0].split())
        for span in re.findall(r"`(megadoc [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            yield page.name, " ".join(span.split())


def test_documented_commands_use_visible_options():
    """Every option a documented `megadoc` command uses is one its parser shows in --help: not a typo,
    not a hidden (deprecated or internal) spelling."""
    import argparse

    from megadoc_megatron.cli import build_parser

    def options(parser):
        return {s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings}

    def subcommands(parser):
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    def all_options(parser):
        """A parser's options, or for a command group named without its subcommand (`megadoc synth
        OPERATION ...`), those of any of its subcommands."""
        found = options(parser)
        for sub in subcommands(parser).values():
            found |= all_options(sub)
        return found

    root = build_parser()
    problems = []
    for page, command in _documented_commands():
        parser = root
        try:
            tokens = shlex.split(command)[1:]
        except ValueError:  # an unbalanced quote in prose
            tokens = command.split()[1:]
        for token in tokens:
            token = token.strip("[]'\"`,;()")
            if token in subcommands(parser):
                parser = subcommands(parser)[token]
            elif token.startswith("--") and len(token) > 2 and " " not in token:  # not a quoted value
                name = token.split("=")[0]
                if name not in all_options(parser):
                    problems.append(f"{page}: `{command}`: {name} is not an option of `{parser.prog}`")
    assert not problems, "\n".join(problems)
