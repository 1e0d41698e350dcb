"""Read a dataset folder into one Manifest, checking every row and every image file.

Three layouts (``detect_layout`` picks one):

``ham10000``
    ``root/metadata.csv`` (lesion_id, image_id, dx[, dx_type, age, sex, localization, any
    extra column such as thickness]) and ``root/images/<image_id>.{jpg,jpeg,png}``.
    label = dx; every other column is kept as metadata.
``isic``
    An ISIC challenge ground-truth CSV (``image`` + one-hot class columns, e.g. 2018 Task 3
    MEL,NV,BCC,AKIEC,BKL,DF,VASC; 2019 adds SCC,UNK), optionally a metadata CSV (``image``,
    age_approx, sex, anatom_site_general, lesion_id) merged on ``image``, and one folder of
    images. CSVs are looked for in ``root`` and its direct sub-folders; the image folder is
    ``root/images`` if present, else the one folder holding images. Labels are the one-hot
    column names lower-cased (MEL -> mel, AK -> ak); lesion_id comes from the metadata CSV
    when it has one, else it is the image id.
``folder``
    ``root/<class_name>/<file>.{jpg,jpeg,png,bmp,tif,tiff}``; image_id = file stem (must be
    unique across classes), lesion_id = image_id.

Validation collects every problem before it reports: missing CSV columns, malformed CSV
rows, empty or unknown labels, labels a label map does not cover, bad one-hot rows,
duplicate image ids, rows whose image file is missing, image files without a row, and image
files that do not decode (:func:`dermkit.data.images.probe_image`: 0-byte, truncated, not an
image, decompression bomb, transparency). Greyscale, palette, 16-bit, CMYK and opaque RGBA
images are not problems: they are converted at load time and counted in
``LoadedDataset.conversions``. Without ``skip_bad`` any problem raises
:class:`DataValidationError` naming all of them; with it the bad rows and files go to
``rejects`` (and ``rejects_path``) and everything else is kept.

A ``split`` column in the labels CSV (DermaMNIST's official split, as written by
``dermkit data download``) becomes the manifest's ``split``; values other than
train/val/test/"" are problems. CSV columns named like other manifest columns (label, path,
source, synthetic) are kept as ``csv_<name>``.

Row numbers are the 1-based line numbers of the labels CSV (metadata.csv, or the ISIC
ground-truth CSV) as an editor shows them: the header is row 1, the first data row is row 2.
They are exact even with blank lines or quoted multi-line fields (the CSV is read with the
standard ``csv`` module, which counts physical lines; pandas would renumber).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from dermkit.data.csv_input import (
    csv_header,
    protect_contract_columns,
    read_labels_csv,
    require_columns,
)
from dermkit.data.images import inspect_image
from dermkit.data.labels import HAM10000_CLASSES, apply_label_map
from dermkit.data.manifest import SPLITS, check_manifest, new_manifest
from dermkit.data.problems import (
    Collector,
    DataValidationError,
    LayoutError,
    Problem,
    display_path,
)

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("ham10000", "isic", "folder")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
HAM10000_IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
HAM10000_CSV = "metadata.csv"
HAM10000_IMAGE_DIR = "images"
# The columns a HAM10000 reader needs; dx_type, age, sex and localization are kept when
# present but not required (derived datasets such as DermaMNIST leave them empty).
HAM10000_REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
ISIC_ID_COLUMN = "image"
# Columns that mark an ISIC CSV as the metadata CSV rather than the one-hot ground truth.
ISIC_METADATA_MARKERS = frozenset(
    {"age_approx", "sex", "anatom_site_general", "anatom_site_general_challenge", "lesion_id"}
)
REJECT_COLUMNS: tuple[str, ...] = ("image_id", "path", "row", "reason")
_IGNORED_FILE_SUFFIXES = frozenset({".txt", ".csv", ".md", ".json", ".yaml", ".yml", ".html"})


@dataclass
class LoadedDataset:
    """What :func:`load_dataset` returns.

    Attributes:
        manifest: a valid manifest (``new_manifest``), absolute image paths, CSV order.
        rejects: columns image_id, path, row, reason; one line per rejected row or file
            (several reasons joined by "; ").
        conversions: original image mode -> count for accepted images not stored as RGB
            (e.g. {"L": 3, "RGBA": 1}); empty when ``check_images`` is False.
        layout: the layout that was read.
        dropped_by_label_map: source label -> rows dropped because the label map sends that
            label to null (a deliberate drop, not a problem).
    """

    manifest: pd.DataFrame
    rejects: pd.DataFrame
    conversions: dict[str, int]
    layout: str = ""
    dropped_by_label_map: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- image files


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _index_images(folder: Path, extensions: Sequence[str]) -> tuple[dict[str, list[Path]], list]:
    """Map stem -> image files directly in ``folder``; also return the other (ignored) files."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    ignored: list[Path] = []
    for path in sorted(folder.iterdir()):
        if _is_hidden(path):
            continue
        # A dangling symlink is indexed like its file would be, so its row is rejected
        # with the real reason (broken symlink), not "not found" or "unsupported type".
        if path.suffix.lower() in extensions and (path.is_file() or path.is_symlink()):
            by_stem[path.stem].append(path)
        else:
            ignored.append(path)
    return by_stem, ignored


