"""The output folder check: created, refused with a message when unwritable, safe under concurrent runs."""

from __future__ import annotations

import threading

import pytest

from wsi_espnet.errors import InputError
from wsi_espnet.outputs.paths import prepare_out_dir


def test_the_folder_is_created_and_left_empty(tmp_path):
    out = prepare_out_dir(tmp_path / "slide.svs", tmp_path / "a" / "b")
    assert out == (tmp_path / "a" / "b").absolute()
    assert out.is_dir()
    assert list(out.iterdir()) == []  # the write probe is gone


def test_the_default_is_the_slides_folder(tmp_path):
    assert prepare_out_dir(tmp_path / "slide.svs", None) == tmp_path.absolute()


def test_a_file_in_place_of_the_folder_is_refused_with_a_message(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(InputError, match="cannot write to output folder"):
        prepare_out_dir(tmp_path / "slide.svs", tmp_path / "out")


def test_slides_checking_one_folder_from_threads_of_one_process_do_not_collide(tmp_path):
    # A batch runs several slides at once in threads of one process, all writing to one folder. The probe
    # once used a per-process name, and one thread deleted another's probe ("No such file or directory").
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def check() -> None:
        start.wait()
        for _ in range(200):
            try:
                prepare_out_dir(tmp_path / "slide.svs", tmp_path / "out")
            except InputError as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list((tmp_path / "out").iterdir()) == []
