"""dermkit.data.readers: three layouts, every problem collected, nothing silently lost."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _image_faults import (
    write_empty,
    write_grey_png,
    write_jpeg,
    write_png,
    write_rgba_png,
    write_truncated,
)
from dermkit.data.labels import HAM10000_CLASSES
from dermkit.data.manifest import REQUIRED_COLUMNS, check_manifest
from dermkit.data.readers import (
    DataValidationError,
    LayoutError,
    Problem,
    detect_layout,
    load_dataset,
)

HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization,thickness"
HAM10000 = Path(
    os.environ.get("DERMKIT_HAM10000", Path(__file__).resolve().parents[2] / "shared/data/ham10000")
)


def write_ham(root: Path, rows: list[str], header: str = HAM_HEADER) -> Path:
    """HAM10000 layout: ``root/metadata.csv`` with ``rows`` (+ header) and ``root/images/``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def ham_row(image_id: str, dx: str = "nv", lesion: str | None = None, thickness="") -> str:
    return f"{lesion or 'L_' + image_id},{image_id},{dx},histo,50.0,male,back,{thickness}"


def good_ham(root: Path, n: int = 6) -> list[str]:
    """``n`` good JPEG rows spread over three classes; returns their image ids."""
    ids = [f"IMG_{i}" for i in range(n)]
    rows = [ham_row(i, ("nv", "mel", "bkl")[k % 3], thickness=k / 10) for k, i in enumerate(ids)]
    write_ham(root, rows)
    for k, image_id in enumerate(ids):
        write_jpeg(root / "images" / f"{image_id}.jpg", seed=k)
    return ids


@pytest.fixture
def faulty_ham(tmp_path) -> tuple[Path, list[str], dict[str, str]]:
    """The acceptance folder: good rows + truncated JPEG, transparent RGBA PNG, 0-byte file
    and a row whose image is missing. Returns (root, good ids, bad id -> expected reason)."""
    root = tmp_path / "ham"
    ids = good_ham(root)
    bad = {
        "CUT": "truncated image",
        "ALPHA": "RGBA image with transparency",
        "EMPTY": "0-byte file",
        "GONE": "image file not found: images/GONE.jpg",
    }
    csv = root / "metadata.csv"
    csv.write_text(csv.read_text() + "".join(ham_row(i, "mel") + "\n" for i in bad))
    write_truncated(root / "images" / "CUT.jpg")
    write_rgba_png(root / "images" / "ALPHA.png", n_transparent=10)
    write_empty(root / "images" / "EMPTY.jpg")
    return root, ids, bad


def csv_rows(root: Path, name: str = "metadata.csv") -> dict[str, int]:
    """image id -> 1-based line number in the CSV (header = 1), read independently."""
    lines = (root / name).read_text().splitlines()
    return {line.split(",")[1]: n for n, line in enumerate(lines, start=1) if n > 1}


def test_acceptance_folder_without_skip_bad_names_all_four(faulty_ham):
    root, _, bad = faulty_ham
    with pytest.raises(DataValidationError) as err:
        load_dataset(root)
    problems = err.value.problems
    assert sorted(p.image_id for p in problems) == sorted(bad)
    message = str(err.value)
    rows = csv_rows(root)
    for image_id, reason in bad.items():
        line = next(m for m in message.splitlines() if f"({image_id})" in m)
        assert f"metadata.csv row {rows[image_id]} ({image_id})" in line
        assert reason in line
    assert len(message.splitlines()) == 1 + len(bad)  # header line + one line per problem


def test_acceptance_folder_with_skip_bad_rejects_exactly_the_four(faulty_ham, tmp_path):
    root, good_ids, bad = faulty_ham
    rejects_csv = tmp_path / "out" / "rejects.csv"
    loaded = load_dataset(root, skip_bad=True, rejects_path=rejects_csv)
    assert loaded.manifest["image_id"].tolist() == good_ids
    assert sorted(loaded.rejects["image_id"]) == sorted(bad)
    on_disk = pd.read_csv(rejects_csv)
    assert list(on_disk.columns) == ["image_id", "path", "row", "reason"]
    rows = csv_rows(root)
    for _, reject in on_disk.iterrows():
        assert bad[reject["image_id"]] in reject["reason"]
        assert reject["row"] == rows[reject["image_id"]]
    assert on_disk.set_index("image_id").loc["EMPTY", "path"] == str(root / "images/EMPTY.jpg")


