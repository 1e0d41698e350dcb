"""Download datasets from their official sources: resumable, checksummed, laid out for dermkit.

``dermkit data download ham10000 --dest DIR`` fetches the files listed in :data:`DATASETS`
into ``DIR/downloads/``, verifies each one, extracts archives safely and writes the layout
dermkit's readers expect::

    DIR/metadata.csv     lesion_id,image_id,dx,dx_type,age,sex,localization[,extra columns]
    DIR/images/*.jpg
    DIR/downloads/       the original files + checksums.json (kept: they are the evidence)

How a file is fetched (:func:`fetch_file`): bytes go to ``<file>.part``; an existing
``.part`` is resumed with ``Range: bytes=N-`` (a server that ignores Range and answers 200
restarts the file cleanly); the finished file is checked against the registry's md5/sha256
and only then renamed into place. A mismatch keeps the bad bytes as ``<file>.corrupt`` and
raises :class:`DownloadError` naming file, expected and actual digest. A file without a
published checksum is accepted with a loud warning and its sha256 is recorded in
``checksums.json``, so every later run verifies against the first download.

An unreachable host fails at once (short connect timeout, no retry loop) with a message that
says where to download the files by hand; only HTTP 5xx answers are retried, twice.

Why hand-written on urllib rather than a library: the brief keeps HTTP to the standard library
(no new dependency for one command), and the maintained helpers that would fit
(torchvision's ``download_url``, MedMNIST's own downloader) neither resume with Range nor
keep corrupt files, nor fail fast offline. It is a few short functions, tested against a
local HTTP server.

Checksums and where they come from (never invented):

- HAM10000 (Harvard Dataverse doi:10.7910/DVN/DBW86T, version 4.0): md5 of
  ``HAM10000_images_part_1.zip`` (datafile 3172585), ``HAM10000_images_part_2.zip``
  (3172584) and the original upload of ``HAM10000_metadata.csv`` (4338392, requested with
  ``?format=original`` because Dataverse otherwise serves its own re-exported TSV) as used by
  public projects, e.g. sit-start/core ``python/sitstart/ml/data/datasets/ham10k.py``; several
  independent download scripts give the same file ids, md5s and sizes.
- DermaMNIST (MedMNIST+ on Zenodo, record 10519652): md5 from MedMNIST's own
  ``medmnist/info.py`` (MedMNIST/MedMNIST), which ``medmnist`` itself checks on download.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from dermkit.data.labels import HAM10000_CLASSES, HAM10000_METADATA_COLUMNS

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # an offline machine must fail in seconds, not minutes
RETRIES_ON_5XX = 2  # transient server errors only; connection failures are not retried
RETRY_BACKOFF_S = 0.5  # seconds, times the attempt number
CHUNK_BYTES = 1 << 20
DOWNLOADS_DIR = "downloads"
CHECKSUMS_FILE = "checksums.json"
STAMP_FILE = ".dermkit-download.json"
USER_AGENT = "dermkit (python urllib)"

HAM10000_COLUMNS = HAM10000_METADATA_COLUMNS


class DownloadError(RuntimeError):
    """A dataset could not be downloaded, verified or laid out; the message says what to do."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset at its official URL.

    ``md5`` or ``sha256`` (at most one) is the published checksum; ``None`` for both means
    unverified: the first download's sha256 is recorded and checked on later runs.
    ``size`` (bytes) drives the progress bar and, without a checksum, the only check.
    ``extract`` marks a zip archive to unpack.
    """

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    extract: bool = False

    def __post_init__(self) -> None:
        if self.md5 is not None and self.sha256 is not None:
            raise ValueError(f"{self.filename}: give md5 or sha256, not both")
        for algo, value, length in (("md5", self.md5, 32), ("sha256", self.sha256, 64)):
            if value is not None and not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
                raise ValueError(f"{self.filename}: {algo} must be {length} lowercase hex digits")
        if "/" in self.filename or "\\" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"invalid filename {self.filename!r}: a plain file name is required")

    @property
    def expected(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) published for this file, or None when unverified."""
        if self.md5 is not None:
            return "md5", self.md5
        if self.sha256 is not None:
            return "sha256", self.sha256
        return None


