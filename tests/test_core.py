"""dermkit.core: atomic writes, file hashing and the one macro-F1 definition."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from dermkit.core.files import (
    atomic_path,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from dermkit.core.metrics import macro_f1, macro_f1_from_counts


def test_atomic_writes_replace_the_file_and_leave_no_temp_files(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    assert write_json_atomic(path, {"x": 1.5}, default=str) == path
    assert json.loads(path.read_text()) == {"x": 1.5}
    write_text_atomic(tmp_path / "b.md", "héllo\n")
    assert (tmp_path / "b.md").read_text(encoding="utf-8") == "héllo\n"
    write_bytes_atomic(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md", "c.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"ok": true}')
    with pytest.raises(ValueError):  # NaN refused before the file is touched
        write_json_atomic(path, {"x": float("nan")}, allow_nan=False)
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert path.read_text() == '{"ok": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_sha256_file_matches_hashlib_across_block_boundaries(tmp_path):
    data = np.random.default_rng(0).bytes(10_000)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_is_scikit_learns_over_all_k_classes(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 60)  # classes 4 and 5 never true
    pred = rng.integers(0, 5, 60)  # class 5 neither true nor predicted: counts 0
    expected = f1_score(y, pred, average="macro", labels=range(6), zero_division=0)
    assert macro_f1(y, pred, 6) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_counts_a_class_absent_from_labels_and_predictions_as_zero():
    y = np.array([0, 0, 1, 1])
    assert macro_f1(y, y, 2) == 1.0
    assert macro_f1(y, y, 4) == 0.5  # two classes of the task never seen: 0 each


def test_a_missing_class_scales_every_candidate_alike_so_selection_is_unchanged():
    # "classes present in the labels" (the old epoch selection) vs all K: a constant factor.
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 80)
    for _ in range(10):
        pred = rng.integers(0, 4, 80)
        present = f1_score(y, pred, average="macro", labels=np.unique(y), zero_division=0)
        assert macro_f1(y, pred, 4) == pytest.approx(present * 3 / 4, abs=1e-12)


def test_macro_f1_from_counts_is_vectorised_over_leading_axes():
    tp = np.array([[2, 0, 0], [1, 1, 0]])
    n_true = np.array([[2, 1, 0], [2, 1, 0]])
    n_pred = np.array([[3, 0, 0], [1, 2, 0]])
    out = macro_f1_from_counts(tp, n_true, n_pred)
    assert out.shape == (2,)
    np.testing.assert_allclose(out, [(0.8 + 0 + 0) / 3, (2 / 3 + 2 / 3 + 0) / 3])


def test_macro_f1_refuses_labels_outside_the_task():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        macro_f1(np.array([0, 2]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="must be"):
        macro_f1(np.array([0, 1]), np.array([0]), 2)
