"""`dermkit data download` against a local HTTP server (127.0.0.1 only, never the internet).

The server serves in-memory files by URL path, honours ``Range: bytes=N-`` (or ignores it on
request), can answer 503 a given number of times, and records every request so the tests
can assert what was asked for and how many bytes were sent. The real registry entries are
used with their checksums swapped for those of tiny archives built here, so the official
URL paths and the HAM10000/DermaMNIST layouts are what is exercised.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermkit.data import download
from dermkit.data.download import (
    DATASETS,
    DatasetSpec,
    DownloadError,
    RemoteFile,
    download_dataset,
    safe_extract,
)

# --------------------------------------------------------------------------- local server


@dataclass
class Served:
    """What one request got: path with query, Range header, status, body bytes sent."""

    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> body
    ignore_range: bool = False
    failures_left: int = 0  # answer this many requests with 503 first
    cut_after: int | None = None  # promise the full body, send only this many bytes, hang up
    log: list[Served] = field(default_factory=list)
    url: str = ""


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # a stuck client cannot hold a handler thread for long

    def do_GET(self) -> None:
        state: FileServer = self.server.state  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        if state.failures_left > 0:
            state.failures_left -= 1
            self._answer(503, b"", {}, rng)
            return
        body = state.files.get(urlsplit(self.path).path)
        if body is None:
            self._answer(404, b"", {}, rng)
            return
        if rng and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                self._answer(416, b"", {"Content-Range": f"bytes */{len(body)}"}, rng)
                return
            end = len(body) - 1
            self._answer(
                206, body[start:], {"Content-Range": f"bytes {start}-{end}/{len(body)}"}, rng
            )
            return
        self._answer(200, body, {}, rng)

    def _answer(self, status: int, body: bytes, headers: dict[str, str], rng: str | None) -> None:
        self.server.state.log.append(Served(self.path, rng, status, len(body)))  # type: ignore[attr-defined]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.state.cut_after  # type: ignore[attr-defined]
        self.wfile.write(body if cut is None else body[:cut])

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = state
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_retry_sleep(monkeypatch):
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)


# --------------------------------------------------------------------------- test data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def url_path(url: str) -> str:
    return urlsplit(url).path


def with_checksums(spec: DatasetSpec, bodies: dict[str, bytes]) -> DatasetSpec:
    """The real spec, each file's checksum and size replaced by those of our test bytes."""
    files = [
        replace(f, md5=None, sha256=sha256(bodies[f.filename]), size=len(bodies[f.filename]))
        for f in spec.files
    ]
    return replace(spec, files=files)


def blob_spec(monkeypatch, name: str, remote: RemoteFile, arrange=None) -> None:
    spec = DatasetSpec(
        name=name,
        files=[remote],
        layout_note="test",
        license="test",
        citation="test",
        homepage="https://example.org/manual-download",
        arrange=arrange,
    )
    monkeypatch.setitem(DATASETS, name, spec)


HAM_IDS_PART1 = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
HAM_IDS_PART2 = ["ISIC_0000004", "ISIC_0000005"]