def test_ham_manifest_contents(tmp_path):
    root = tmp_path / "ham"
    ids = good_ham(root)
    m = load_dataset(root).manifest
    check_manifest(m)
    assert list(m.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    meta = pd.read_csv(root / "metadata.csv")
    assert m["image_id"].tolist() == ids == meta["image_id"].tolist()
    assert m["label"].tolist() == meta["dx"].tolist()
    assert m["lesion_id"].tolist() == meta["lesion_id"].tolist()
    assert (m["source"] == "ham10000").all() and not m["synthetic"].any()
    assert (m["split"] == "").all()
    for image_id, path in zip(m["image_id"], m["path"]):
        assert Path(path).is_absolute() and Path(path) == root / "images" / f"{image_id}.jpg"
    # Extra columns survive, typed like pandas would read them.
    np.testing.assert_allclose(m["thickness"], meta["thickness"])
    assert m["localization"].tolist() == meta["localization"].tolist()


def test_conversions_are_counted_not_rejected(tmp_path):
    root = tmp_path / "ham"
    good_ham(root, n=3)
    extra = {
        "GREY": lambda p: write_grey_png(p, np.full((12, 16), 90, np.uint8)),
        "DEEP": lambda p: write_grey_png(p, np.full((12, 16), 40000, np.uint16)),
        "OPAQUE": lambda p: write_rgba_png(p, n_transparent=0),
        "PAL": lambda p: Image.new("P", (8, 8), 3).save(p),
    }
    csv = root / "metadata.csv"
    csv.write_text(csv.read_text() + "".join(ham_row(i) + "\n" for i in extra))
    for image_id, write in extra.items():
        write(root / "images" / f"{image_id}.png")
    loaded = load_dataset(root)
    assert len(loaded.manifest) == 7 and loaded.rejects.empty
    assert loaded.conversions == {"L": 1, "I;16": 1, "RGBA": 1, "P": 1}


def test_all_problem_kinds_are_collected_in_one_pass(tmp_path):
    root = tmp_path / "ham"
    good_ham(root)
    csv = root / "metadata.csv"
    text = csv.read_text()
    text += ham_row("IMG_0", "nv", lesion="L_dup") + "\n"  # duplicate of row 2
    text += ham_row("ODD", "cat") + "\n"  # unknown label
    text += "L_X,SHORT,nv\n"  # malformed: 3 fields
    text += "\n"  # blank line: later rows keep their editor line numbers
    text += ham_row("LATE", "nv") + "\n"  # missing image, after the blank line
    csv.write_text(text)
    write_jpeg(root / "images" / "ODD.jpg")
    write_jpeg(root / "images" / "STRAY.jpg")  # no row
    with pytest.raises(DataValidationError) as err:
        load_dataset(root)
    by_reason = {(p.image_id, p.row): p.reason for p in err.value.problems}
    lines = csv.read_text().splitlines()
    line_of = {}
    for n, line in enumerate(lines, start=1):
        if line:
            line_of.setdefault(line.split(",")[1], []).append(n)
    dup_rows = line_of["IMG_0"]
    assert len(dup_rows) == 2
    for row in dup_rows:
        assert by_reason[("IMG_0", row)].startswith("duplicate image_id")
    assert "unknown label 'cat'" in by_reason[("ODD", line_of["ODD"][0])]
    assert "3 fields" in by_reason[("SHORT", line_of["SHORT"][0])]
    assert by_reason[("LATE", line_of["LATE"][0])].startswith("image file not found")
    assert by_reason[("STRAY", None)] == "image has no metadata row"
    assert len(err.value.problems) == 6
    assert "images/STRAY.jpg: image has no metadata row" in str(err.value)


def test_split_column_is_kept_and_checked(tmp_path):
    root = tmp_path / "ham"
    ids = good_ham(root, n=3)
    meta = pd.read_csv(root / "metadata.csv")
    meta["split"] = ["train", "val", "training"]
    meta["label"] = "should not overwrite dx"
    meta.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataValidationError) as err:
        load_dataset(root)
    assert [(p.image_id, p.row, p.reason) for p in err.value.problems] == [
        (ids[2], 4, "unknown split 'training'")
    ]
    m = load_dataset(root, skip_bad=True).manifest
    assert m["split"].tolist() == ["train", "val"]
    assert m["label"].tolist() == meta["dx"][:2].tolist()
    assert (m["csv_label"] == "should not overwrite dx").all()


def test_missing_columns_are_named_and_not_skippable(tmp_path):
    root = write_ham(tmp_path / "ham", ["x,IMG_0"], header="foo,image_id")
    with pytest.raises(LayoutError) as err:
        load_dataset(root, layout="ham10000", skip_bad=True)
    message = str(err.value)
    assert "metadata.csv: missing required column 'lesion_id'" in message
    assert "metadata.csv: missing required column 'dx'" in message


