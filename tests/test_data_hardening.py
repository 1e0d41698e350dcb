"""Hostile and unlucky data (issue 23): each case names the right row, offset or reason."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from _image_faults import rgb_pixels, write_jpeg
from dermkit.data.images import MAX_IMAGE_BYTES, inspect_image, max_image_bytes
from dermkit.data.readers import DataValidationError, LayoutError, load_dataset
from dermkit.train.checkpoint import checkpoint_to_resume, latest_checkpoint, save_checkpoint
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


# ------------------------------------------------------------------------ oversized files

_JPEG_START = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def test_size_limit_is_checked_from_stat_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.jpg"
    with path.open("wb") as f:  # 1 GB sparse file: a JPEG start, then zeros
        f.write(_JPEG_START)
        f.truncate(2**30)

    def no_read(self):
        raise AssertionError(f"{self} was read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    start = time.perf_counter()
    reason, mode = inspect_image(path)
    assert time.perf_counter() - start < 1.0
    assert mode is None
    assert reason == (
        f"file too large: {2**30:,} bytes exceeds the {MAX_IMAGE_BYTES:,}-byte limit "
        "($DERMKIT_MAX_IMAGE_MB raises it)"
    )


def test_size_limit_is_configurable(tmp_path, monkeypatch):
    path = write_jpeg(tmp_path / "ok.jpg", size=(64, 48))
    size = path.stat().st_size
    assert inspect_image(path) == (None, "RGB")
    assert inspect_image(path, max_bytes=size - 1)[0].startswith("file too large")
    monkeypatch.setenv("DERMKIT_MAX_IMAGE_MB", str((size - 1) / 2**20))
    assert max_image_bytes() == size - 1
    assert inspect_image(path)[0].startswith("file too large")
    assert inspect_image(path, max_bytes=size) == (None, "RGB")  # an argument beats the env
    monkeypatch.setenv("DERMKIT_MAX_IMAGE_MB", "lots")
    with pytest.raises(ValueError, match="DERMKIT_MAX_IMAGE_MB must be a number"):
        max_image_bytes()


def test_jpeg_header_then_junk_is_refused_without_a_byte_by_byte_scan(tmp_path):
    # PIL scans junk after a JPEG header one byte per Python call: ~2 s per 10 MB.
    path = tmp_path / "junk.jpg"
    path.write_bytes(_JPEG_START + bytes(4 * 2**20))
    start = time.perf_counter()
    reason, _ = inspect_image(path)
    assert time.perf_counter() - start < 0.2
    assert reason.startswith("not an image: JPEG header followed by 4,194,304 bytes of junk")


def test_file_far_larger_than_its_header_dimensions_is_refused_as_padded(tmp_path):
    path = write_jpeg(tmp_path / "padded.jpg", size=(64, 48))
    path.write_bytes(path.read_bytes() + bytes(2 * 2**20))
    reason, _ = inspect_image(path)
    assert "far more than a 64x48 image needs" in reason
    assert "padded or not an image" in reason


@pytest.mark.parametrize(
    "save",
    [
        {"progressive": True},
        {"icc_profile": bytes(300_000)},  # split over several APP2 segments
        {"exif": b"Exif\x00\x00" + bytes(30_000)},
        {"restart_marker_blocks": 1},
    ],
    ids=["progressive", "big-icc", "exif", "restart-markers"],
)
def test_cheap_checks_accept_real_jpeg_variants(tmp_path, save):
    path = tmp_path / "real.jpg"
    Image.fromarray(rgb_pixels(0, (64, 48))).save(path, "JPEG", quality=90, **save)
    assert inspect_image(path) == (None, "RGB")


def test_dataset_rejects_an_oversized_image_by_row(tmp_path):
    root = tmp_path / "ham"
    write_ham_rows(root, ["A", "B"])
    write_jpeg(root / "images" / "A.jpg")
    with (root / "images" / "B.jpg").open("wb") as f:
        f.write(_JPEG_START)
        f.truncate(3 * 2**20)
    loaded = load_dataset(root, skip_bad=True, max_image_bytes=2**20)
    assert loaded.manifest["image_id"].tolist() == ["A"]
    assert loaded.rejects["reason"].iat[0].startswith(f"file too large: {3 * 2**20:,} bytes")
    assert loaded.rejects["row"].iat[0] == 3


# ------------------------------------------------------------------------ broken symlinks


def write_ham_rows(root: Path, ids: list[str]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = [ham_row(i, ("nv", "mel")[k % 2]) for k, i in enumerate(ids)]
    (root / "metadata.csv").write_text("\n".join([HAM_HEADER, *rows]) + "\n")
    return root


def test_dangling_symlink_row_gets_broken_symlink_reason(tmp_path):
    root = write_ham_rows(tmp_path / "ham", ["A", "LINK"])
    write_jpeg(root / "images" / "A.jpg")
    target = tmp_path / "elsewhere" / "gone.jpg"
    (root / "images" / "LINK.jpg").symlink_to(target)
    loaded = load_dataset(root, skip_bad=True)
    assert loaded.manifest["image_id"].tolist() == ["A"]
    assert loaded.rejects["reason"].tolist() == [f"broken symlink: target {target} does not exist"]
    assert loaded.rejects["row"].tolist() == [3]


def test_dangling_symlink_in_folder_layout_is_rejected_not_kept(tmp_path):
    root = tmp_path / "folders"
    (root / "nv").mkdir(parents=True)
    write_jpeg(root / "nv" / "a.jpg")
    write_jpeg(root / "nv" / "b.jpg", seed=1)
    (root / "nv" / "link.jpg").symlink_to("missing.jpg")  # relative target
    loaded = load_dataset(root, skip_bad=True)
    assert sorted(loaded.manifest["image_id"]) == ["a", "b"]
    expected = f"broken symlink: target {root / 'nv' / 'missing.jpg'} does not exist"
    assert loaded.rejects["reason"].tolist() == [expected]


# ------------------------------------------------------------------- CLI advice and rejects


def _cli(*args):
    from typer.testing import CliRunner

    from dermkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the terminal width


def test_validate_advice_fits_the_flags_given(tmp_path):
    root = write_ham_rows(tmp_path / "ham", ["A", "B"])
    (root / "images" / "A.jpg").write_bytes(b"")
    (root / "images" / "B.jpg").write_bytes(b"not an image")
    rejects = tmp_path / "out" / "bad.csv"
    plain = _one_line(_cli("data", "validate", root, "--rejects", rejects).output)
    assert f"rerun with --skip-bad to continue without these rows (listed then in {rejects})" in (
        plain
    )
    skipped = _cli("data", "validate", root, "--skip-bad", "--rejects", rejects)
    assert skipped.exit_code == 1
    out = _one_line(skipped.output)
    assert "rerun with --skip-bad" not in out
    assert "--skip-bad was given, but every row was rejected" in out
    (root / "metadata.csv").write_text("image_id,dx\nA,nv\n")  # lesion_id missing: fatal
    fatal = _one_line(_cli("data", "validate", root, "--skip-bad").output)
    assert "missing required column 'lesion_id'" in fatal
    assert "--skip-bad cannot skip them" in fatal and "rerun with --skip-bad" not in fatal


def test_split_skip_bad_writes_and_names_the_rejects(tmp_path, monkeypatch):
    monkeypatch.setattr("dermkit.data.cache.DEFAULT_CACHE_DIR", tmp_path / "cache")
    ids = [f"IMG_{i}" for i in range(12)]
    root = write_ham_rows(tmp_path / "ham", [*ids, "CUT", "GONE"])
    for k, image_id in enumerate(ids):
        write_jpeg(root / "images" / f"{image_id}.jpg", seed=k, size=(32, 24))
    (root / "images" / "CUT.jpg").write_bytes((root / "images" / "IMG_0.jpg").read_bytes()[:200])
    rejects = tmp_path / "split-rejects.csv"
    result = _cli(
        "data", "split", "--data", root, "--skip-bad", "--rejects", rejects,
        "--image-size", 16, "--near-duplicate-distance", -1,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(rejects)
    assert sorted(table["image_id"]) == ["CUT", "GONE"]
    out = _one_line(result.output)
    assert "2 rejected" in out and f"listed in {rejects}" in out
    assert "CUT (cannot decode image" in out and "GONE (image file not found" in out


# ------------------------------------------------------------ checkpoints: resume and hints


def _dead_pid() -> int:
    """A process id that no live process has (a child that already exited)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_without_a_checkpoint_warns_and_starts_afresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "dermkit.train.checkpoint"):
        assert checkpoint_to_resume(tmp_path / "checkpoints", resume=True) is None
    assert f"--resume: no checkpoint in {tmp_path / 'checkpoints'}" in caplog.text
    assert "starting from step 0" in caplog.text