def _warn_ignored(ignored: Sequence[Path], root: Path) -> None:
    """Say which files a reader skipped, so nothing disappears without a word."""
    shown = [p for p in ignored if p.suffix.lower() not in _IGNORED_FILE_SUFFIXES]
    if shown:
        names = ", ".join(display_path(p, root) for p in shown[:5])
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        log.warning(
            "ignored %d entries that are not %s image files: %s%s",
            len(shown),
            "/".join(IMAGE_EXTENSIONS),
            names,
            more,
        )


def _match_images(
    records: pd.DataFrame,
    by_stem: dict[str, list[Path]],
    image_dir: Path,
    extensions: Sequence[str],
    ignored: Sequence[Path],
    collector: Collector,
) -> None:
    """Fill ``records['_path']`` from ``by_stem``; report missing, ambiguous and extra files."""
    ignored_by_stem = defaultdict(list)
    for path in ignored:
        ignored_by_stem[path.stem].append(path.name)
    root = collector.root
    for idx, image_id in records["image_id"].items():
        if not image_id:
            collector.record(idx, records, "empty image_id")
            continue
        files = by_stem.get(image_id, [])
        if len(files) == 1:
            records.at[idx, "_path"] = str(files[0])
            continue
        if files:
            records.at[idx, "_path"] = str(files[0])
            names = ", ".join(display_path(f, root) for f in files)
            collector.record(idx, records, f"several image files for this id: {names}")
            continue
        expected = image_dir / f"{image_id}{extensions[0]}"
        records.at[idx, "_path"] = str(expected)
        tried = ", ".join(extensions[1:])
        hint = ""
        if ignored_by_stem.get(image_id):
            hint = f"; found {', '.join(ignored_by_stem[image_id])} (unsupported type)"
        collector.record(
            idx,
            records,
            f"image file not found: {display_path(expected, root)} (also tried {tried}){hint}",
        )
    # A row refused while reading (malformed, not UTF-8) still describes its image: its
    # file is reported with that row, not a second time as an orphan.
    refused = {p.image_id for p in collector.problems if p.row is not None and p.image_id}
    known = set(records["image_id"]) | refused
    for stem, files in sorted(by_stem.items()):
        if stem not in known:
            for path in files:
                collector.file(path, "image has no metadata row", image_id=stem)


def _probe_images(
    paths: Sequence[str], max_bytes: int | None = None
) -> list[tuple[str | None, str | None]]:
    """(reason or None, original mode or None) per path, decoded on a thread pool.

    PIL releases the GIL while decoding, so threads scale across cores without the pickling
    cost of processes. ``max_bytes``: file-size limit (default :func:`max_image_bytes`).
    """
    if not paths:
        return []
    workers = min(8, (os.cpu_count() or 1) + 2, len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(partial(inspect_image, max_bytes=max_bytes), paths))