def fake_ham10000() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(filename -> archive/CSV bytes, image_id -> JPEG bytes) shaped like the Dataverse files.

    Part 1 has its JPEGs at the top level; part 2 in a folder plus macOS junk, and the
    metadata carries the official extra 'dataset' column in a different column order.
    """
    jpegs = {image_id: jpeg_bytes(i) for i, image_id in enumerate(HAM_IDS_PART1 + HAM_IDS_PART2)}
    part1 = zip_bytes({f"{i}.jpg": jpegs[i] for i in HAM_IDS_PART1})
    part2 = zip_bytes(
        {f"HAM10000_images_part_2/{i}.jpg": jpegs[i] for i in HAM_IDS_PART2}
        | {"__MACOSX/HAM10000_images_part_2/._ISIC_0000004.jpg": b"resource fork"}
    )
    lines = ["image_id,lesion_id,dx,dx_type,age,sex,localization,dataset"]
    for n, image_id in enumerate(jpegs):
        lines.append(
            f"{image_id},HAM_{n // 2:07d},{'nv' if n % 2 else 'mel'},histo,45.0,male,back,vidir"
        )
    metadata = ("\n".join(lines) + "\n").encode()
    bodies = {
        "HAM10000_images_part_1.zip": part1,
        "HAM10000_images_part_2.zip": part2,
        "HAM10000_metadata.csv": metadata,
    }
    return bodies, jpegs


# --------------------------------------------------------------------------- tests


def test_ham10000_full_download_verifies_extracts_and_lays_out(server, tmp_path, monkeypatch):
    bodies, jpegs = fake_ham10000()
    spec = with_checksums(DATASETS["ham10000"], bodies)
    monkeypatch.setitem(DATASETS, "ham10000", spec)
    for f in spec.files:
        server.files[url_path(f.url)] = bodies[f.filename]
    dest = tmp_path / "ham"

    out = download_dataset("ham10000", dest, base_url=server.url, progress=False)

    assert out == dest
    # The official Dataverse paths were requested, the metadata as the original upload.
    requested = {s.path for s in server.log}
    assert {"/api/access/datafile/3172585", "/api/access/datafile/3172584"} <= requested
    assert "/api/access/datafile/4338392?format=original" in requested
    meta = pd.read_csv(dest / "metadata.csv", dtype=str)
    assert list(meta.columns[:7]) == [
        "lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization",
    ]  # fmt: skip
    assert "dataset" in meta.columns  # the official extra column survives
    assert sorted(meta["image_id"]) == sorted(jpegs)
    on_disk = {p.stem: p.read_bytes() for p in (dest / "images").glob("*.jpg")}
    assert on_disk == jpegs  # byte-identical, junk (._*) left out
    assert not (dest / "downloads" / "HAM10000_images_part_1").exists()  # staging removed
    recorded = json.loads((dest / "downloads" / "checksums.json").read_text())
    assert {name: e["sha256"] for name, e in recorded.items()} == {
        name: sha256(body) for name, body in bodies.items()
    }

    # A rerun verifies what is on disk, touches the network not at all, rebuilds nothing.
    n_requests = len(server.log)
    written = (dest / "metadata.csv").stat().st_mtime_ns
    download_dataset("ham10000", dest, base_url=server.url, progress=False)
    assert len(server.log) == n_requests
    assert (dest / "metadata.csv").stat().st_mtime_ns == written  # layout not rebuilt


def test_resume_completes_part_file_with_range_request(server, tmp_path, monkeypatch):
    body = np.random.default_rng(0).bytes(300_000)
    remote = RemoteFile("https://files.example.org/blob.bin", "blob.bin", sha256=sha256(body))
    blob_spec(monkeypatch, "blob", remote)
    server.files["/blob.bin"] = body
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    half = len(body) // 2
    (downloads / "blob.bin.part").write_bytes(body[:half])

    download_dataset("blob", tmp_path, base_url=server.url, progress=False)

    assert [(s.range, s.status, s.sent) for s in server.log] == [
        (f"bytes={half}-", 206, len(body) - half)
    ]
    assert (downloads / "blob.bin").read_bytes() == body
    assert not (downloads / "blob.bin.part").exists()


def test_interrupted_download_keeps_part_and_rerun_resumes(server, tmp_path, monkeypatch):
    body = np.random.default_rng(2).bytes(100_000)
    remote = RemoteFile("https://files.example.org/blob.bin", "blob.bin", md5=md5(body))
    blob_spec(monkeypatch, "blob", remote)
    server.files["/blob.bin"] = body
    server.cut_after = 30_000

    with pytest.raises(DownloadError, match="rerun the same command to resume"):
        download_dataset("blob", tmp_path, base_url=server.url, progress=False)
    part = tmp_path / "downloads" / "blob.bin.part"
    assert part.read_bytes() == body[:30_000]

    server.cut_after = None
    download_dataset("blob", tmp_path, base_url=server.url, progress=False)
    assert server.log[-1].range == "bytes=30000-"
    assert (tmp_path / "downloads" / "blob.bin").read_bytes() == body


def test_server_ignoring_range_restarts_cleanly(server, tmp_path, monkeypatch):
    body = np.random.default_rng(1).bytes(200_000)
    remote = RemoteFile("https://files.example.org/blob.bin", "blob.bin", md5=md5(body))
    blob_spec(monkeypatch, "blob", remote)
    server.files["/blob.bin"] = body
    server.ignore_range = True
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "blob.bin.part").write_bytes(body[:70_000])

    download_dataset("blob", tmp_path, base_url=server.url, progress=False)

    assert [(s.range, s.status, s.sent) for s in server.log] == [("bytes=70000-", 200, len(body))]
    assert (downloads / "blob.bin").read_bytes() == body  # not the 70 kB prefix + whole body


def test_part_file_already_complete_is_finished_after_416(server, tmp_path, monkeypatch):
    body = b"complete" * 1000
    remote = RemoteFile("https://files.example.org/blob.bin", "blob.bin", md5=md5(body))
    blob_spec(monkeypatch, "blob", remote)
    server.files["/blob.bin"] = body
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "blob.bin.part").write_bytes(body)

    download_dataset("blob", tmp_path, base_url=server.url, progress=False)

    assert [(s.status, s.sent) for s in server.log] == [(416, 0)]
    assert (tmp_path / "downloads" / "blob.bin").read_bytes() == body


def test_resume_false_discards_part_file(server, tmp_path, monkeypatch):
    body = b"fresh bytes" * 1000
    remote = RemoteFile("https://files.example.org/blob.bin", "blob.bin", md5=md5(body))
    blob_spec(monkeypatch, "blob", remote)
    server.files["/blob.bin"] = body
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "blob.bin.part").write_bytes(b"stale")

    download_dataset("blob", tmp_path, base_url=server.url, resume=False, progress=False)

    assert [s.range for s in server.log] == [None]
    assert (tmp_path / "downloads" / "blob.bin").read_bytes() == body


def test_checksum_mismatch_keeps_corrupt_file_and_does_not_extract(server, tmp_path, monkeypatch):
    served = zip_bytes({"ISIC_0000001.jpg": jpeg_bytes(0)})
    wrong = md5(b"what the registry promised")
    remote = RemoteFile("https://files.example.org/a.zip", "a.zip", md5=wrong, extract=True)
    blob_spec(monkeypatch, "blob", remote)
    server.files["/a.zip"] = served

    with pytest.raises(DownloadError) as err:
        download_dataset("blob", tmp_path, base_url=server.url, progress=False)

    message = str(err.value)
    assert "a.zip" in message and wrong in message and md5(served) in message
    downloads = tmp_path / "downloads"
    assert (downloads / "a.zip.corrupt").read_bytes() == served
    assert not (downloads / "a.zip").exists()
    assert not (downloads / "a").exists()  # never extracted
    assert not (tmp_path / "images").exists()


def test_unverified_file_is_recorded_then_checked_on_later_runs(
    server, tmp_path, monkeypatch, caplog
):
    first = b"version one" * 100
    remote = RemoteFile("https://files.example.org/blob.bin", "blob.bin")
    blob_spec(monkeypatch, "blob", remote)
    server.files["/blob.bin"] = first

    with caplog.at_level("WARNING", logger="dermkit.data.download"):
        download_dataset("blob", tmp_path, base_url=server.url, progress=False)
    assert "NOT verified" in caplog.text and "blob.bin" in caplog.text
    recorded = json.loads((tmp_path / "downloads" / "checksums.json").read_text())
    assert recorded["blob.bin"]["sha256"] == sha256(first)

    # The upstream file changes: a fresh download must not be accepted silently.
    (tmp_path / "downloads" / "blob.bin").unlink()
    server.files["/blob.bin"] = b"version two" * 100
    with pytest.raises(DownloadError, match=sha256(first)):
        download_dataset("blob", tmp_path, base_url=server.url, progress=False)
    assert (tmp_path / "downloads" / "blob.bin.corrupt").read_bytes() == b"version two" * 100


def test_unreachable_host_fails_fast_with_manual_download_hint(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"

    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_dataset("ham10000", tmp_path, base_url=base, progress=False)
    elapsed = time.monotonic() - start

    message = str(err.value)
    assert elapsed < 5
    assert "no network access to 127.0.0.1" in message
    assert f"{base}/api/access/datafile/3172585" in message  # names the URL it tried
    assert "dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T" in message
    assert "--dest" in message


def test_transient_5xx_is_retried_twice_then_gives_up(server, tmp_path, monkeypatch):
    body = b"x" * 5000
    remote = RemoteFile("https://files.example.org/blob.bin", "blob.bin", md5=md5(body))
    blob_spec(monkeypatch, "blob", remote)
    server.files["/blob.bin"] = body

    server.failures_left = 2
    download_dataset("blob", tmp_path / "ok", base_url=server.url, progress=False)
    assert [s.status for s in server.log] == [503, 503, 200]

    server.log.clear()
    server.failures_left = 10
    with pytest.raises(DownloadError, match="HTTP 503"):
        download_dataset("blob", tmp_path / "down", base_url=server.url, progress=False)
    assert [s.status for s in server.log] == [503, 503, 503]


def test_zip_slip_member_is_rejected_before_anything_is_written(server, tmp_path, monkeypatch):
    evil = zip_bytes({"ok.jpg": jpeg_bytes(0), "../evil.txt": b"pwned"})
    remote = RemoteFile(
        "https://files.example.org/e.zip", "e.zip", sha256=sha256(evil), extract=True
    )
    blob_spec(monkeypatch, "blob", remote)
    server.files["/e.zip"] = evil

    with pytest.raises(DownloadError, match=r"unsafe archive member '\.\./evil\.txt'"):
        download_dataset("blob", tmp_path, base_url=server.url, progress=False)

    assert not (tmp_path / "downloads" / "evil.txt").exists()
    assert not list((tmp_path / "downloads" / "e").rglob("*"))  # not even the safe member


def test_safe_extract_rejects_absolute_member_and_extracts_clean_archive(tmp_path):
    absolute = tmp_path / "abs.zip"
    absolute.write_bytes(zip_bytes({"/etc/evil.conf": b"x"}))
    with pytest.raises(DownloadError, match=r"abs\.zip"):
        safe_extract(absolute, tmp_path / "out_abs")

    clean = tmp_path / "clean.zip"
    clean.write_bytes(zip_bytes({"dir/a.txt": b"a", "b.txt": b"b"}))
    files = safe_extract(clean, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == [
        "b.txt",
        "dir/a.txt",
    ]
    assert (tmp_path / "out" / "dir" / "a.txt").read_bytes() == b"a"


def fake_dermamnist() -> tuple[bytes, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A MedMNIST-shaped npz: smooth 28x28 RGB images, labels of shape (N, 1)."""
    yy, xx = np.mgrid[0:28, 0:28]
    splits = {}
    for offset, (split, n) in enumerate((("train", 4), ("val", 2), ("test", 3))):
        images = np.stack(
            [
                np.stack([xx * 8 + k * 10, yy * 8, np.full_like(xx, 40 * (k + offset))], axis=-1)
                for k in range(n)
            ]
        ).astype(np.uint8)
        labels = (np.arange(n) + 2 * offset).reshape(n, 1) % 7
        splits[split] = (images, labels)
    buf = io.BytesIO()
    np.savez(
        buf,
        **{
            f"{s}_{k}": a
            for s, (im, lb) in splits.items()
            for k, a in (("images", im), ("labels", lb))
        },
    )
    return buf.getvalue(), splits


