"""Atomic writes: all-or-nothing, and the result readable like any file the user writes."""

import os
import stat

import pytest

from mocae.paths import atomic_write_json, atomic_write_text

def test_atomic_write_respects_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'

def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")

    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # not text: the write fails before the replace
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]
