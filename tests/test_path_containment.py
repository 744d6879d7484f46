"""Image paths stay inside --image_folder (training, inference, llava-check; the report: tests/test_report.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llava.data.check import main as check_main
from llava.data.images import outside_image_folder
from llava.data.records import DataError, read_records
from llava.data.verify import verify_images
from llava.eval import inference as I
from llava.train.train import prepare
from tests.conftest import write_preference_set
from tests.test_train import argv


@pytest.fixture
def folders(tmp_path):
    """``images/`` (the image folder, with a link to ``private/``), ``private/`` beside it, ``link -> images``."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (tmp_path / "images" / "shared").symlink_to(tmp_path / "private")
    (tmp_path / "link").symlink_to(tmp_path / "images")
    return tmp_path


@pytest.mark.parametrize("written, inside", [
    ("a.png", True),
    ("sub/a.png", True),
    ("sub/../a.png", True),  # climbs, but not out
    ("./sub/./a.png", True),
    ("../a.png", False),
    ("sub/../../a.png", False),
    ("../images/a.png", True),  # out and back in
    ("../private/a.png", False),
    ("shared/a.png", True),  # a link the folder's owner made: followed
    ("shared/../a.png", False),  # `..` after a link climbs from its target, outside the folder
    ("shared/sub/../a.png", False),  # with `..`, the resolved path must be in the folder itself: no guessing
])
def test_relative_paths(folders, written, inside):
    assert (outside_image_folder(written, folders / "images") is None) == inside


def test_absolute_paths_and_the_root(folders):
    images = folders / "images"
    assert outside_image_folder(str(images / "sub" / "a.png"), images) is None
    assert outside_image_folder(str(folders / "private" / "a.png"), images) == \
        f"image path {folders / 'private' / 'a.png'} is outside --image_folder {images}"
    assert outside_image_folder("/etc/passwd", images) is not None
    # the released data: absolute paths with --image_folder /, under which everything is
    assert outside_image_folder("/etc/passwd", "/") is None
    assert outside_image_folder("../../x.png", "/") is None  # nothing is above the root
    # a folder given through a link: paths under either spelling
    assert outside_image_folder("a.png", folders / "link") is None
    assert outside_image_folder(str(folders / "link" / "a.png"), folders / "link") is None


def test_without_an_image_folder_the_current_directory_is_the_folder(folders, monkeypatch):
    monkeypatch.chdir(folders / "images")
    assert outside_image_folder("sub/a.png", None) is None
    assert outside_image_folder("../private/a.png", None) == \
        "image path ../private/a.png is outside the current directory (no --image_folder given)"
    assert outside_image_folder(str(folders / "images" / "a.png"), None) is None
    assert outside_image_folder(str(folders / "private" / "a.png"), None) is not None


def test_shared_link_with_dotdot_is_named_as_such(folders):
    assert outside_image_folder("shared/../a.png", folders / "images") == \
        f"image path shared/../a.png climbs out of --image_folder {folders / 'images'} through a symbolic link"


# ---------------------------------------------------------------------------------------------
# Where records are read


def preference_set_with_outside_paths(folder: Path) -> tuple[Path, Path]:
    """Four records; record 1's image is an absolute path outside ``images/``, record 2's climbs out with ``..``."""
    data = write_preference_set(folder / "set", n=4)
    private = folder / "private"
    private.mkdir()
    rows = json.loads(data.read_text())
    for i, path in ((1, str(private / "img_1.png")), (2, "../private/img_2.png")):
        os.replace(folder / "set" / "images" / f"img_{i}.png", private / f"img_{i}.png")
        rows[i]["image"] = {"path": path}
        rows[i]["image_path"] = path
    data.write_text(json.dumps(rows))
    return data, folder / "set" / "images"


def test_verify_images_refuses_without_opening_unless_allowed(tmp_path):
    data, _ = preference_set_with_outside_paths(tmp_path)
    records = read_records(data, "preference")
    check = verify_images(records, data.parent)
    assert [(p.record, p.field) for p in check.problems] == [(1, "image"), (2, "image")]
    assert check.problems[1].message == (f"image path ../private/img_2.png is outside --image_folder {data.parent}: "
                                         "pass --allow_outside_image_folder to read it anyway")
    assert (check.opened, check.cached) == (2, 0)  # the refused files are never opened
    allowed = verify_images(records, data.parent, allow_outside=True)
    assert (allowed.problems, allowed.opened) == ([], 4)


def test_training_refuses_a_path_outside_the_image_folder(tiny_llava_dir, tmp_path):
    data, _ = preference_set_with_outside_paths(tmp_path)
    with pytest.raises(DataError) as e:
        prepare(argv(tiny_llava_dir, data, tmp_path / "out", "--task", "DPO"))
    lines = str(e.value).splitlines()
    assert lines[0] == (f"{data}, record 1, field 'image': image path {tmp_path / 'private' / 'img_1.png'} is outside "
                        f"--image_folder {data.parent}: pass --allow_outside_image_folder to read it anyway")
    assert lines[1].startswith(f"{data}, record 2, field 'image': image path ../private/img_2.png is outside")

    trainer = prepare(argv(tiny_llava_dir, data, tmp_path / "out", "--task", "DPO", "--allow_outside_image_folder", "True"))
    assert len(trainer.train_dataset) == 4
    trainer.train_dataset[2]  # read from outside, as allowed


def test_released_layout_absolute_paths_under_the_root(tiny_llava_dir, tmp_path):
    data = write_preference_set(tmp_path, n=3)
    rows = json.loads(data.read_text())
    for row in rows:
        row["image"]["path"] = row["image_path"] = str(tmp_path / row["image_path"])
    data.write_text(json.dumps(rows))
    trainer = prepare(argv(tiny_llava_dir, data, tmp_path / "out", "--task", "LM", "--image_folder", "/"))
    assert len(trainer.train_dataset) == 3


def test_inference_refuses_a_path_outside_the_image_folder(tiny_llava_dir, tmp_path, capsys):
    data, _ = preference_set_with_outside_paths(tmp_path)
    out = tmp_path / "out.jsonl"
    base = ["--model_name", str(tiny_llava_dir), "--data_path", str(data), "--image_folder", str(data.parent),
            "--output", str(out), "--max_new_tokens", "2", "--num_beams", "1", "--no_progress"]
    with pytest.raises(SystemExit) as e:
        I.main(base)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}, record 1, field 'image': image path {tmp_path / 'private' / 'img_1.png'} is outside" in err
    assert f"{data}, record 2, field 'image': image path ../private/img_2.png is outside" in err
    assert not out.exists() or out.read_text() == ""

    I.main(base + ["--allow_outside_image_folder"])
    assert [("response" in json.loads(line)) for line in out.read_text().splitlines()] == [True] * 4


def test_check_reports_paths_outside_the_image_folder(tmp_path, capsys):
    data, _ = preference_set_with_outside_paths(tmp_path)
    assert check_main([str(data), "--image_folder", str(data.parent), "--task", "preference"]) == 1
    out = capsys.readouterr().out
    assert f"error: {data}, record 1, field 'image': image path {tmp_path / 'private' / 'img_1.png'} is outside" in out
    assert f"error: {data}, record 2, field 'image': image path ../private/img_2.png is outside" in out
    assert check_main([str(data), "--image_folder", str(data.parent), "--no_image_open"]) == 1
    assert check_main([str(data), "--image_folder", str(data.parent), "--allow_outside_image_folder"]) == 0
