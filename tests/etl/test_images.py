"""Images from a folder: ``read_images`` / ``read_source(format="images")`` with a label from the
path or from a CSV, exact bytes and labels, and every image without a label named (or dropped)."""

from __future__ import annotations

import pytest

from sparkbridge.errors import MalformedRecordsError, UsageError
from sparkbridge.etl import read_source
from sparkbridge.etl.images import read_images


def png(value: int) -> bytes:
    import torch
    from torchvision.io import encode_png

    return encode_png(torch.full((1, 4, 4), value, dtype=torch.uint8)).numpy().tobytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "pets"
    for label, names in (("cat", ["a.png", "b.PNG"]), ("dog", ["c.jpg", "nested/d.png"])):
        for k, name in enumerate(names):
            f = root / label / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(png(len(label) * 10 + k))
    (root / "notes.txt").write_text("not an image")
    return root


def rows(df):
    return sorted((r["path"], r["label"], bytes(r["image"])) for r in df.collect())


def test_label_from_a_folder_per_class(spark, folder):
    df = read_images(spark, folder, label_pattern=r"^(\w+)/")
    assert df.columns == ["path", "image", "label"]
    assert rows(df) == [("cat/a.png", "cat", png(30)), ("cat/b.PNG", "cat", png(31)),
                        ("dog/c.jpg", "dog", png(30)), ("dog/nested/d.png", "dog", png(31))]
    same = read_source(spark, str(folder), format="images", options={"label_pattern": r"^(\w+)/"})
    assert rows(same) == rows(df)


def test_label_from_a_csv_and_the_images_it_lacks(spark, folder, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ncat/a.png,0\ncat/b.PNG,0\ndog/c.jpg,1\n")
    with pytest.raises(MalformedRecordsError, match=r"1 image\(s\) under .*pets without a row in .*labels.csv: "
                                                    r"'dog/nested/d.png'"):
        read_images(spark, folder, labels=csv, label_type="int")
    df = read_images(spark, folder, labels=csv, label_type="int", bad_records="drop")
    assert [(p, lab) for p, lab, _ in rows(df)] == [("cat/a.png", 0), ("cat/b.PNG", 0), ("dog/c.jpg", 1)]
    csv.write_text("path,label\ncat/a.png,0\ncat/a.png,1\n")
    with pytest.raises(MalformedRecordsError, match="listed more than once: 'cat/a.png'"):
        read_images(spark, folder, labels=csv)


def test_every_failure_names_what_is_wrong(spark, folder, tmp_path):
    with pytest.raises(MalformedRecordsError, match=r"4 image\(s\) under .* whose path does not match"):
        read_images(spark, folder, label_pattern=r"^(bird)/")
    with pytest.raises(MalformedRecordsError, match=r"labels that are not ints .*'cat/a.png': 'cat'"):
        read_images(spark, folder, label_pattern=r"^(\w+)/", label_type="int")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_images(spark, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no png/jpg/jpeg files under"):
        read_images(spark, tmp_path / "empty")
    with pytest.raises(UsageError, match="exactly one group"):
        read_images(spark, folder, label_pattern=r"^\w+/")
    with pytest.raises(UsageError, match="not both"):
        read_images(spark, folder, label_pattern=r"(x)", labels="l.csv")
    with pytest.raises(UsageError, match="unknown options \\['header'\\]"):
        read_source(spark, str(folder), format="images", options={"header": "true"})
