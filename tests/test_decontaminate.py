"""Near-duplicates by n-gram overlap (data/overlap.py) and `megadoc decontaminate`, with planted overlaps."""

import json

import numpy as np
import pytest

from megadoc_megatron.cli import main
from megadoc_megatron.data.overlap import NgramIndex, text_units


def test_overlap_is_shared_n_grams_over_the_smaller_documents_n_grams():
    rng = np.random.default_rng(0)
    references = [rng.integers(0, 5000, size=length) for length in (300, 200, 100, 8)]
    index = NgramIndex(references, 13)
    queries = [rng.integers(0, 5000, size=300),                                   # unrelated
               references[0].copy(),                                              # an exact copy
               np.concatenate([rng.integers(0, 5000, 500), references[1], rng.integers(0, 5000, 50)]),  # holds one
               references[2][:50],                                                # half of one, inside it
               np.concatenate([references[0][:113], rng.integers(0, 5000, 900)]),  # 101 of 288 13-grams
               references[3].copy(),                                              # a short document, whole
               references[3][:7]]                                                 # short, but not the same
    found = {o.query: o for o in index.overlaps(queries)}
    assert sorted(found) == [1, 2, 3, 4, 5]
    assert [(found[q].reference, found[q].fraction) for q in (1, 2, 3, 5)] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]
    assert found[4].reference == 0 and found[4].shared == 101 and found[4].fraction == pytest.approx(101 / 288)


def test_text_units_ignore_case_and_punctuation():
    assert np.array_equal(text_units("Return the Value, please!"), text_units("return the value please"))


def _words(text: str, count: int) -> str:
    return " ".join(text.split()[:count])


@pytest.fixture()
def planted(tmp_path, golden_lines):
    """A held-out set of real documents and synthetic records, some of which quote it."""
    texts = [t for t in (json.loads(line)["text"] for line in golden_lines) if len(t.split()) > 300]
    held_out = [{"id": f"held-{i}", "text": _words(t, 250)} for i, t in enumerate(texts[:4])]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(d) + "\n" for d in held_out))
    clean = _words(texts[10], 300)
    records = [
        {"id": "clean", "text": clean},
        {"id": "megadoc", "text": f"{_words(texts[11], 200)}\n\n{held_out[1]['text']}\n\n{_words(texts[12], 200)}"},
        {"id": "memorized-half", "text": _words(held_out[2]["text"], 150)},
        {"id": "one-phrase", "text": f"{clean} {_words(held_out[3]['text'], 14)}"},  # 2 shared 13-grams: kept
        {"id": "short", "text": "Return the value."},
    ]
    path = tmp_path / "megadocs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path, path, records


def test_decontaminate_reports_and_drops_the_records_that_quote_held_out_documents(planted, capsys):
    tmp_path, path, records = planted
    report, output = tmp_path / "report.json", tmp_path / "clean.jsonl"
    assert main(["decontaminate", str(path), "--held-out", str(tmp_path / "held_out.jsonl"), "--report", str(report),
                 "--output", str(output)]) == 0
    summary = json.loads(report.read_text())
    assert (summary["records"], summary["contaminated"], summary["references"]) == (5, 2, 4)
    assert summary["by_reference"] == {"held-1": 1, "held-2": 1}
    examples = {e["record"]: e for e in summary["examples"]}
    assert examples["megadoc"]["overlap"] == 1.0 and examples["memorized-half"]["line"] == 3
    assert examples["megadoc"]["quote"] in records[1]["text"] and len(examples["megadoc"]["quote"].split()) == 13
    kept = path.read_text().splitlines(keepends=True)
    assert output.read_text() == "".join(kept[i] for i in (0, 3, 4))  # the others, byte for byte
    assert "2 of 5 records quote held-out text" in capsys.readouterr().out

    assert main(["decontaminate", str(path), "--held-out", str(tmp_path / "held_out.jsonl"), "--report", str(report),
                 "--overlap-threshold", "0.01"]) == 0  # two shared 13-grams of 238 are over 1%
    assert json.loads(report.read_text())["contaminated"] == 3


def test_decontaminate_checks_lm_eval_task_texts(planted, tmp_path):
    pytest.importorskip("lm_eval")
    _, path, _ = planted
    questions = [{"question": "Which organ of the human body pumps blood through the arteries and the veins?",
                  "choices": ["the heart", "the liver"], "answer": 0},
                 {"question": "What is the name of the process by which green plants turn light into sugar?",
                  "choices": ["digestion", "photosynthesis"], "answer": 1}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "qa.yaml").write_text(
        "task: megadoc_planted_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'qa.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    leaked = tmp_path / "leaked.jsonl"
    leaked.write_text(path.read_text() + json.dumps(
        {"id": "quiz", "text": "A quiz. Question: What is the name of the process by which green plants turn light "
                               "into sugar? Answer: photosynthesis. That is all."}) + "\n")
    report = tmp_path / "report.json"
    assert main(["decontaminate", str(leaked), "--held-out", str(tmp_path / "held_out.jsonl"), "--report", str(report),
                 "--tasks", "megadoc_planted_qa", "--include-path", str(tmp_path / "tasks")]) == 0
    summary = json.loads(report.read_text())
    assert summary["references"] == 4 + 2
    assert summary["by_reference"] == {"held-1": 1, "held-2": 1, "megadoc_planted_qa:1": 1}


def test_a_record_without_text_is_one_error_and_nothing_is_written(planted, capsys):
    tmp_path, path, _ = planted
    path.write_text(path.read_text() + json.dumps({"id": "broken", "body": "no text"}) + "\n")
    report, output = tmp_path / "report.json", tmp_path / "clean.jsonl"
    assert main(["decontaminate", str(path), "--held-out", str(tmp_path / "held_out.jsonl"), "--report", str(report),
                 "--output", str(output)]) == 2
    assert f"{path}:6: record lacks the key 'text'" in capsys.readouterr().err
    assert not report.exists() and not output.exists() and not list(tmp_path.glob("*.tmp"))
