"""`megadoc megadocs`: structure and provenance of each kind; inconsistent input is refused."""

import gzip
import json

import pytest

from megadoc_megatron.blend.weights import BlendConfig, make_blend
from megadoc_megatron.cli import main
from megadoc_megatron.data.preprocess import PreprocessConfig, preprocess
from megadoc_megatron.errors import InputError
from megadoc_megatron.megadocs.assemble import MegadocsConfig, build_megadocs

G = 3


@pytest.fixture()
def corpus(tmp_path, golden_lines):
    """Eight real documents (stdlib docstrings) and G rephrase and G rationale records for each."""
    docs = [json.loads(line) for line in golden_lines[:8]]
    (tmp_path / "real.jsonl").write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    rephrases, rationales = [], []
    for d in docs:
        words = d["text"].split()
        for g in range(G):
            common = {"source_id": d["id"], "index": g, "style": "wikipedia", "prompt_version": "wikipedia/v1",
                      "generator": {"model": "test", "temperature": 1.0}}
            rephrases.append({**common, "id": f"{d['id']}#rephrase-{g}", "operation": "rephrase",
                              "text": f"Rephrase {g} of {d['id']}: " + " ".join(words[g::G])})
            split = len(d["text"]) * (g + 1) // (G + 1)
            rationales.append({**common, "id": f"{d['id']}#rationale-{g}", "operation": "rationale",
                               "text": f" thought {g} ", "split_char": split})
    write_jsonl(tmp_path / "rephrases.jsonl", rephrases[::-1])  # any order
    write_jsonl(tmp_path / "rationales.jsonl", rationales)
    return tmp_path, {d["id"]: d["text"] for d in docs}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def megadocs(tmp, kind, generations="rephrases.jsonl", *extra):
    args = ["megadocs", "--kind", kind, "--input", str(tmp / "real.jsonl"), "--generation-records",
            str(tmp / generations), "--output", str(tmp / f"{kind}.jsonl"), *extra]
    assert main(args) == 0
    return [json.loads(line) for line in (tmp / f"{kind}.jsonl").read_text().splitlines()]


def test_stitch_puts_rephrases_in_order_and_the_original_at_the_back(corpus):
    tmp, originals = corpus
    rows = megadocs(tmp, "stitch")
    assert [r["source_id"] for r in rows] == list(originals)
    for row in rows:
        source = row["source_id"]
        assert row["generation_ids"] == [f"{source}#rephrase-{g}" for g in range(G)]
        parts = row["text"].split("\n\n")
        assert parts[0].startswith(f"Rephrase 0 of {source}")
        assert row["text"].endswith("\n\n" + originals[source]) and row["original_chars"] == len(originals[source])
    summary = json.loads((tmp / "stitch.jsonl.summary.json").read_text())
    assert summary["documents"] == 8 and summary["generations"] == 8 * G and summary["generations_per_document"] == G


def test_max_generations_takes_the_first_of_each_document_and_rejects_are_skipped(corpus):
    tmp, originals = corpus
    first = json.loads((tmp / "rephrases.jsonl").read_text().splitlines()[-1])  # a second index 0, rejected
    write_jsonl(tmp / "shard-00000.rejected.jsonl", [{**first, "text": "REJECTED-TEXT", "reject_reason": "too_short"}])
    (tmp / "gens").mkdir()
    for name in ("rephrases.jsonl", "shard-00000.rejected.jsonl"):
        (tmp / name).rename(tmp / "gens" / name)
    rows = megadocs(tmp, "stitch", "gens", "--max-generations", "2")
    for row in rows:
        assert row["generation_ids"] == [f"{row['source_id']}#rephrase-{g}" for g in range(2)]
    assert json.loads((tmp / "stitch.jsonl.summary.json").read_text())["generations_per_document"] == 2
    assert "REJECTED-TEXT" not in json.dumps(rows)
    with pytest.raises(InputError, match="not possible for stretch"):
        build_megadocs(MegadocsConfig("stretch", [str(tmp / "real.jsonl")], [str(tmp / "rationales.jsonl")],
                                      str(tmp / "s.jsonl"), max_generations=1))


@pytest.mark.parametrize("position", ["front", "none"])
def test_stitch_original_front_or_none(corpus, position):
    tmp, originals = corpus
    for row in megadocs(tmp, "stitch", "rephrases.jsonl", "--original", position, "--separator", "\n<|sep|>\n"):
        original = originals[row["source_id"]]
        assert row["text"].startswith(original + "\n<|sep|>\n") if position == "front" else original not in row["text"]
        assert row["text"].count("\n<|sep|>\n") == (G if position == "front" else G - 1)


def test_simple_shuffles_every_rephrase_and_original_across_the_corpus(corpus):
    tmp, originals = corpus
    rows = megadocs(tmp, "simple", "rephrases.jsonl", "--seed", "7")
    assert len(rows) == 8 * (G + 1)
    assert sorted(r["kind"] for r in rows).count("original") == 8
    assert [r["source_id"] for r in rows] != sorted(r["source_id"] for r in rows)  # shuffled
    assert {r["text"] for r in rows if r["kind"] == "original"} == set(originals.values())
    assert megadocs(tmp, "simple", "rephrases.jsonl", "--seed", "7") == rows  # seeded
    assert len(megadocs(tmp, "simple", "rephrases.jsonl", "--original", "none")) == 8 * G


