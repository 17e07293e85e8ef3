"""Real English text every machine has: the docstrings of the Python standard library.

Used by the CPU example and the benchmarks, so they run on a fresh machine without
downloading anything. Sources are parsed with `ast`, never imported.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_documents(min_chars: int = 200) -> Iterator[dict]:
    """One {"id", "text"} document per standard-library module: its docstrings, in source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old sources
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docstrings = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, DOCUMENTED)]
        text = "\n\n".join(doc for doc in docstrings if doc)
        if len(text) >= min_chars:
            yield {"id": str(relative), "text": text}


def is_heldout(document_id: str, fraction: float) -> bool:
    """A stable train/held-out split by a hash of the document id (same answer on every machine)."""
    digest = hashlib.sha256(document_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
