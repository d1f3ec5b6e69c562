"""The input-pipeline benchmark's ImageNet sample: a folder that holds no <wnid>/ image folders is refused, and
the message names the folder that would do."""
from __future__ import annotations

import pytest
from conftest import make_image_folder

from bench.input_pipeline import build_tree


def test_the_samples_root_is_refused_and_its_val_folder_named(tmp_path):
    make_image_folder(tmp_path / "sample")  # sample/{train,val}/<wnid>/<k>.JPEG: the root is one level too high
    with pytest.raises(SystemExit, match=r"--sample .*/sample: no image files in its <wnid>/ folders .*"
                                         r"sample/val looks like one"):
        build_tree(tmp_path / "tree", 1, tmp_path / "sample")
    tree = build_tree(tmp_path / "tree", 2, tmp_path / "sample" / "val")
    assert len(list((tree / "train").rglob("*.JPEG"))) == 2 * 2 * 2  # 2 classes x 2 images x 2 links
    assert (tree / "val").resolve() == (tmp_path / "sample" / "val").resolve()  # val/: the sample itself
