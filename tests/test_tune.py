"""`megadoc synth tune`: the rewards, and the influence reward on a tiny megatron-core checkpoint
trained here. The GRPO steps themselves (the real default generator, every reward live, the tuned
generator loaded back by the hf backend) run in the refresh-loop test of test_experiment.py."""

import json
import math

import pytest

from megadoc_megatron.cli import main
from megadoc_megatron.errors import InputError
from megadoc_megatron.tune.grpo import parse_weights
from megadoc_megatron.tune.rewards import FormatReward, LengthReward, QualityReward

pytest.importorskip("trl", reason="the tune extra (trl) is not installed")

DOCUMENTS = ["The Danube is the second-longest river in Europe. It flows east from the Black Forest to the Black Sea.",
             "Honey bees live in colonies with one queen. Workers tell each other where flowers are with a dance."]


def test_tune_refuses_an_existing_output_before_loading_anything(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "a", "text": DOCUMENTS[0]}) + "\n")
    (tmp_path / "tuned").mkdir()
    assert main(["synth", "tune", "--input", str(tmp_path / "docs.jsonl"),
                 "--output-dir", str(tmp_path / "tuned")]) == 2
    assert "the output folder exists" in capsys.readouterr().err and not any((tmp_path / "tuned").iterdir())


def test_tune_into_a_finished_output_of_the_same_settings_is_done(tmp_path):
    """A rerun after a kill that came once the generator was complete (before `megadoc run` marked the
    stage done) returns what was recorded; other settings are still refused."""
    from dataclasses import replace

    from megadoc_megatron.tune.grpo import TuneConfig, _settings, run_tune

    config = TuneConfig(input=[str(tmp_path / "docs.jsonl")], output=str(tmp_path / "tuned"), steps=3)
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned/tune.json").write_text(json.dumps({"steps": 3, "settings": _settings(config)}))
    assert run_tune(config)["steps"] == 3
    with pytest.raises(InputError, match="holds something else than a generator tuned with these settings"):
        run_tune(replace(config, steps=4))


def test_rewards_score_what_they_say():
    length, reformat, rephrase = LengthReward(5, 1.25), FormatReward(5, "reformat"), FormatReward(5, "rephrase")
    source = "x" * 100
    # the last is below the floor
    assert length(None, ["y" * 100, "y" * 200, "y" * 300, "y"], [source] * 4) == pytest.approx([1.0, 0.4, 0.0, 0.0])
    assert reformat(None, ["Topic: Rivers\nContent: The Danube flows east.", "The Danube flows east."],
                    [source] * 2) == [1, 0]
    assert rephrase(None, ["Here is the rewritten text: rivers.", "Rivers flow."], [source] * 2) == [0, 1]
    repeated = " ".join(["the river flows east"] * 10)
    quality = QualityReward(5)(None, [repeated, DOCUMENTS[0]], [DOCUMENTS[0]] * 2)
    assert quality[0] < quality[1] == 0.0  # the gain over the source
    class Exploding(LengthReward):
        def score(self, output, source):
            assert len(output) >= 5, "the floor must be applied before scoring"
            return 0.5
    assert Exploding(5)(None, ["long enough", "x"], [source] * 2) == [0.5, 0.0]
    with pytest.raises(InputError, match="NAME=WEIGHT"):
        parse_weights(["speed=1"])


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    """A tiny pre-training checkpoint (megatron-core, trained on real text)."""
    return trained_run[1]


def test_influence_reward_scores_text_and_puts_the_weights_back(checkpoint, golden_lines):
    import torch

    from megadoc_megatron.distributed import shutdown
    from megadoc_megatron.evaluate.losses import evaluation_process_group
    from megadoc_megatron.tune.rewards import InfluenceReward

    device = evaluation_process_group()
    try:
        texts = [json.loads(line)["text"] for line in golden_lines[50:57]]
        reference, unseen = texts[:6], texts[6]  # the candidate is held apart from the reference set
        reward = InfluenceReward(1, str(checkpoint), reference, device, steps=2, lr=1e-2)
        before = [p.detach().clone() for p in reward.loaded.model.parameters()]
        on_topic, noise = reward.gain(unseen), reward.gain("zq " * 40)
        assert all(torch.equal(a, b) for a, b in zip(before, reward.loaded.model.parameters()))
        assert on_topic > noise and math.isfinite(noise)  # real text of the same kind helps more than noise
        assert reward(None, ["zq " * 40], [unseen]) == [pytest.approx(noise - on_topic)]
    finally:
        shutdown()