def test_dermamnist_npz_becomes_ham_like_layout_with_split(server, tmp_path, monkeypatch):
    npz, splits = fake_dermamnist()
    spec = with_checksums(DATASETS["dermamnist"], {"dermamnist.npz": npz})
    monkeypatch.setitem(DATASETS, "dermamnist", spec)
    server.files[url_path(spec.files[0].url)] = npz

    download_dataset("dermamnist", tmp_path, base_url=server.url, progress=False)

    assert server.log[0].path == "/records/10519652/files/dermamnist.npz?download=1"
    meta = pd.read_csv(tmp_path / "metadata.csv", dtype=str, keep_default_na=False)
    assert meta["split"].value_counts().to_dict() == {"train": 4, "test": 3, "val": 2}
    # MedMNIST's DermaMNIST label list (medmnist/info.py), as HAM10000 codes, in index order.
    medmnist_labels = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    for split, (images, labels) in splits.items():
        rows = meta[meta["split"] == split].sort_values("source_index", key=lambda c: c.astype(int))
        assert rows["dx"].tolist() == [medmnist_labels[int(k)] for k in labels.ravel()]
        for (_, row), original in zip(rows.iterrows(), images):
            decoded = np.asarray(Image.open(tmp_path / "images" / f"{row['image_id']}.jpg"))
            assert decoded.shape == (28, 28, 3)
            assert np.abs(decoded.astype(int) - original.astype(int)).mean() < 2.0
    assert (meta["lesion_id"] == meta["image_id"]).all()
    assert (tmp_path / "downloads" / "dermamnist.npz").read_bytes() == npz  # lossless copy kept


