"""What an expert trains on (mocae.experts.dataset), as the recipe measurements need it."""

from pathlib import Path

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def test_training_prompts_are_the_sft_rows_or_the_preference_prompts(monkeypatch):
    from mocae.data import normalise_text
    from mocae.experts.config import ExpertConfig
    from mocae.experts.dataset import select_examples, training_prompts

    monkeypatch.setenv("MOCAE_DATA_DIR", str(FIXTURE_DATA))
    sft = ExpertConfig(axis="honest", backbone="tiny-random", max_examples=4)
    assert training_prompts(sft) == {normalise_text(e.prompt) for e in select_examples(sft)} != set()
    monkeypatch.setattr("mocae.experts.preference.preference_prompts",
                        lambda cfg, data_dir=None: [{"prompt": "  Is the Earth FLAT? "}, {"prompt": "b"}])
    dpo = ExpertConfig(axis="honest", backbone="tiny-random", trainer="dpo")
    assert training_prompts(dpo) == {normalise_text("  Is the Earth FLAT? "), "b"}