@dataclass(frozen=True)
class DatasetSpec:
    """A downloadable dataset: its files, how they are laid out, its terms.

    ``arrange(downloads, dest)`` turns the verified (and extracted) files in ``downloads``
    into dermkit's layout under ``dest``; None leaves the files as downloaded.
    ``homepage`` is where a person downloads the files by hand when dermkit cannot.
    """

    name: str
    files: list[RemoteFile]
    layout_note: str
    license: str
    citation: str
    homepage: str
    arrange: Callable[[Path, Path], None] | None = None


# --------------------------------------------------------------------------- layouts


def _read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV or TSV (delimiter sniffed: Dataverse serves both), values kept verbatim."""
    import pandas as pd

    try:
        df = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DownloadError(f"{path}: cannot be read as a CSV/TSV table ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    return df.to_dict("records")


def _write_csv(rows: list[dict[str, str]], columns: list[str], path: Path) -> None:
    """Write rows atomically (temp file, then rename) so a crash never leaves half a CSV."""
    import pandas as pd

    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    tmp.replace(path)


def _extracted_jpegs(downloads: Path) -> Iterator[Path]:
    """JPEGs inside the extraction folders, skipping macOS resource forks (``__MACOSX/._x``)."""
    for path in sorted(downloads.glob("*/**/*.jpg")):
        if path.name.startswith("._") or "__MACOSX" in path.parts:
            continue
        yield path


def arrange_ham10000(downloads: Path, dest: Path) -> None:
    """Move the extracted JPEGs to ``dest/images`` and write ``dest/metadata.csv``.

    The metadata keeps every row and column of the official file, with the seven columns
    dermkit reads first. Images listed but missing are reported (warning); no images at all
    is an error, since it means the archives were not what the registry describes.
    """
    meta_path = downloads / "HAM10000_metadata.csv"
    rows = _read_table(meta_path)
    columns = list(rows[0]) if rows else []
    missing = [c for c in HAM10000_COLUMNS if c not in columns]
    if missing:
        raise DownloadError(f"{meta_path}: missing columns {missing} (found {columns})")
    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    moved = 0
    for jpg in _extracted_jpegs(downloads):
        os.replace(jpg, images / jpg.name)
        moved += 1
    present = {p.stem for p in images.glob("*.jpg")}
    if not present:
        raise DownloadError(f"{downloads}: the archives held no .jpg images; nothing to lay out")
    absent = [r["image_id"] for r in rows if r["image_id"] not in present]
    if absent:
        log.warning(
            "%s lists %d images not found in the archives, e.g. %s",
            meta_path,
            len(absent),
            absent[:5],
        )
    ordered = list(HAM10000_COLUMNS) + [c for c in columns if c not in HAM10000_COLUMNS]
    _write_csv(rows, ordered, dest / "metadata.csv")
    log.info("laid out %d images (%d moved) and %d metadata rows", len(present), moved, len(rows))


def arrange_dermamnist(downloads: Path, dest: Path, *, npz_name: str = "dermamnist.npz") -> None:
    """Write MedMNIST's DermaMNIST ``.npz`` as a HAM10000-like folder, keeping its split.

    Each ``{split}_images`` array of shape (N, S, S, 3) uint8 becomes
    ``dest/images/dermamnist_{split}_{i:05d}.jpg`` (JPEG quality 100, no chroma subsampling:
    the format dermkit's HAM10000 reader reads; the lossless ``.npz`` stays in
    ``downloads/``). ``{split}_labels`` (N, 1) index MedMNIST's label list, which is
    HAM10000's seven classes in the same order, so ``dx`` is ``HAM10000_CLASSES[label]``.
    ``metadata.csv`` gets the HAM10000 columns plus ``split`` (MedMNIST's official split) and
    ``source_index``. DermaMNIST has no lesion ids, so ``lesion_id`` is the image id.
    """
    from PIL import Image

    path = downloads / npz_name
    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DownloadError(f"{path}: not a readable .npz file ({e})") from e
    with npz:
        for split in ("train", "val", "test"):
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in npz.files:
                    raise DownloadError(
                        f"{path}: missing array '{key}' (MedMNIST's npz holds "
                        "train/val/test _images and _labels)"
                    )
            arrays = npz[f"{split}_images"]
            labels = npz[f"{split}_labels"].reshape(-1)
            if arrays.ndim != 4 or arrays.shape[-1] != 3 or arrays.dtype != np.uint8:
                raise DownloadError(
                    f"{path}: '{split}_images' has shape {arrays.shape} dtype {arrays.dtype}, "
                    "expected (N, S, S, 3) uint8"
                )
            if len(labels) != len(arrays):
                raise DownloadError(
                    f"{path}: {len(arrays)} {split} images but {len(labels)} {split} labels"
                )
            bad = np.flatnonzero((labels < 0) | (labels >= len(HAM10000_CLASSES)))
            if bad.size:
                raise DownloadError(
                    f"{path}: '{split}_labels' rows {bad[:5].tolist()} are outside 0..6"
                )
            for i, (pixels, label) in enumerate(zip(arrays, labels)):
                image_id = f"dermamnist_{split}_{i:05d}"
                Image.fromarray(pixels).save(images / f"{image_id}.jpg", quality=100, subsampling=0)
                rows.append(
                    {
                        "lesion_id": image_id,
                        "image_id": image_id,
                        "dx": HAM10000_CLASSES[int(label)],
                        "dx_type": "",
                        "age": "",
                        "sex": "",
                        "localization": "",
                        "split": split,
                        "source_index": str(i),
                    }
                )
    columns = [*HAM10000_COLUMNS, "split", "source_index"]
    _write_csv(rows, columns, dest / "metadata.csv")
    log.info("wrote %d DermaMNIST images from %s", len(rows), path.name)


# --------------------------------------------------------------------------- registry

_DATAVERSE_FILE = "https://dataverse.harvard.edu/api/access/datafile/"
_MEDMNIST_PLUS = "https://zenodo.org/records/10519652/files/"

_HAM10000_CITATION = (
    "Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of "
    "multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 "
    "(2018). doi:10.1038/sdata.2018.161"
)
_MEDMNIST_CITATION = (
    "Yang J., Shi R., Wei D., et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D "
    "and 3D biomedical image classification. Sci. Data 10, 41 (2023). "
    "doi:10.1038/s41597-022-01721-8; and, for the images, " + _HAM10000_CITATION
)

HAM10000 = DatasetSpec(
    name="ham10000",
    files=[
        RemoteFile(
            _DATAVERSE_FILE + "3172585",
            "HAM10000_images_part_1.zip",
            md5="4639bfa73ab251610530a97c898e6e46",
            size=1_366_522_108,
            extract=True,
        ),
        RemoteFile(
            _DATAVERSE_FILE + "3172584",
            "HAM10000_images_part_2.zip",
            md5="da43d6cc50f6613013be07e8986b384b",
            size=1_403_566_547,
            extract=True,
        ),
        # ?format=original: the uploaded CSV, not Dataverse's re-exported TSV (other bytes).
        RemoteFile(
            _DATAVERSE_FILE + "4338392?format=original",
            "HAM10000_metadata.csv",
            md5="8f85fb1aa29d80a2797247e434deb79d",
            size=690_218,
        ),
    ],
    layout_note=(
        "metadata.csv (lesion_id,image_id,dx,dx_type,age,sex,localization + the official "
        "'dataset' column) and images/<image_id>.jpg, 10,015 images of 600x450 px"
    ),
    license="CC BY-NC 4.0 (Harvard Dataverse terms of doi:10.7910/DVN/DBW86T, version 4.0)",
    citation=_HAM10000_CITATION,
    homepage="https://dataverse.harvard.edu/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T",
    arrange=arrange_ham10000,
)


def _dermamnist(size: int | None, md5: str) -> DatasetSpec:
    """The DermaMNIST npz at one MedMNIST+ resolution (None: the original 28 px)."""
    filename = "dermamnist.npz" if size is None else f"dermamnist_{size}.npz"
    return DatasetSpec(
        name="dermamnist" if size is None else f"dermamnist_{size}",
        files=[RemoteFile(_MEDMNIST_PLUS + filename + "?download=1", filename, md5=md5)],
        layout_note=(
            f"metadata.csv (HAM10000 columns + split, source_index) and images/*.jpg at "
            f"{size or 28} px; split is MedMNIST's official train/val/test (7:1:2, by image, "
            "not grouped by lesion); lesion_id = image_id (DermaMNIST has none)"
        ),
        license="CC BY-NC 4.0 (MedMNIST+ terms for DermaMNIST, derived from HAM10000)",
        citation=_MEDMNIST_CITATION,
        homepage="https://zenodo.org/records/10519652 (https://medmnist.com/)",
        arrange=functools.partial(arrange_dermamnist, npz_name=filename),
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        HAM10000,
        # md5 values: MedMNIST/MedMNIST medmnist/info.py, INFO["dermamnist"] (MedMNIST+).
        _dermamnist(None, "0744692d530f8e62ec473284d019b0c7"),
        _dermamnist(64, "b70a2f5635c6199aeaa28c31d7202e1f"),
        _dermamnist(128, "2defd784463fa5243564e855ed717de1"),
        _dermamnist(224, "8974907d8e169bef5f5b96bc506ae45d"),
    )
}


# --------------------------------------------------------------------------- verification


class ChecksumStore:
    """``checksums.json`` next to the downloads: what each file hashed to when it arrived."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DownloadError(f"{path}: not valid JSON ({e}); fix or delete it") from e

    def recorded_sha256(self, filename: str) -> str | None:
        return self.entries.get(filename, {}).get("sha256")

    def record(self, filename: str, entry: dict) -> None:
        self.entries[filename] = entry
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)


