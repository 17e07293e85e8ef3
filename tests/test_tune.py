"""`megadoc synth tune`: GRPO (TRL) steps of the real default generator with every reward live,
the influence reward on a tiny megatron-core checkpoint trained here, and the tuned generator
loaded back by the hf backend."""

import json
import math

import pytest

from megadoc_megatron.cli import main
from megadoc_megatron.errors import InputError
from megadoc_megatron.synth.rewards import FormatReward, LengthReward, QualityReward
from megadoc_megatron.synth.tune import REWARDS, parse_weights

from conftest import run_training, write_config

pytest.importorskip("trl", reason="the tune extra (trl) is not installed")

DOCUMENTS = ["The Danube is the second-longest river in Europe. It flows east from the Black Forest to the Black Sea.",
             "Honey bees live in colonies with one queen. Workers tell each other where flowers are with a dance."]


def test_rewards_score_what_they_say():
    length, reformat, rephrase = LengthReward(5, 1.25), FormatReward(5, "reformat"), FormatReward(5, "rephrase")
    source = "x" * 100
    assert length(None, ["y" * 100, "y" * 200, "y" * 300, "y"], [source] * 4) == pytest.approx([1.0, 0.4, 0.0, 0.0])  # last: floor
    assert reformat(None, ["Topic: Rivers\nContent: The Danube flows east.", "The Danube flows east."], [source] * 2) == [1, 0]
    assert rephrase(None, ["Here is the rewritten text: rivers.", "Rivers flow."], [source] * 2) == [0, 1]
    repeated = " ".join(["the river flows east"] * 10)
    quality = QualityReward(5)(None, [repeated, DOCUMENTS[0]], [DOCUMENTS[0]] * 2)
    assert quality[0] < quality[1] == 0.0  # the gain over the source
    with pytest.raises(InputError, match="NAME=WEIGHT"):
        parse_weights(["speed=1"])


def test_grpo_steps_with_every_reward_live_and_the_tuned_generator_loads(tmp_path, blend_json, golden_lines):
    from megadoc_megatron.synth.backends import HFBackend, Request, Sampling

    run_training(write_config(tmp_path, blend_json, tmp_path / "ckpt"))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                                                 for i, t in enumerate(DOCUMENTS)))
    (tmp_path / "reference.jsonl").write_text(b"".join(golden_lines[50:56]).decode())
    assert main(["synth", "tune", "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "tuned"),
                 "--checkpoint", str(tmp_path / "ckpt"), "--reference", str(tmp_path / "reference.jsonl"),
                 "--steps", "2", "--num-generations", "2", "--max-new-tokens", "16", "--floor-chars", "10",
                 "--learning-rate", "1e-5"]) == 0
    logged = [json.loads(line) for line in (tmp_path / "tuned" / "rewards.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    for entry in logged:
        for name in REWARDS:
            assert math.isfinite(entry[f"rewards/{name}/mean"]), (name, entry)
    record = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert record["weights"] == {name: 1.0 for name in REWARDS} and record["checkpoint"] == str(tmp_path / "ckpt")
    backend = HFBackend(str(tmp_path / "tuned"), batch_size=1)
    [completion] = backend.generate([Request([{"role": "user", "content": "Name a river."}], 0)], Sampling(0.7, 0.9, 8))
    assert completion.completion_tokens > 0
