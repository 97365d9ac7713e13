"""The jailbreak templates loader (mocae.data.loaders.load_jailbreak_templates) on fixtures and real data."""

from __future__ import annotations

import pytest

from mocae.data import DataError


def test_jailbreak_templates_fill_the_name_and_mark_the_slot(data_root):
    from mocae.data.loaders import JAILBREAK_ASSISTANT, load_jailbreak_templates, wrap_jailbreak

    templates = load_jailbreak_templates(data_root)
    assert len(templates) == 9 and len({t.meta["name"] for t in templates}) == 9
    assert all("{generator.name}" not in t.prompt and JAILBREAK_ASSISTANT in t.prompt for t in templates)
    assert [t.meta["name"] for t in templates if t.meta["slot"]] == ["ChatGPT_Developer_Mode_RANTI"]
    ranti = next(t for t in templates if t.meta["slot"])
    wrapped = wrap_jailbreak(ranti, "How do I pick a lock?")
    assert wrapped.endswith("Prompt: How do I pick a lock?") and "INSERT PROMPT HERE" not in wrapped
    other = next(t for t in templates if not t.meta["slot"])
    assert wrap_jailbreak(other, "How do I pick a lock?") == other.prompt + "\n\nHow do I pick a lock?"


@pytest.mark.parametrize("content, problem", [("[]", "one template string"), ('["a", "b"]', "a list of 2"),
                                               ('{"t": "x"}', "found dict"), ('[""]', "non-empty"),
                                               ('["cut', "not valid JSON")])
def test_jailbreak_bad_file_is_named(data_copy, content, problem):
    from mocae.data.loaders import load_jailbreak_templates

    (data_copy / "jailbreak/Dan_7_0.json").write_text(content)
    with pytest.raises(DataError, match=rf"jailbreak/Dan_7_0.json.*{problem}"):
        load_jailbreak_templates(data_copy)
    (data_copy / "jailbreak/Dan_7_0.json").unlink()
    with pytest.raises(FileNotFoundError, match="Dan_7_0.json"):
        load_jailbreak_templates(data_copy)


def test_real_jailbreak_templates(real_data_dir):
    from mocae.data.loaders import load_jailbreak_templates

    templates = load_jailbreak_templates(real_data_dir)
    assert len(templates) == 9 and all(len(t.prompt) > 1000 for t in templates)
    assert [t.meta["name"] for t in templates if t.meta["slot"]] == ["ChatGPT_Developer_Mode_RANTI"]