def test_stretch_interleaves_chunks_and_thoughts(corpus):
    tmp, originals = corpus
    for row in megadocs(tmp, "stretch", "rationales.jsonl"):
        original = originals[row["source_id"]]
        text = row["text"]
        assert text.count("<think>") == text.count("</think>") == G
        chunks, rest = [], text
        for g in range(G):
            before, rest = rest.split("<think>", 1)
            thought, rest = rest.split("</think>", 1)
            assert thought == f"thought {g}"
            chunks.append(before)
        assert "".join(chunks) + rest == original  # the original, cut at the split points
        assert row["generation_ids"] == [f"{row['source_id']}#rationale-{g}" for g in range(G)]


def test_compressed_inputs_and_token_statistics(corpus, spm_model, capsys):
    tmp, _ = corpus
    plain = megadocs(tmp, "stitch")
    for name in ("real.jsonl", "rephrases.jsonl"):
        (tmp / f"{name}.gz").write_bytes(gzip.compress((tmp / name).read_bytes()))
    assert main(["megadocs", "--kind", "stitch", "--input", str(tmp / "real.jsonl.gz"), "--generation-records",
                 str(tmp / "rephrases.jsonl.gz"), "--output", str(tmp / "gz.jsonl"),
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(spm_model)]) == 0
    assert "tokens/document: min" in capsys.readouterr().out
    assert [json.loads(line) for line in (tmp / "gz.jsonl").read_text().splitlines()] == plain
    summary = json.loads((tmp / "gz.jsonl.summary.json").read_text())
    assert summary["tokens_per_document"]["min"] > 0


def test_blend_counts_the_originals_inside_megadocs(corpus, spm_model):
    tmp, _ = corpus
    megadocs(tmp, "stitch")
    spm = dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(spm_model), append_eod=True, workers=1)
    preprocess(PreprocessConfig([str(tmp / "real.jsonl")], str(tmp / "real"), **spm))
    preprocess(PreprocessConfig([str(tmp / "stitch.jsonl")], str(tmp / "stitch"), **spm))
    blend = make_blend(BlendConfig([str(tmp / "real_text_document")], [str(tmp / "stitch_text_document")],
                                   0.75, 2, 64, 8, tmp / "blend"))
    summary = json.loads((tmp / "stitch.jsonl.summary.json").read_text())
    fraction = summary["original_chars"] / summary["chars"]
    assert blend.datasets[1].original_fraction == pytest.approx(fraction) and 0.4 < fraction < 0.7
    assert blend.real_epochs_inside_synthetic > 0


def bad(tmp, kind, generations):
    write_jsonl(tmp / "bad.jsonl", generations)
    config = MegadocsConfig(kind, [str(tmp / "real.jsonl")], [str(tmp / "bad.jsonl")], str(tmp / "out.jsonl"))
    with pytest.raises(InputError) as caught:
        build_megadocs(config)
    assert not (tmp / "out.jsonl").exists()
    return caught.value


def rephrase_rows(tmp):
    return [json.loads(line) for line in (tmp / "rephrases.jsonl").read_text().splitlines()]


def test_refuses_generation_without_source(corpus):
    tmp, _ = corpus
    rows = rephrase_rows(tmp)
    rows[5]["source_id"] = "no-such-document"
    error = bad(tmp, "stitch", rows)
    assert "not among the real documents" in error.message and error.line == 6


def test_refuses_uneven_generation_counts_unless_allowed(corpus):
    tmp, _ = corpus
    rows = rephrase_rows(tmp)[1:]
    error = bad(tmp, "stitch", rows)
    assert "generations while most have 3" in error.message and "--allow-uneven" in error.fix
    write_jsonl(tmp / "uneven.jsonl", rows)
    assert len(megadocs(tmp, "stitch", "uneven.jsonl", "--allow-uneven")) == 8


def test_refuses_duplicates_wrong_operation_and_missing_keys(corpus):
    tmp, _ = corpus
    rows = rephrase_rows(tmp)
    assert "second generation with index" in bad(tmp, "stitch", rows + [rows[0]]).message
    assert "built from rationale records" in bad(tmp, "stretch", rows).message
    del rows[2]["source_id"]
    error = bad(tmp, "stitch", rows)
    assert "lacks the key 'source_id'" in error.message and error.line == 3


def test_refuses_an_empty_real_corpus_before_writing(corpus):
    tmp, _ = corpus
    (tmp / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="the real documents hold no documents"):
        build_megadocs(MegadocsConfig("stitch", [str(tmp / "empty.jsonl")], [str(tmp / "rephrases.jsonl")],
                                      str(tmp / "out.jsonl")))
    assert not (tmp / "out.jsonl").exists()