# -------------------------------------------------------------------------------- layouts


def _find_isic_csvs(root: Path) -> tuple[list[Path], list[Path]]:
    """(ground-truth CSVs, metadata CSVs) among the CSVs in ``root`` and its sub-folders."""
    candidates = sorted(root.glob("*.csv")) + sorted(root.glob("*/*.csv"))
    truth, metadata = [], []
    for path in candidates:
        if _is_hidden(path) or _is_hidden(path.parent):
            continue
        header = csv_header(path)
        if ISIC_ID_COLUMN not in header:
            continue
        (metadata if ISIC_METADATA_MARKERS & set(header) else truth).append(path)
    return truth, metadata


def _image_subfolders(root: Path) -> list[Path]:
    """Non-hidden direct sub-folders of ``root`` that hold at least one image file."""
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p)):
        if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in sub.iterdir() if f.is_file()):
            found.append(sub)
    return found


def detect_layout(root: str | Path) -> str:
    """Return "ham10000", "isic" or "folder" for the dataset folder ``root``.

    ham10000: ``root/metadata.csv`` exists. isic: a CSV (in root or a direct sub-folder) has
    an ``image`` column. folder: sub-folders of images and no such CSV.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        LayoutError: none fits (the message says what each layout needs).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if (root / HAM10000_CSV).is_file():
        header = csv_header(root / HAM10000_CSV)
        if "image_id" in header or ISIC_ID_COLUMN not in header:
            return "ham10000"
    truth, _ = _find_isic_csvs(root)
    if truth:
        return "isic"
    if _image_subfolders(root):
        return "folder"
    entries = sorted(p.name for p in root.iterdir() if not _is_hidden(p))[:10]
    raise LayoutError(
        [
            Problem(
                str(root),
                "",
                None,
                "cannot detect the dataset layout: expected metadata.csv + images/ "
                "(ham10000), a ground-truth CSV with an 'image' column + an image folder "
                "(isic), or one sub-folder of images per class (folder); "
                f"found {entries}",
            )
        ]
    )


def _new_records(df: pd.DataFrame, table: Path) -> pd.DataFrame:
    """Attach the bookkeeping columns every layout fills (_path, _table)."""
    df = df.reset_index(drop=True)
    df["_path"] = ""
    df["_table"] = str(table)
    return df


def _read_ham10000(root: Path, collector: Collector) -> tuple[pd.DataFrame, list[str]] | None:
    """Records (image_id, label, lesion_id, metadata, _row, _path) of a HAM10000 folder."""
    csv_path = root / HAM10000_CSV
    image_dir = root / HAM10000_IMAGE_DIR
    if not csv_path.is_file():
        collector.file(csv_path, "metadata CSV not found", fatal=True)
    if not image_dir.is_dir():
        collector.file(image_dir, "image folder not found", fatal=True)
    if collector.fatal:
        return None
    df = read_labels_csv(csv_path, collector, "image_id")
    if df is None or not require_columns(df, HAM10000_REQUIRED_COLUMNS, csv_path, collector):
        return None
    df = protect_contract_columns(df)
    records = _new_records(df, csv_path)
    records["label"] = records["dx"]
    by_stem, ignored = _index_images(image_dir, HAM10000_IMAGE_EXTENSIONS)
    _warn_ignored(ignored, root)
    _match_images(records, by_stem, image_dir, HAM10000_IMAGE_EXTENSIONS, ignored, collector)
    for idx in records.index[records["lesion_id"] == ""]:
        collector.record(idx, records, "empty lesion_id")
    metadata = [c for c in df.columns if c not in ("image_id", "lesion_id", "_row")]
    return records, metadata


def _isic_image_dir(root: Path, collector: Collector) -> Path | None:
    if (root / "images").is_dir():
        return root / "images"
    folders = _image_subfolders(root)
    if len(folders) == 1:
        return folders[0]
    if not folders and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        return root
    names = [display_path(f, root) for f in folders]
    collector.file(
        root,
        f"cannot tell which folder holds the images (candidates: {names or 'none'}); "
        "put them in images/",
        fatal=True,
    )
    return None


def _one_hot_label(values: pd.Series, columns: Sequence[str]) -> tuple[str | None, str | None]:
    """(label, None) for a valid one-hot row, else (None, reason)."""
    hot = []
    for column in columns:
        text = values[column]
        try:
            number = float(text)
        except ValueError:
            return None, f"one-hot column {column} has non-numeric value '{text}'"
        if number not in (0.0, 1.0):
            return None, f"one-hot column {column} has value '{text}' (expected 0 or 1)"
        if number == 1.0:
            hot.append(column)
    if len(hot) != 1:
        set_ = ", ".join(hot) if hot else "none"
        return None, f"one-hot row must have exactly one 1, has {len(hot)} ({set_})"
    return hot[0].lower(), None


def _read_isic(
    root: Path, collector: Collector
) -> tuple[pd.DataFrame, list[str], list[str]] | None:
    """Records, metadata columns and class names (one-hot columns, lower-cased) of ISIC."""
    truth, metadata_csvs = _find_isic_csvs(root)
    if len(truth) != 1:
        found = [display_path(p, root) for p in truth] or "none"
        collector.file(
            root,
            f"expected one ground-truth CSV (an 'image' column + one-hot class columns), "
            f"found {found}",
            fatal=True,
        )
    if len(metadata_csvs) > 1:
        names = [display_path(p, root) for p in metadata_csvs]
        collector.file(
            root, f"several ISIC metadata CSVs, expected at most one: {names}", fatal=True
        )
    image_dir = _isic_image_dir(root, collector)
    if collector.fatal or image_dir is None:
        return None
    truth_path = truth[0]
    df = read_labels_csv(truth_path, collector, ISIC_ID_COLUMN)
    if df is None:
        return None
    class_columns = [c for c in df.columns if c not in (ISIC_ID_COLUMN, "_row")]
    if not class_columns:
        collector.file(truth_path, "no one-hot class columns besides 'image'", fatal=True)
        return None
    records = _new_records(df[[ISIC_ID_COLUMN, "_row"]], truth_path)
    records = records.rename(columns={ISIC_ID_COLUMN: "image_id"})
    records["label"] = ""
    records["lesion_id"] = records["image_id"]
    extensions = (".jpg", *[e for e in IMAGE_EXTENSIONS if e != ".jpg"])
    by_stem, ignored = _index_images(image_dir, extensions)
    _warn_ignored(ignored, root)
    _match_images(records, by_stem, image_dir, extensions, ignored, collector)
    for idx in records.index:
        label, reason = _one_hot_label(df.loc[idx], class_columns)
        if reason:
            collector.record(idx, records, reason)
            collector.label_reported.add(idx)
        else:
            records.at[idx, "label"] = label
    metadata_columns: list[str] = []
    if metadata_csvs:
        merged = _merge_isic_metadata(records, metadata_csvs[0], collector)
        if merged is None:
            return None
        metadata_columns = merged
    return records, metadata_columns, [c.lower() for c in class_columns]


def _merge_isic_metadata(
    records: pd.DataFrame, meta_path: Path, collector: Collector
) -> list[str] | None:
    """Add the metadata CSV's columns to ``records`` (by image id); returns their names."""
    meta = read_labels_csv(meta_path, collector, ISIC_ID_COLUMN)
    if meta is None:
        return None
    meta = protect_contract_columns(meta)
    root = collector.root
    dup = meta[meta[ISIC_ID_COLUMN].duplicated(keep=False)]
    dup_rows = dup.groupby(ISIC_ID_COLUMN)["_row"].apply(list).to_dict()
    meta = meta.drop_duplicates(ISIC_ID_COLUMN).set_index(ISIC_ID_COLUMN)
    columns = [c for c in meta.columns if c != "_row"]
    for column in columns:
        records[column if column != "lesion_id" else "_meta_lesion_id"] = ""
    no_metadata = 0
    for idx, image_id in records["image_id"].items():
        if image_id in dup_rows:
            rows = ", ".join(map(str, dup_rows[image_id]))
            collector.record(
                idx, records, f"{display_path(meta_path, root)} rows {rows} all describe this image"
            )
        if image_id not in meta.index:
            no_metadata += 1
            continue
        for column in columns:
            target = column if column != "lesion_id" else "_meta_lesion_id"
            records.at[idx, target] = meta.at[image_id, column]
    if "lesion_id" in columns:
        has_lesion = records["_meta_lesion_id"] != ""
        records.loc[has_lesion, "lesion_id"] = records.loc[has_lesion, "_meta_lesion_id"]
        if (~has_lesion).any():
            log.warning(
                "%d images have no lesion_id in %s; each counts as its own lesion",
                int((~has_lesion).sum()),
                meta_path.name,
            )
        del records["_meta_lesion_id"]
        columns.remove("lesion_id")
    if no_metadata:
        log.warning("%d images have no row in %s", no_metadata, meta_path.name)
    orphans = len(set(meta.index) - set(records["image_id"]))
    if orphans:
        log.warning("%s: %d rows describe images not in the ground truth", meta_path, orphans)
    return columns


