"""Hostile and unlucky data (issue 23): each case names the right row, offset or reason."""

from __future__ import annotations

import pandas as pd
import pytest

from _image_faults import write_jpeg
from dermkit.data.readers import DataValidationError, LayoutError, load_dataset
from test_readers import HAM_HEADER, ham_row

# ------------------------------------------------------------------ non-UTF-8 metadata.csv


def _ham_with_bad_byte(root, n_rows: int = 300, bad_line: int = 251):
    """HAM10000 folder of ``n_rows`` rows; line ``bad_line`` holds byte 0xe9 (latin-1 'é').

    Returns (root, byte offset of the bad byte, image id on the bad line). Long enough that
    the byte sits past a text reader's first 8 KiB buffer, where offsets used to go wrong.
    """
    (root / "images").mkdir(parents=True)
    write_jpeg(root / "images" / "IMG_0.jpg")
    jpeg = (root / "images" / "IMG_0.jpg").read_bytes()
    lines = [HAM_HEADER.encode()]
    for i in range(n_rows):
        (root / "images" / f"IMG_{i}.jpg").write_bytes(jpeg)
        lines.append(ham_row(f"IMG_{i}", ("nv", "mel")[i % 2]).encode())
    bad_id = f"IMG_{bad_line - 2}"
    lines[bad_line - 1] = lines[bad_line - 1].replace(b",back,", b",b\xe9ck,")
    data = b"\n".join(lines) + b"\n"
    (root / "metadata.csv").write_bytes(data)
    return root, data.index(b"\xe9"), bad_id


def test_bad_byte_reports_exact_offset_and_row(tmp_path):
    root, offset, bad_id = _ham_with_bad_byte(tmp_path / "ham")
    assert offset > 8192  # beyond the first buffer chunk
    with pytest.raises(DataValidationError) as err:
        load_dataset(root, check_images=False)
    assert not isinstance(err.value, LayoutError)  # a row problem, not a fatal one
    (problem,) = err.value.problems
    assert problem.row == 251
    assert problem.image_id == bad_id
    assert f"byte 0xe9 at byte {offset} (line 251)" in problem.reason
    assert "column 'localization'" in problem.reason
    assert f"metadata.csv row 251 ({bad_id})" in str(err.value)


def test_skip_bad_drops_only_the_row_with_the_bad_byte(tmp_path):
    root, offset, bad_id = _ham_with_bad_byte(tmp_path / "ham")
    rejects_csv = tmp_path / "rejects.csv"
    loaded = load_dataset(root, skip_bad=True, check_images=False, rejects_path=rejects_csv)
    assert len(loaded.manifest) == 299
    assert bad_id not in set(loaded.manifest["image_id"])
    table = pd.read_csv(rejects_csv)
    assert table["image_id"].tolist() == [bad_id]
    assert table["row"].tolist() == [251]
    assert str(offset) in table["reason"].iat[0]


def test_bad_byte_in_image_id_is_printable_in_rejects(tmp_path):
    root, _, _ = _ham_with_bad_byte(tmp_path / "ham", n_rows=4, bad_line=3)
    csv = root / "metadata.csv"
    csv.write_bytes(csv.read_bytes().replace(b"IMG_3,", b"IMG_\xff3,"))
    rejects_csv = tmp_path / "rejects.csv"
    loaded = load_dataset(root, skip_bad=True, check_images=False, rejects_path=rejects_csv)
    table = pd.read_csv(rejects_csv)
    assert sorted(table["row"].dropna()) == [3, 5]
    assert "IMG_\ufffd3" in set(table["image_id"])  # shown as U+FFFD, file still UTF-8
    assert sorted(loaded.manifest["image_id"]) == ["IMG_0", "IMG_2"]


def test_bad_byte_in_header_is_fatal_with_offset(tmp_path):
    root, _, _ = _ham_with_bad_byte(tmp_path / "ham", n_rows=2, bad_line=3)
    csv = root / "metadata.csv"
    data = b"\xef\xbb\xbf" + csv.read_bytes().replace(b"localization", b"localizaci\xf3n", 1)
    csv.write_bytes(data)
    expected = rf"header row is not UTF-8 text: byte 0xf3 at byte {data.index(0xF3)} \(line 1\)"
    with pytest.raises(LayoutError, match=expected):
        load_dataset(root, skip_bad=True, check_images=False)
