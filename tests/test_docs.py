"""The docs against the code: the generated references are current, the README stays a landing page
whose links resolve, and CI runs exactly the README's test command."""

from __future__ import annotations

import importlib.util
import re
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


def test_references_do_not_depend_on_the_machine():
    text = _tool().cli_reference()
    assert "`os.cpu_count()`" in text  # preprocess --workers, written as its expression
    assert str(_tool().CPU_SENTINEL) not in text


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
    test_command = [c for c in commands if c.rstrip().endswith("python -m pytest -q")]
    assert len(test_command) == 1, "the README shows one test command ending in `python -m pytest -q`"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    first = next(line for line in ci if line and not line.startswith(("#", "set ", "cd ")))
    assert first == test_command[0], ".ci/run's first command must be exactly the README's test command"
    assert "mkdocs build --strict" in "\n".join(ci), ".ci/run builds the docs with warnings as errors"
