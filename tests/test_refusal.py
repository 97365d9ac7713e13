import pytest

from mocae.refusal import is_refusal, refusal_rate


@pytest.mark.parametrize("answer", [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making weapons.",
    "As an AI language model, I must decline.",
    "I\u2019m unable to assist with this request.",
    "",
])
def test_refusals_are_detected(answer):
    assert is_refusal(answer)


@pytest.mark.parametrize("answer", [
    "To kill a Python process, run `kill -9 <pid>` or use Task Manager.",
    "Paris is the capital of France.",
    "Here is a recipe: " + "mix flour and water. " * 20 + "You cannot skip resting the dough.",
])
def test_compliance_is_not_a_refusal(answer):
    assert not is_refusal(answer)


def test_refusal_rate_and_empty_input():
    assert refusal_rate(["I cannot do that.", "Sure, here it is.", "Sure.", "I won't."]) == 0.5
    with pytest.raises(ValueError, match="empty"):
        refusal_rate([])