def test_fresh_run_over_a_checkpoint_names_it_and_the_resume_flag(tmp_path, caplog):
    save_checkpoint(tmp_path, 12, torch.nn.Linear(2, 2))
    with caplog.at_level(logging.WARNING, "dermkit.train.checkpoint"):
        assert checkpoint_to_resume(tmp_path, resume=False) is None
    assert f"{tmp_path / 'step-0000012'} holds a checkpoint of an earlier run (step 12)" in (
        caplog.text
    )
    assert "rerun with --resume" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "dermkit.train.checkpoint"):
        assert checkpoint_to_resume(tmp_path, resume=True) == tmp_path / "step-0000012"
    assert caplog.text == ""  # resuming from a checkpoint needs no warning


def test_stale_tmp_folders_are_removed_when_a_run_starts(tmp_path):
    save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2))
    stale = tmp_path / f".tmp-step-0000002-{_dead_pid()}"
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    own = tmp_path / f".tmp-step-0000003-{os.getpid()}"  # this process is not writing yet
    own.mkdir()
    busy = tmp_path / f".tmp-step-0000004-{os.getppid()}"  # a live writer: keep
    busy.mkdir()
    assert checkpoint_to_resume(tmp_path, resume=True) == tmp_path / "step-0000001"
    assert not stale.exists() and not own.exists()
    assert busy.exists()