def _read_folder(root: Path, collector: Collector) -> tuple[pd.DataFrame, list[str]] | None:
    """Records of a class-per-folder dataset; image ids are file stems, unique overall."""
    entries: list[dict] = []
    ignored: list[Path] = []
    for item in sorted(root.iterdir()):
        if _is_hidden(item):
            continue
        if item.is_file():
            if item.suffix.lower() in IMAGE_EXTENSIONS:
                collector.file(item, "image outside any class folder (no label)", item.stem)
            else:
                ignored.append(item)
            continue
        for path in sorted(item.rglob("*")):
            if path.is_dir() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(path)
            elif path.parent != item:
                collector.file(
                    path,
                    "image in a nested folder (expected <class>/<file>)",
                    path.stem,
                )
            else:
                entries.append({"image_id": path.stem, "label": item.name, "_path": str(path)})
    _warn_ignored(ignored, root)
    if not entries:
        collector.file(root, "no images in class sub-folders", fatal=True)
        return None
    records = pd.DataFrame(entries, dtype=object)
    records["lesion_id"] = records["image_id"]
    records["_row"] = None
    records["_table"] = ""
    return records, []


# --------------------------------------------------------------------- shared validation


def _check_duplicates(records: pd.DataFrame, collector: Collector) -> None:
    """Every row of a duplicated image_id is a problem (none can be chosen over the others)."""
    root = collector.root
    groups = records.groupby("image_id").groups
    for idxs in groups.values():
        if len(idxs) < 2:
            continue
        for idx in idxs:
            others = [i for i in idxs if i != idx]
            if pd.isna(records.at[idx, "_row"]):
                where = ", ".join(display_path(records.at[i, "_path"], root) for i in others)
            else:
                where = "rows " + ", ".join(str(int(records.at[i, "_row"])) for i in others)
            collector.record(idx, records, f"duplicate image_id (also at {where})")