def test_dermamnist_npz_missing_array_is_named(server, tmp_path, monkeypatch):
    buf = io.BytesIO()
    np.savez(buf, train_images=np.zeros((1, 28, 28, 3), np.uint8), train_labels=np.zeros((1, 1)))
    npz = buf.getvalue()
    spec = with_checksums(DATASETS["dermamnist"], {"dermamnist.npz": npz})
    monkeypatch.setitem(DATASETS, "dermamnist", spec)
    server.files[url_path(spec.files[0].url)] = npz

    with pytest.raises(DownloadError, match=r"dermamnist\.npz: missing array 'val_images'"):
        download_dataset("dermamnist", tmp_path, base_url=server.url, progress=False)


def test_unknown_dataset_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="ham10000"):
        download_dataset("ham1000", tmp_path, progress=False)


def test_registry_points_at_official_hosts_with_well_formed_checksums():
    official = {"ham10000": "dataverse.harvard.edu", "dermamnist": "zenodo.org"}
    for name, spec in DATASETS.items():
        host = official["ham10000" if name == "ham10000" else "dermamnist"]
        names = [f.filename for f in spec.files]
        assert len(names) == len(set(names)), name
        for f in spec.files:
            assert urlsplit(f.url).scheme == "https" and urlsplit(f.url).hostname == host
            assert f.expected is not None, f"{name}/{f.filename} lost its published checksum"
    with pytest.raises(ValueError, match="not both"):
        RemoteFile("https://x/y", "y", md5="0" * 32, sha256="0" * 64)
