"""Atomic writes: all-or-nothing, and the result readable like any file the user writes."""

import os
import stat

import pytest

from mocae.paths import atomic_directory, atomic_save_figure, atomic_write_json, atomic_write_text


def test_atomic_writes_respect_the_umask_not_mkstemps_0600(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        atomic_save_figure(plt.figure(), tmp_path / "f.png")
        with atomic_directory(tmp_path / "model") as folder:
            (folder / "w.txt").write_text("w")
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "r.json") == 0o644 and mode(tmp_path / "f.png") == 0o644
    assert mode(tmp_path / "model") == 0o755
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # not text: the write fails before the replace
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_writers_of_the_same_file_side_by_side_each_land_a_whole_copy(tmp_path):
    # Two bench sittings land the same base answers at once; a shared "<name>.tmp" let one rename
    # the other's temp file away (FileNotFoundError) or publish a half-written copy.
    from concurrent.futures import ThreadPoolExecutor

    from mocae.paths import atomic_write_bytes

    target = tmp_path / "answers.json"
    payloads = [bytes([65 + i]) * 200_000 for i in range(6)]

    def write(i):
        for _ in range(20):
            atomic_write_bytes(target, payloads[i])

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(write, range(6)))  # re-raises any writer's error
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["answers.json"]