@pytest.mark.slow
def test_finetune_run_cleans_tmp_and_hints_at_resume(tiny_classifier_run, tmp_path, caplog):
    """Wired into the training loop: a fresh run in a killed run's folder says so."""
    from dermkit.config import load_config
    from dermkit.train.finetune import run_finetune
    from dermkit.train.settings import FinetuneRunConfig

    run = tmp_path / "run"
    shutil.copytree(tiny_classifier_run / "checkpoints", run / "checkpoints")
    old = latest_checkpoint(run / "checkpoints")
    stale = run / "checkpoints" / f".tmp-step-0000099-{_dead_pid()}"
    stale.mkdir()
    fixture = yaml.safe_load((tiny_classifier_run / "config.yaml").read_text())["data"]
    overrides = [
        f"out_dir={run}",
        *(f"data.{key}={fixture[key]}" for key in ("path", "cache_dir", "image_size")),
        "optim.epochs=1",
        "eval.n_boot=0",
        "train_eval_images=0",
    ]
    cfg = load_config(FinetuneRunConfig, "finetune", "tiny", overrides=overrides)
    with caplog.at_level(logging.WARNING, "dermkit.train.checkpoint"):
        run_finetune(cfg, resume=False, progress=False)
    assert f"{old} holds a checkpoint of an earlier run" in caplog.text
    assert "rerun with --resume" in caplog.text
    assert not stale.exists()


def test_max_image_mb_option_sets_the_limit_for_the_whole_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMKIT_MAX_IMAGE_MB", "")  # restored (unset) after the test
    root = write_ham_rows(tmp_path / "ham", ["A", "B"])
    write_jpeg(root / "images" / "A.jpg", size=(16, 12))
    write_jpeg(root / "images" / "B.jpg", size=(256, 192))
    limit_mb = (root / "images" / "B.jpg").stat().st_size / 2**20 * 0.9
    rejects = tmp_path / "rejects.csv"
    result = _cli(
        "data", "validate", root, "--skip-bad", "--rejects", rejects, "--max-image-mb", limit_mb
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(rejects)
    assert table["image_id"].tolist() == ["B"]
    assert table["reason"].iat[0].startswith("file too large")
    assert max_image_bytes() == int(limit_mb * 2**20)  # the image cache sees the same limit
    bad = _cli("data", "validate", root, "--max-image-mb", 0)
    assert bad.exit_code == 2 and "--max-image-mb must be positive" in bad.output
