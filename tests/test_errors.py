"""LoadError and the readers that raise it: the file, the problem and the rebuild command."""

import pytest
import torch
from safetensors.torch import save_file

from mocae.errors import LoadError, load_safetensors, read_json, safetensors_shapes


def test_load_error_message_names_file_problem_and_command(tmp_path):
    err = LoadError(tmp_path / "x.json", "cut off", "mocae run")
    assert str(err) == f"{tmp_path / 'x.json'}: cut off; rebuild with: mocae run"
    assert isinstance(err, ValueError) and err.path == tmp_path / "x.json"
    assert str(LoadError("f", "bad")) == "f: bad"


def test_read_json_tells_cut_off_from_garbage_and_wrong_type(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1, "b": [1, 2')
    with pytest.raises(LoadError, match=r"r.json: cut off .*rebuild with: again"):
        read_json(path, "again")
    path.write_text("not json at all")
    with pytest.raises(LoadError, match="r.json: not valid JSON"):
        read_json(path)
    path.write_text("[1]")
    with pytest.raises(LoadError, match="expected a JSON dict, found list"):
        read_json(path)
    assert read_json(path, expect=list) == [1]
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(LoadError, match="cannot be read"):
        read_json(path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_safetensors_readers_name_a_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(4, 8)}, str(path))
    assert safetensors_shapes(path) == {"w": (4, 8)}
    assert torch.equal(load_safetensors(path)["w"], torch.ones(4, 8))
    path.write_bytes(path.read_bytes()[:-10])
    for reader in (safetensors_shapes, load_safetensors):
        with pytest.raises(LoadError, match=r"t.safetensors: not a complete safetensors file .*rebuild with: redo"):
            reader(path, "redo")
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "none.safetensors")