def test_classes_and_label_map(tmp_path):
    root = tmp_path / "ham"
    good_ham(root)  # nv, mel, bkl
    m = load_dataset(root, label_map={"nv": "benign", "bkl": "benign", "mel": "malignant"})
    assert set(m.manifest["label"]) == {"benign", "malignant"}
    assert (m.manifest["source_label"] == m.manifest["dx"]).all()
    dropped = load_dataset(root, label_map={"nv": "nv", "mel": "mel", "bkl": None})
    assert "bkl" not in set(dropped.manifest["label"])
    assert dropped.dropped_by_label_map == {"bkl": 2}
    assert len(dropped.manifest) == 4
    with pytest.raises(DataValidationError) as err:
        load_dataset(root, label_map={"nv": "nv", "mel": "mel"})
    assert {p.reason for p in err.value.problems} == {"label 'bkl' is not in the label map"}
    with pytest.raises(DataValidationError) as err:
        load_dataset(root, classes=["nv", "mel"])
    assert len(err.value.problems) == 2
    assert all("unknown label 'bkl'" in p.reason for p in err.value.problems)


def write_isic(root: Path, with_metadata: bool = True) -> dict[str, str]:
    """ISIC 2019-style folder; returns image id -> expected label (None for bad rows)."""
    images = root / "ISIC_2019_Training_Input"
    images.mkdir(parents=True)
    truth = {
        "ISIC_1": "1.0,0.0,0.0,0.0",
        "ISIC_2": "0.0,1.0,0.0,0.0",
        "ISIC_3": "0.0,0.0,1.0,0.0",
        "ISIC_4": "1.0,1.0,0.0,0.0",  # two classes
        "ISIC_5": "0.0,0.0,0.0,0.0",  # none
    }
    lines = ["image,MEL,NV,AK,UNK"] + [f"{k},{v}" for k, v in truth.items()]
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("\n".join(lines) + "\n")
    if with_metadata:
        (root / "ISIC_2019_Training_Metadata.csv").write_text(
            "image,age_approx,anatom_site_general,lesion_id,sex\n"
            "ISIC_1,55.0,head/neck,BCN_1,male\n"
            "ISIC_2,30.0,lower extremity,BCN_1,female\n"
            "ISIC_3,70.0,,,male\n"
        )
    for k, image_id in enumerate(truth):
        write_jpeg(images / f"{image_id}.jpg", seed=k)
    (images / "LICENSE.txt").write_text("CC-BY-NC")
    return {"ISIC_1": "mel", "ISIC_2": "nv", "ISIC_3": "ak"}


def test_isic_layout_one_hot_and_metadata(tmp_path):
    root = tmp_path / "isic"
    expected = write_isic(root)
    assert detect_layout(root) == "isic"
    with pytest.raises(DataValidationError) as err:
        load_dataset(root)
    reasons = {p.image_id: (p.row, p.reason) for p in err.value.problems}
    assert set(reasons) == {"ISIC_4", "ISIC_5"}
    assert reasons["ISIC_4"][0] == 5 and "(MEL, NV)" in reasons["ISIC_4"][1]
    assert reasons["ISIC_5"][0] == 6 and "exactly one 1" in reasons["ISIC_5"][1]
    loaded = load_dataset(root, skip_bad=True, source="isic2019")
    m = loaded.manifest.set_index("image_id")
    assert m["label"].to_dict() == expected
    # lesion_id from the metadata CSV, the image id where it has none.
    assert m["lesion_id"].to_dict() == {"ISIC_1": "BCN_1", "ISIC_2": "BCN_1", "ISIC_3": "ISIC_3"}
    assert m.loc["ISIC_2", "anatom_site_general"] == "lower extremity"
    assert m.loc["ISIC_1", "age_approx"] == 55.0
    assert (m["source"] == "isic2019").all()
    assert sorted(loaded.rejects["image_id"]) == ["ISIC_4", "ISIC_5"]


def test_isic_label_map_and_unknown_class(tmp_path):
    root = tmp_path / "isic"
    write_isic(root, with_metadata=False)
    loaded = load_dataset(
        root, skip_bad=True, label_map={"mel": "mel", "nv": "nv", "ak": "akiec", "unk": None}
    )
    m = loaded.manifest.set_index("image_id")
    assert m.loc["ISIC_3", "label"] == "akiec" and m.loc["ISIC_3", "source_label"] == "ak"
    assert (m["lesion_id"] == m.index).all()
    with pytest.raises(DataValidationError) as err:
        load_dataset(root, skip_bad=False, classes=list(HAM10000_CLASSES))
    assert any(
        p.image_id == "ISIC_3" and "unknown label 'ak'" in p.reason for p in err.value.problems
    )