def file_digests(path: Path) -> dict[str, str]:
    """md5 and sha256 hex digests of a file, read once in 1 MiB chunks."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _set_aside(path: Path, final_name: str) -> Path:
    """Rename a bad file to ``<final_name>.corrupt`` (or ``.corrupt.N``); never delete it."""
    target = path.with_name(final_name + ".corrupt")
    n = 1
    while target.exists():
        target = path.with_name(f"{final_name}.corrupt.{n}")
        n += 1
    path.replace(target)
    return target


def verify_file(path: Path, remote: RemoteFile, store: ChecksumStore, url: str) -> dict:
    """Check ``path`` (the bytes of ``remote``) and record its sha256; return the store entry.

    Against the published checksum when there is one, else against the sha256 recorded on
    an earlier run, else (first download, unverified) with a warning. On mismatch the file
    is set aside as ``.corrupt`` and DownloadError names file, expected and actual digest.
    """
    digests = file_digests(path)
    size = path.stat().st_size
    expected = remote.expected
    recorded = store.recorded_sha256(remote.filename)
    if expected is not None:
        algo, want = expected
        source = "registry"
    elif recorded is not None:
        algo, want, source = "sha256", recorded, f"recorded in {store.path}"
    elif remote.size is not None and size != remote.size:
        algo, want, source = "size", str(remote.size), "registry"
    else:
        algo, want, source = "", "", ""
    got = str(size) if algo == "size" else digests.get(algo, "")
    if algo and got != want:
        corrupt = _set_aside(path, remote.filename)
        raise DownloadError(
            f"checksum mismatch for {remote.filename} from {url}: expected {algo} {want} "
            f"({source}), got {got}. The file is kept as {corrupt} and was not extracted; "
            "delete it and rerun, or download the file by hand."
        )
    if not algo:
        log.warning(
            "%s is NOT verified: dermkit's registry has no published checksum for it. Its "
            "sha256 %s is recorded in %s and later runs verify against it.",
            remote.filename,
            digests["sha256"],
            store.path,
        )
    entry = {
        "sha256": digests["sha256"],
        "md5": digests["md5"],
        "size": size,
        "url": url,
        "verified": f"{algo} ({source})" if algo else "unverified (first download)",
    }
    store.record(remote.filename, entry)
    return entry


# --------------------------------------------------------------------------- HTTP


def mirror_url(url: str, base_url: str | None) -> str:
    """``url`` with its scheme and host replaced by ``base_url`` (whose path is a prefix).

    >>> mirror_url("https://zenodo.org/records/1/files/a.npz?download=1", "http://m:8/x")
    'http://m:8/x/records/1/files/a.npz?download=1'
    """
    if not base_url:
        return url
    src, base = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base_url)
    if not base.scheme or not base.netloc:
        raise ValueError(f"base_url must look like http(s)://host[:port][/path], got {base_url!r}")
    path = base.path.rstrip("/") + src.path
    return urllib.parse.urlunsplit((base.scheme, base.netloc, path, src.query, ""))


def _offline_message(url: str, reason: object, homepage: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or url
    return (
        f"cannot download {url}: {reason}. no network access to {host}; download the files "
        f"by hand from {homepage} and pass --dest / point dermkit at the folder (files placed "
        f"in DEST/{DOWNLOADS_DIR}/ are verified and laid out by rerunning this command)."
    )


def _set_read_timeout(response: http.client.HTTPResponse, timeout: float) -> None:
    """Give an open response the (longer) read timeout; the connect used the short one.

    urllib has a single timeout for connect and reads. The socket sits at
    ``response.fp.raw._sock`` (socket.SocketIO); if that private layout ever changes the
    connect timeout simply stays in force for reads, which is stricter, not wrong.
    """
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(timeout)


def _open(url: str, offset: int, timeout: float, homepage: str) -> http.client.HTTPResponse:
    """GET ``url`` (from byte ``offset``); retries only HTTP 5xx, at most RETRIES_ON_5XX times.

    HTTP 416 is re-raised as HTTPError for the caller (a resume past the end); every other
    failure becomes DownloadError at once.
    """
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    for attempt in range(RETRIES_ON_5XX + 1):
        try:
            response = urllib.request.urlopen(request, timeout=min(timeout, CONNECT_TIMEOUT_S))
        except urllib.error.HTTPError as e:
            if e.code == 416:
                raise
            e.close()
            if e.code >= 500 and attempt < RETRIES_ON_5XX:
                time.sleep(RETRY_BACKOFF_S * (attempt + 1))
                continue
            tries = f" after {attempt + 1} attempts" if e.code >= 500 else ""
            raise DownloadError(
                f"cannot download {url}: HTTP {e.code} {e.reason}{tries}; download the file "
                f"by hand from {homepage} and pass --dest / point dermkit at the folder."
            ) from e
        except urllib.error.URLError as e:
            raise DownloadError(_offline_message(url, e.reason, homepage)) from e
        except OSError as e:  # e.g. a timeout while reading the status line
            raise DownloadError(_offline_message(url, e, homepage)) from e
        _set_read_timeout(response, timeout)
        return response
    raise AssertionError("unreachable")  # the loop always returns or raises


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) from ``Content-Range: bytes a-b/total`` or ``bytes */total``."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


class _Progress:
    """A rich progress bar on stderr (stdout stays clean for the CLI), or nothing."""

    def __init__(self, enabled: bool):
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, name: str, total: int | None, done: int) -> Callable[[int], None]:
        """Start a bar for one file; returns ``advance(n_bytes)``."""
        if self._progress is None:
            return lambda n: None
        task_id = self._progress.add_task(name, total=total, completed=done)
        return lambda n: self._progress.advance(task_id, n)


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    mode: str,
    url: str,
    advance: Callable[[int], None],
) -> None:
    """Copy the response body into ``part`` (append or truncate); check the byte count."""
    expected = response.headers.get("Content-Length")
    received = 0
    try:
        with part.open(mode) as out:
            while block := response.read(CHUNK_BYTES):
                out.write(block)
                received += len(block)
                advance(len(block))
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(
            f"download of {url} was interrupted after {received} bytes ({e!r}); {part} is kept: "
            "rerun the same command to resume."
        ) from e
    if expected is not None and received != int(expected):
        raise DownloadError(
            f"download of {url} ended after {received} of {expected} bytes; {part} is kept: "
            "rerun the same command to resume."
        )


def fetch_file(
    remote: RemoteFile,
    folder: Path,
    store: ChecksumStore,
    *,
    url: str | None = None,
    homepage: str = "the dataset's official page",
    resume: bool = True,
    timeout: float = 30,
    progress: _Progress | None = None,
) -> Path:
    """Download ``remote`` into ``folder`` (resuming a ``.part``), verify it, rename it in place.

    A verified file already present is kept without any network access (this is also how
    hand-downloaded files are picked up). Returns the final path.
    """
    url = url or remote.url
    final = folder / remote.filename
    if final.exists():
        try:
            verify_file(final, remote, store, url)
            return final
        except DownloadError as e:
            log.warning("existing %s failed verification, downloading again: %s", final, e)
    part = folder / (remote.filename + ".part")
    if part.exists() and not resume:
        part.unlink()
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()  # longer than the whole file: cannot be a prefix of it
        offset = 0
    complete = False
    for _ in range(2):  # at most one restart from byte 0
        try:
            response = _open(url, offset, timeout, homepage)
        except urllib.error.HTTPError as e:  # 416: nothing left after `offset`
            _, total = _content_range(e.headers.get("Content-Range"))
            e.close()
            if not offset:
                raise DownloadError(f"cannot download {url}: HTTP 416 without a Range") from e
            if total == offset:  # the .part already holds the whole file
                complete = True
                break
            part.unlink(missing_ok=True)
            offset = 0
            continue
        start, total = _content_range(response.headers.get("Content-Range"))
        if offset and response.status == 206 and start != offset:
            response.close()  # a range we did not ask for: start over
            part.unlink(missing_ok=True)
            offset = 0
            continue
        break
    if not complete:
        with response:
            # 206: the server continues our .part; 200: it ignored Range and sends everything.
            appending = bool(offset) and response.status == 206
            length = response.headers.get("Content-Length")
            if not appending:
                total = int(length) if length is not None else remote.size
            bar = progress or _Progress(False)
            advance = bar.task(remote.filename, total, offset if appending else 0)
            _stream(response, part, "ab" if appending else "wb", url, advance)
    verify_file(part, remote, store, url)
    os.replace(part, final)
    return final


# --------------------------------------------------------------------------- archives


def _check_member(zip_path: Path, name: str, target: Path) -> None:
    """Reject a member that would land outside ``target`` (zip-slip): absolute or ``..``."""
    posix = name.replace("\\", "/")
    unsafe = (
        posix.startswith("/")
        or re.match(r"^[A-Za-z]:", posix) is not None
        or ".." in PurePosixPath(posix).parts
        or not (target / posix).resolve().is_relative_to(target)
    )
    if unsafe:
        raise DownloadError(
            f"{zip_path}: unsafe archive member {name!r} (absolute path or '..' would write "
            f"outside {target}); nothing was extracted."
        )


def safe_extract(zip_path: Path, target: Path) -> list[Path]:
    """Extract a zip into ``target`` after checking every member name; returns the files.

    All members are checked before anything is written, so a malicious archive leaves no
    partial output.
    """
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{zip_path}: not a valid zip archive ({e})") from e
    with archive:
        members = archive.infolist()
        for member in members:
            _check_member(zip_path, member.filename, target)
        return [Path(archive.extract(member, target)) for member in members if not member.is_dir()]


# --------------------------------------------------------------------------- entry point


def _stamp(spec: DatasetSpec, entries: dict[str, dict]) -> dict:
    return {"dataset": spec.name, "files": {f: e["sha256"] for f, e in sorted(entries.items())}}


def download_dataset(
    name: str,
    dest: str | Path,
    *,
    base_url: str | None = None,
    resume: bool = True,
    timeout: float = 30,
    progress: bool = True,
) -> Path:
    """Download, verify, extract and lay out dataset ``name`` under ``dest``; return ``dest``.

    ``base_url`` replaces the official scheme and host (a mirror with the same paths, or a
    test server). ``timeout`` is the read timeout in seconds; connecting gives up after
    ``min(timeout, CONNECT_TIMEOUT_S)``. A rerun skips files that verify and, when the
    layout was already written from the same files, everything else.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    dest = Path(dest)
    downloads = dest / DOWNLOADS_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    store = ChecksumStore(downloads / CHECKSUMS_FILE)
    entries: dict[str, dict] = {}
    with _Progress(progress) as bar:
        for remote in spec.files:
            path = fetch_file(
                remote,
                downloads,
                store,
                url=mirror_url(remote.url, base_url),
                homepage=spec.homepage,
                resume=resume,
                timeout=timeout,
                progress=bar,
            )
            entries[path.name] = store.entries[path.name]
    stamp_path = dest / STAMP_FILE
    stamp = _stamp(spec, entries)
    with contextlib.suppress(OSError, json.JSONDecodeError):
        if json.loads(stamp_path.read_text()) == stamp:
            log.info("%s is already laid out in %s", spec.name, dest)
            return dest
    extracted: list[Path] = []
    for remote in spec.files:
        if remote.extract:
            folder = downloads / Path(remote.filename).stem
            shutil.rmtree(folder, ignore_errors=True)  # a leftover from an interrupted run
            safe_extract(downloads / remote.filename, folder)
            extracted.append(folder)
    if spec.arrange is not None:
        spec.arrange(downloads, dest)
        for folder in extracted:  # derived from the kept archives; the layout now holds it
            shutil.rmtree(folder, ignore_errors=True)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    log.info(
        "%s: %s. License: %s. Cite: %s", spec.name, spec.layout_note, spec.license, spec.citation
    )
    return dest
