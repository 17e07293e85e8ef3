"""lm-eval task texts, read offline: what `megadoc eval downstream` scores and `megadoc decontaminate`
keeps out of the training data. lm-eval is imported only inside these functions (the eval extra)."""

from __future__ import annotations

import os
from typing import Iterator

from megadoc_megatron.errors import InputError


def offline() -> None:
    """Nothing may download at run time: lm-eval and datasets read caches and local files only."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"


def task_texts(tasks: list[str], include_path: str | None = None) -> Iterator[tuple[str, str]]:
    """("TASK:N", question and answer) of every evaluation document of the tasks (groups expanded)."""
    offline()
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("lm-eval task texts need lm-eval, which is not installed",
                         fix="pip install 'megadoc-megatron[eval]', or leave out --tasks") from None
    try:
        found = _load(TaskManager(include_path=include_path), tasks)
    except Exception as error:  # noqa: BLE001 - lm-eval raises many kinds for a task it cannot load
        raise InputError(f"lm-eval could not load the tasks {', '.join(tasks)}: {error}", include_path,
                         fix="name tasks whose data is in the local datasets cache, or task YAMLs in --include-path")
    for name, task in found.items():
        for number, document in enumerate(task.eval_docs):
            yield f"{name}:{number}", f"{task.doc_to_text(document)} {_answer(task, document)}".strip()


def _load(manager, tasks: list[str]) -> dict:
    """{task name: task} of the tasks, groups expanded (newer lm-eval loads them flat, older versions nest groups)."""
    if hasattr(manager, "load"):
        return manager.load(tasks)["tasks"]
    from lm_eval.tasks import get_task_dict

    def leaves(found: dict):
        for key, value in found.items():
            if isinstance(value, dict):
                yield from leaves(value)
            else:
                yield getattr(value, "task_name", None) or str(key), value
    return dict(leaves(get_task_dict(tasks, manager)))


def _answer(task, document) -> str:
    """The answer's text: multiple-choice targets are indices into the choices."""
    target = task.doc_to_target(document)
    if isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(target, int) and task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(document)
        return choices[target] if 0 <= target < len(choices) else ""
    return str(target)
