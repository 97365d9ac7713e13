import pytest

from mocae.cli import build_parser, main


def test_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("backbones", "data", "generate", "run", "MOCAE_DATA_DIR"):
        assert command in out


def test_backbones_table(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-random" in out and "offline" in out


def test_generate_streams_an_answer(capsys):
    assert main(["generate", "--backbone", "tiny-random", "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    # a random model may answer in whitespace; what matters is that tokens reached stdout
    assert len(capsys.readouterr().out) > 0


def test_data_check_without_a_data_dir_is_an_error(monkeypatch, capsys):
    monkeypatch.delenv("MOCAE_DATA_DIR", raising=False)
    assert main(["data", "check"]) == 2
    assert "MOCAE_DATA_DIR" in capsys.readouterr().err


def test_unknown_backbone_path_is_reported(capsys):
    assert main(["generate", "--backbone", "/nonexistent/model", "--prompt", "x"]) == 2
    assert "backbone path '/nonexistent/model' does not exist" in capsys.readouterr().err


def test_parser_requires_prompt_for_generate():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate"])