def write_folder(root: Path) -> None:
    for cls, names in {"Melanoma": ["a", "b"], "Nevus": ["c", "a"], "Junk": ["j"]}.items():
        (root / cls).mkdir(parents=True)
        for k, name in enumerate(names):
            write_png(root / cls / f"{name}.png", seed=k)


def test_folder_layout_duplicates_and_stray_files(tmp_path):
    root = tmp_path / "folder"
    write_folder(root)
    write_jpeg(root / "loose.jpg")
    (root / "Nevus" / "deeper").mkdir()
    write_jpeg(root / "Nevus" / "deeper" / "d.jpg")
    assert detect_layout(root) == "folder"
    with pytest.raises(DataValidationError) as err:
        load_dataset(root)
    got = {
        (Path(p.path).relative_to(root).as_posix(), p.reason.split(" (")[0])
        for p in err.value.problems
    }
    assert got == {
        ("Melanoma/a.png", "duplicate image_id"),
        ("Nevus/a.png", "duplicate image_id"),
        ("loose.jpg", "image outside any class folder"),
        ("Nevus/deeper/d.jpg", "image in a nested folder"),
    }
    assert "Melanoma/a.png: duplicate image_id (also at Nevus/a.png)" in str(err.value)
    loaded = load_dataset(root, skip_bad=True)
    m = loaded.manifest.set_index("image_id")
    assert m["label"].to_dict() == {"b": "Melanoma", "c": "Nevus", "j": "Junk"}
    assert (m["lesion_id"] == m.index).all()
    assert len(loaded.rejects) == 4


def test_folder_layout_with_label_map(tmp_path):
    root = tmp_path / "folder"
    write_folder(root)
    (root / "Melanoma" / "a.png").rename(root / "Melanoma" / "a2.png")
    loaded = load_dataset(root, label_map={"Melanoma": "mel", "Nevus": "nv", "Junk": None})
    assert loaded.manifest.set_index("image_id")["label"].to_dict() == {
        "a2": "mel",
        "b": "mel",
        "c": "nv",
        "a": "nv",
    }
    assert loaded.dropped_by_label_map == {"Junk": 1}
    with pytest.raises(DataValidationError) as err:
        load_dataset(root, classes=["Melanoma", "Nevus"])
    assert [p.image_id for p in err.value.problems] == ["j"]


def test_detect_layout(tmp_path):
    good_ham(tmp_path / "ham", n=1)
    assert detect_layout(tmp_path / "ham") == "ham10000"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(LayoutError, match="cannot detect the dataset layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nowhere")


def test_everything_rejected_still_raises_with_skip_bad(tmp_path):
    root = write_ham(tmp_path / "ham", [ham_row("GONE")])
    with pytest.raises(DataValidationError, match="no usable rows left"):
        load_dataset(root, skip_bad=True)


def test_problem_describe_names_file_or_row():
    row_problem = Problem("/d/images/x.jpg", "x", 17, "truncated image", "/d/metadata.csv")
    file_problem = Problem("/d/images/y.jpg", "y", None, "image has no metadata row")
    assert row_problem.describe("/d") == "metadata.csv row 17 (x): truncated image"
    assert file_problem.describe("/d") == "images/y.jpg: image has no metadata row"


@pytest.fixture(scope="module")
def ham10000_root() -> Path:
    if not (HAM10000 / "metadata.csv").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"HAM10000 not found at {HAM10000} (required when CI=true)")
        pytest.skip(f"HAM10000 not found at {HAM10000}")
    return HAM10000


@pytest.mark.ham10000
def test_real_ham10000(ham10000_root):
    meta = pd.read_csv(ham10000_root / "metadata.csv", dtype=str)
    loaded = load_dataset(ham10000_root)
    m = loaded.manifest
    check_manifest(m)
    assert loaded.rejects.empty
    assert len(m) == len(meta) == 10_015
    assert m["image_id"].tolist() == meta["image_id"].tolist()
    assert m["label"].tolist() == meta["dx"].tolist()
    assert sorted(m["label"].unique()) == sorted(meta["dx"].unique()) == sorted(HAM10000_CLASSES)
    assert m["lesion_id"].nunique() == meta["lesion_id"].nunique()
    assert m.groupby("label")["lesion_id"].nunique().to_dict() == (
        meta.groupby("dx")["lesion_id"].nunique().to_dict()
    )
    assert m["path"].map(lambda p: Path(p).is_file()).all()
