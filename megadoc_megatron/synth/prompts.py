"""The prompt catalogue: named, versioned prompts for each generation operation.

A prompt's version is a hash of its text, so every record says exactly which words produced
it, and editing a prompt can never be mistaken for the old one. Users add styles from a YAML
file (`--prompts FILE`) without editing code:

    my_style:                 # a rephrase style: the text holds {document}
      prompt: "Rewrite this as a news report:\\n\\n{document}"
    my_thoughts:              # a rationale style: the text holds {prefix} and {suffix}
      operation: rationale
      prompt: "..."
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import read_utf8

PLACEHOLDERS = {"rephrase": ("{document}",), "rationale": ("{prefix}", "{suffix}"), "textbook": ("{document}",)}
_PLACEHOLDER = re.compile(r"\{(document|prefix|suffix)\}")


@dataclass(frozen=True)
class Prompt:
    style: str
    operation: str
    text: str

    @property
    def version(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def render(self, **values: str) -> list[dict]:
        """Chat messages with the placeholders filled in one pass (text in a value is never re-read)."""
        return [{"role": "user", "content": _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)}]


_REPHRASE = {
    "wikipedia": "Rewrite the following text as a passage of a high-quality encyclopedia article in clear, "
                 "neutral English. Keep every fact, name and number; do not add facts that are not in the text. "
                 "Answer with the rewritten passage only.\n\nText:\n{document}",
    "easy": "Rewrite the following text so that a young child could follow it: short sentences and everyday "
            "words. Keep the facts; do not invent new ones. Answer with the rewritten text only.\n\nText:\n{document}",
    "hard": "Rewrite the following text in terse, precise scholarly language, as it might appear in a research "
            "paper. Keep every fact and number. Answer with the rewritten text only.\n\nText:\n{document}",
    "qa": "Turn the following text into a conversation of questions and answers that together cover all of its "
          "information. Write each turn on its own line, as 'Question: ...' followed by 'Answer: ...'.\n\n"
          "Text:\n{document}",
    "distill": "Condense the following text into a short, clear paragraph that keeps its essential facts and "
               "drops repetition and filler. Answer with the paragraph only.\n\nText:\n{document}",
    "knowledge_list": "Extract the knowledge in the following text as a bulleted list: one fact, definition or "
                      "relation per line, each understandable on its own. Answer with the list only.\n\n"
                      "Text:\n{document}",
    "faithful_rephrase": "Paraphrase the following text sentence by sentence. Preserve its meaning, order, facts "
                         "and level of detail exactly; change only the wording. Answer with the paraphrase only."
                         "\n\nText:\n{document}",
    "reformat_entries": "Reorganize the following text into entries. For each topic it covers write one entry as "
                        "'Topic: <a short title>' on one line and 'Content: <what the text says about it>' on the "
                        "next, with a blank line between entries. Use only information from the text.\n\n"
                        "Text:\n{document}",
}
_RATIONALE = {
    "rationale": "Here is the beginning of a document:\n\n{prefix}\n\nHere is how it continues:\n\n{suffix}\n\n"
                 "Write the reasoning a careful reader would go through at the point where the beginning ends: "
                 "what has been established so far, what it implies, and why the continuation follows from it. "
                 "Write the thoughts only, not the continuation itself.",
}

# Demystifying synthetic data's third data type: new text on the document's topic, not a rewrite of it.
_TEXTBOOK = {
    "textbook": "Read the following text to find its topic. Then write a section of a textbook that teaches that "
                "topic to a student: explain the key ideas step by step, define the terms you use, and give a worked "
                "example. Write in your own words; do not copy or paraphrase the text. Answer with the section "
                "only.\n\nText:\n{document}",
}

BUILTIN = {**{name: Prompt(name, "rephrase", text) for name, text in _REPHRASE.items()},
           **{name: Prompt(name, "rationale", text) for name, text in _RATIONALE.items()},
           **{name: Prompt(name, "textbook", text) for name, text in _TEXTBOOK.items()}}
DEFAULT_STYLE = {"rephrase": "wikipedia", "rationale": "rationale", "textbook": "textbook"}


def load_catalogue(path: str | None = None) -> dict[str, Prompt]:
    """The built-in prompts plus those of a user's YAML file (which may not redefine a built-in)."""
    catalogue = dict(BUILTIN)
    if path is None:
        return catalogue
    import yaml

    try:
        entries = yaml.safe_load(read_utf8(path))
    except OSError as error:
        raise InputError(f"cannot read the prompt file: {error.strerror}", path,
                         fix="pass an existing YAML file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise InputError(f"invalid YAML: {getattr(error, 'problem', error)}", path, mark.line + 1 if mark else None,
                         fix="fix the YAML syntax") from None
    if not isinstance(entries, dict):
        raise InputError("expected a mapping of style name -> {prompt, operation}", path,
                         fix="see `megadoc synth styles --help` for the format")
    for name, entry in entries.items():
        catalogue[name] = _user_prompt(name, entry, path)
    return catalogue


def _user_prompt(name, entry, path) -> Prompt:
    if name in BUILTIN:
        raise InputError(f"style {name!r} is built in", path, fix="give your style another name")
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise InputError(f"style {name!r} needs a 'prompt' string", path, fix=f"write {name}: {{prompt: '...'}}")
    operation = entry.get("operation", "rephrase")
    if operation not in PLACEHOLDERS:
        raise InputError(f"style {name!r} has operation {operation!r}", path,
                         fix=f"use one of {', '.join(PLACEHOLDERS)}")
    unknown = set(entry) - {"prompt", "operation"}
    if unknown:
        raise InputError(f"style {name!r} has unknown keys {sorted(unknown)}", path,
                         fix="keep only prompt and operation")
    foreign = sorted({m.group(0) for m in _PLACEHOLDER.finditer(entry["prompt"])} - set(PLACEHOLDERS[operation]))
    if foreign:
        raise InputError(f"the {operation} prompt {name!r} uses {', '.join(foreign)}, which {operation} does not fill",
                         path, fix=f"a {operation} prompt takes {' and '.join(PLACEHOLDERS[operation])}")
    missing = [p for p in PLACEHOLDERS[operation] if p not in entry["prompt"]]
    if missing:
        raise InputError(f"the {operation} prompt {name!r} lacks {', '.join(missing)}", path,
                         fix=f"put {' and '.join(PLACEHOLDERS[operation])} where the text goes")
    return Prompt(name, operation, entry["prompt"])


def select_styles(catalogue: dict[str, Prompt], operation: str, styles: list[str] | None) -> list[Prompt]:
    styles = styles or [DEFAULT_STYLE[operation]]
    chosen = []
    for style in styles:
        prompt = catalogue.get(style)
        if prompt is None or prompt.operation != operation:
            known = sorted(n for n, p in catalogue.items() if p.operation == operation)
            raise InputError(f"no {operation} style named {style!r}", fix=f"choose from {', '.join(known)}, "
                                                                            "or add it with --prompts FILE")
        chosen.append(prompt)
    return chosen