def _apply_label_map(
    records: pd.DataFrame, label_map: dict[str, str | None], collector: Collector
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Map labels through ``label_map``; uncovered labels are problems, null targets drops."""
    covered = records["label"].isin(list(label_map)) | (records["label"] == "")
    for idx in records.index[~covered]:
        collector.record(
            idx, records, f"label '{records.at[idx, 'label']}' is not in the label map"
        )
        collector.label_reported.add(idx)
    records = records.assign(source_label=records["label"], _rec=records.index)
    mapped = apply_label_map(records[covered & (records["label"] != "")], label_map)
    dropped = records[covered & (records["label"] != "") & ~records.index.isin(mapped["_rec"])]
    counts = dropped["label"].value_counts().to_dict()
    if counts:
        log.info("label map drops %d rows: %s", len(dropped), counts)
    mapped = mapped.set_index("_rec")
    out = records.drop(index=dropped.index).drop(columns="_rec")
    out.loc[mapped.index, "label"] = mapped["label"]
    return out, {str(k): int(v) for k, v in counts.items()}


def _check_labels(
    records: pd.DataFrame, allowed: Sequence[str] | None, collector: Collector
) -> None:
    """Empty labels, and labels outside ``allowed`` (when given), are problems."""
    allowed_set = None if allowed is None else set(allowed)
    shown = None if allowed is None else ", ".join(sorted(allowed_set))
    for idx, label in records["label"].items():
        if idx in collector.label_reported:
            continue
        if label == "":
            collector.record(idx, records, "empty label")
        elif allowed_set is not None and label not in allowed_set:
            collector.record(idx, records, f"unknown label '{label}' (allowed: {shown})")


def _check_split_column(records: pd.DataFrame, collector: Collector) -> None:
    """A CSV ``split`` column (e.g. DermaMNIST's official split) must hold known splits."""
    if "split" not in records.columns:
        return
    for idx in records.index[~records["split"].isin((*SPLITS, ""))]:
        collector.record(idx, records, f"unknown split '{records.at[idx, 'split']}'")


def _check_images(
    records: pd.DataFrame, collector: Collector, max_bytes: int | None = None
) -> dict[int, str]:
    """Decode every found image file; returns record index -> original mode of good files.

    Dangling symlinks are probed too, so they are rejected as "broken symlink".
    """
    found = [
        idx
        for idx in records.index
        if (path := records.at[idx, "_path"]) and (Path(path).is_file() or Path(path).is_symlink())
    ]
    results = _probe_images([records.at[idx, "_path"] for idx in found], max_bytes)
    modes: dict[int, str] = {}
    for idx, (reason, mode) in zip(found, results):
        if reason is None:
            modes[idx] = mode or ""
        else:
            collector.record(idx, records, reason)
    return modes


def _typed_metadata(series: pd.Series) -> pd.Series:
    """Numbers as floats when every non-empty value is one (like pandas.read_csv), else str."""
    blanked = series.replace("", np.nan)
    try:
        return pd.to_numeric(blanked)
    except (ValueError, TypeError):
        # Re-infer: pandas' own string dtype where it is the default (pandas 3), else object.
        return pd.Series(blanked.tolist(), index=blanked.index)


def _build_manifest(records: pd.DataFrame, metadata: Sequence[str], source: str) -> pd.DataFrame:
    """Manifest rows (contract columns + metadata) from accepted records."""
    out = pd.DataFrame(
        {
            "image_id": records["image_id"].astype(str),
            "path": [str(Path(p).absolute()) for p in records["_path"]],
            "label": records["label"].astype(str),
            "lesion_id": records["lesion_id"].astype(str),
            "source": source,
        }
    )
    if "split" in records.columns:
        out["split"] = records["split"].astype(str)
    if "source_label" in records.columns:
        out["source_label"] = records["source_label"].astype(str)
    for column in metadata:
        if column not in ("split", "label"):
            out[column] = _typed_metadata(records[column])
    return new_manifest(out.reset_index(drop=True))


def _rejects_frame(problems: Sequence[Problem]) -> pd.DataFrame:
    """One line per rejected row/file; several problems of one item share a line."""
    merged: dict[tuple, list[str]] = {}
    for p in problems:
        merged.setdefault((p.image_id, p.path, p.row), []).append(p.reason)
    rows = [
        {"image_id": k[0], "path": k[1], "row": k[2], "reason": "; ".join(v)}
        for k, v in merged.items()
    ]
    df = pd.DataFrame(rows, columns=list(REJECT_COLUMNS))
    df["row"] = df["row"].astype("Int64")
    return df


def _write_rejects(rejects: pd.DataFrame, path: str | Path) -> None:
    """Write ``rejects`` as CSV atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rejects.to_csv(tmp, index=False)
    tmp.replace(path)


def _sort_key(p: Problem) -> tuple:
    return (p.row is None, p.row or 0, p.path, p.reason)


def load_dataset(
    root: str | Path,
    layout: str = "auto",
    *,
    skip_bad: bool = False,
    label_map: dict[str, str | None] | None = None,
    classes: Sequence[str] | None = None,
    source: str | None = None,
    rejects_path: str | Path | None = None,
    check_images: bool = True,
    max_image_bytes: int | None = None,
) -> LoadedDataset:
    """Read and validate the dataset in ``root``; see the module docstring for the rules.

    Args:
        root: dataset folder.
        layout: "auto" (:func:`detect_layout`), "ham10000", "isic" or "folder".
        skip_bad: drop bad rows/files into ``rejects`` instead of raising.
        label_map: source label -> class (None drops the row), applied before ``classes``.
            Rows it drops are not decoded, but CSV and file problems found before mapping
            (missing file, duplicate id, bad one-hot row) are still reported for them.
        classes: allowed classes after mapping. Default: HAM10000_CLASSES (ham10000), the
            one-hot columns (isic), any (folder); with a label map, its non-null targets.
        source: the manifest's ``source`` value (default: the layout name).
        rejects_path: with ``skip_bad``, where rejects are written as CSV (always written,
            header only when nothing was rejected, so a stale file never survives).
        check_images: decode every image (thread pool); False skips only that check.
        max_image_bytes: image files larger than this are rejected from ``stat``, unread
            (default :func:`dermkit.data.images.max_image_bytes`: 64 MiB or
            ``$DERMKIT_MAX_IMAGE_MB``).

    Raises:
        DataValidationError: problems were found and ``skip_bad`` is False, or a problem
            leaves nothing to read (missing CSV/column/folder) or no row survives.
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (expected auto, {', '.join(LAYOUTS)})")
    collector = Collector(root)
    default_classes: Sequence[str] | None = None
    if layout == "ham10000":
        read = _read_ham10000(root, collector)
        default_classes = HAM10000_CLASSES
        records, metadata = read if read else (None, [])
    elif layout == "isic":
        read_isic = _read_isic(root, collector)
        records, metadata, default_classes = read_isic if read_isic else (None, [], None)
    else:
        read = _read_folder(root, collector)
        records, metadata = read if read else (None, [])
    if records is None or collector.fatal:
        raise LayoutError(sorted(collector.problems, key=_sort_key), root)

    _check_duplicates(records, collector)
    _check_split_column(records, collector)
    dropped: dict[str, int] = {}
    if label_map is not None:
        records, dropped = _apply_label_map(records, label_map, collector)
        default_classes = sorted({v for v in label_map.values() if v is not None})
    _check_labels(records, classes if classes is not None else default_classes, collector)
    modes = _check_images(records, collector, max_image_bytes) if check_images else {}

    problems = sorted(collector.problems, key=_sort_key)
    if problems and not skip_bad:
        raise DataValidationError(problems, root)
    good = records.drop(index=sorted(collector.bad_records & set(records.index)))
    if good.empty:
        raise DataValidationError(
            [*problems, Problem(str(root), "", None, "no usable rows left")], root
        )
    manifest = _build_manifest(good, metadata, source or layout)
    check_manifest(manifest)
    rejects = _rejects_frame(problems)
    if skip_bad and rejects_path is not None:
        _write_rejects(rejects, rejects_path)
    if problems:
        log.warning("rejected %d rows/files (%d problems)", len(rejects), len(problems))
    conversions = dict(Counter(m for i, m in modes.items() if i in good.index and m != "RGB"))
    return LoadedDataset(manifest, rejects, conversions, layout, dropped)
