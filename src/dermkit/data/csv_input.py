"""Reading a dataset's labels CSV row by row, so every problem names its line.

The CSV is read with the standard ``csv`` module, which counts physical lines (pandas would
renumber): row N is line N as an editor shows it, header = row 1, exact even with blank
lines or quoted multi-line fields. Undecodable bytes are reported with their row and field.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dermkit.data.manifest import REQUIRED_COLUMNS
from dermkit.data.problems import Collector

# Metadata columns named like manifest contract columns are kept under this prefix, so a
# CSV's own "label" or "path" column can never overwrite the reader's.
CONTRACT_CLASH_PREFIX = "csv_"

log = logging.getLogger(__name__)


_UTF8_BOM = b"\xef\xbb\xbf"


def _bad_utf8_by_line(data: bytes) -> dict[int, tuple[int, int]]:
    """1-based line number -> (file byte offset, byte value) of its first non-UTF-8 byte.

    Decoded line by line, so the offset is exact in the file (a text-mode reader's
    ``UnicodeDecodeError.start`` counts from its current buffer chunk, not the file start).
    Lines are split like ``csv`` with ``newline=""`` counts them (\\n, \\r\\n, \\r).
    """
    bad: dict[int, tuple[int, int]] = {}
    offset = 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad[number] = (offset + e.start, line[e.start])
        offset += len(line)
    return bad


def _utf8_reason(bad: dict[int, tuple[int, int]], first: int, last: int, fields=None) -> str:
    """Why lines ``first..last`` (one CSV row) are unusable: the first bad byte and field."""
    line = next(n for n in range(first, last + 1) if n in bad)
    offset, value = bad[line]
    where = ""
    if fields:
        names = [name for name, text in fields if _has_undecodable(text)]
        where = f" in column '{names[0]}'" if names else ""
    return f"not UTF-8 text: byte 0x{value:02x} at byte {offset} (line {line}){where}"


def _has_undecodable(text: str) -> bool:
    """True where ``surrogateescape`` decoding kept an invalid byte as a lone surrogate."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _printable(text: str) -> str:
    """``text`` with undecodable bytes shown as U+FFFD (safe to print and to write as CSV)."""
    if not _has_undecodable(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_labels_csv(path: Path, collector: Collector, id_column: str) -> pd.DataFrame | None:
    """Read ``path`` as text; returns its rows plus ``_row`` (1-based line number) or None.

    Every value is a stripped string (no type guessing, so ids like "0012" survive).
    Malformed rows (wrong field count) and rows holding bytes that are not UTF-8 are
    reported to ``collector`` (row number, exact byte offset) and left out, so ``skip_bad``
    can drop them; an unreadable or empty file, or a header that is not UTF-8, is fatal.
    """
    header: list[str] | None = None
    records: list[list[str]] = []
    rows: list[int] = []
    try:
        data = path.read_bytes()
    except OSError as e:
        collector.file(path, f"cannot read CSV ({e.strerror or e})", fatal=True)
        return None
    bad_lines = _bad_utf8_by_line(data)
    body = data[len(_UTF8_BOM) :] if data.startswith(_UTF8_BOM) else data
    # surrogateescape keeps every invalid byte as one lone surrogate, so the CSV still
    # parses with exact line numbers and only the rows holding such bytes are refused.
    text = body.decode("utf-8", "surrogateescape")
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        next_line = 1
        for fields in reader:
            line, next_line = next_line, reader.line_num + 1
            values = [v.strip() for v in fields]
            if not any(values):
                continue  # blank line
            encoding_bad = any(n in bad_lines for n in range(line, reader.line_num + 1))
            if header is None:
                if encoding_bad:
                    reason = _utf8_reason(bad_lines, line, reader.line_num)
                    collector.file(path, f"header row is {reason}", fatal=True)
                    return None
                header = values
                continue
            id_pos = header.index(id_column) if id_column in header else -1
            image_id = _printable(values[id_pos]) if 0 <= id_pos < len(values) else ""
            if len(values) != len(header):
                reason = f"row has {len(values)} fields, header has {len(header)}"
                collector.row(path, line, image_id, path, reason)
                continue
            if encoding_bad:
                reason = _utf8_reason(bad_lines, line, reader.line_num, zip(header, values))
                collector.row(path, line, image_id, path, reason)
                continue
            records.append(values)
            rows.append(line)
    except csv.Error as e:
        collector.file(path, f"CSV parse error: {e}", fatal=True)
        return None
    if header is None:
        collector.file(path, "empty CSV (no header row)", fatal=True)
        return None
    duplicated = sorted(c for c, n in Counter(header).items() if n > 1)
    if duplicated:
        collector.file(path, f"duplicate column name(s) {duplicated}", fatal=True)
        return None
    df = pd.DataFrame(records, columns=header, dtype=object)
    df["_row"] = rows
    return df


def protect_contract_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Rename CSV columns that would clash with the manifest or the reader's bookkeeping.

    A CSV's own ``label``, ``path``, ``source``, ``synthetic``, ``source_label`` or
    ``_``-prefixed column becomes ``csv_<name>``, so it is kept but never overwrites what the
    reader sets. ``image_id``, ``lesion_id`` and ``split`` are read as what they say.
    """
    clashing = {*REQUIRED_COLUMNS, "source_label"} - {"image_id", "lesion_id", "split"}
    renames = {
        c: CONTRACT_CLASH_PREFIX + c
        for c in df.columns
        if c != "_row" and (c in clashing or c.startswith("_"))
    }
    if renames:
        log.warning("CSV columns renamed to keep them apart from manifest columns: %s", renames)
    return df.rename(columns=renames)


def require_columns(
    df: pd.DataFrame, columns: Sequence[str], path: Path, collector: Collector
) -> bool:
    """Report every required column missing from ``df`` (read from ``path``)."""
    missing = [c for c in columns if c not in df.columns]
    for column in missing:
        found = [c for c in df.columns if c != "_row"]
        collector.file(path, f"missing required column '{column}' (found {found})", fatal=True)
    return not missing


def csv_header(path: Path) -> list[str]:
    """The stripped header of a CSV, or [] when it cannot be read."""
    try:
        # errors="replace": a bad byte further down must not hide the header from layout
        # detection; read_labels_csv reports it with its row.
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            for fields in csv.reader(f):
                if any(v.strip() for v in fields):
                    return [v.strip() for v in fields]
    except (OSError, csv.Error):
        pass
    return []
