"""Reading and writing the COMP5329 tables (train.csv, test.csv, submissions).

The real files are not valid CSV: captions are wrapped in double quotes but
quotes inside them are not escaped (``"A sign labeled "Seltzer Way," with..."``),
so every standard reader either fails or silently drops and mangles rows. A
spreadsheet-resaved copy, on the other hand, is valid RFC 4180 (``""`` quoting,
CRLF, a trailing comma). We therefore read a file with a strict RFC 4180 parser
when it is valid RFC 4180, and otherwise with the "COMP5329 dialect": only the
last column may hold free text, and a quoted last field runs to the closing
quote that ends its line *and* is followed by the start of the next record.

Every problem is an error naming the file, the physical line and what to do;
no row is ever dropped.
"""

from __future__ import annotations

import bisect
import csv
import io
import re

import pandas as pd

from mlc.io import storage

KNOWN_COLUMNS = ("ImageID", "Labels", "Caption")
# The header forms we accept: train.csv, test.csv, a Kaggle submission, and a bare id list.
SCHEMAS = (("ImageID", "Labels", "Caption"), ("ImageID", "Caption"), ("ImageID", "Labels"), ("ImageID",))


class TableError(ValueError):
    """A malformed table. The message names the file, the line and the problem."""

    def __init__(self, url: str, line: int | None, problem: str):
        self.url, self.line, self.problem = url, line, problem
        where = f"{url}, line {line}" if line is not None else str(url)
        super().__init__(f"{where}: {problem}")


def _decode(url: str, data: bytes) -> str:
    if b"\x00" in data[:65536]:
        raise TableError(url, None, "binary file (NUL bytes), not a CSV text table; check the path")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TableError(url, line, f"not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8") from e
    return text


# Where a quoted last field may close: a quote, optional spreadsheet trailing commas, end of line.
_CLOSE = re.compile(r"\"[ \t]*,*[ \t]*(\r\n|\n|\r|$)")
_EOL = re.compile(r"\r\n|\n|\r")
# A line that starts a record: an id then a comma, an empty id, or a quoted id.
_NEXT_RECORD = re.compile(r"(?:\r\n|\n|\r)(?=[^\s\",]*,|\"[^\"\r\n]*\",)")


def _parse_rfc(text: str) -> list[tuple[int, list[str]]] | None:
    """Parse as strict RFC 4180; None if the text is not valid RFC 4180."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error:
        return None
    # csv.reader's line_num is the line where a record *ends*; we want where it starts.
    out, prev_end = [], 0
    for end, row in rows:
        out.append((prev_end + 1, row))
        prev_end = end
    return out


def _parse_comp5329(url: str, text: str, ncols: int, start: int) -> list[tuple[int, list[str]]]:
    """Parse records whose last field is free text with unescaped quotes (see module docstring)."""
    newlines = [m.end() - 1 for m in _EOL.finditer(text)]

    def line_of(pos: int) -> int:  # 1-based physical line holding text[pos]
        return bisect.bisect_right(newlines, pos - 1) + 1 if pos else 1

    records = []
    pos, n = start, len(text)
    while pos < n:
        eol = _line_end(text, pos)
        if not text[pos:eol].strip():  # a blank line: nothing to read
            pos = _next_line(text, eol)
            continue
        rec_line, line_start = line_of(pos), pos
        fields = []
        for _ in range(ncols - 1):
            comma = text.find(",", pos, eol)
            if comma < 0:
                raise TableError(url, rec_line, f"expected {ncols} fields, found {len(fields) + 1}: "
                                 f"{text[line_start:eol][:80]!r}; every record needs {ncols} comma-separated fields")
            fields.append(_unquote_simple(text[pos:comma]))
            pos = comma + 1
        if pos < n and text[pos] == '"':
            close, after, next_record = _find_close(text, pos)
            if close is None:
                before = (f"the next record on line {line_of(next_record)}" if next_record is not None
                          else "the end of the file")
                raise TableError(url, rec_line, f"a quote opened here is never closed before {before}; "
                                 "close the caption's quote")
            fields.append(text[pos + 1:close])
            pos = after
        else:
            fields.append(text[pos:eol].rstrip(","))  # a spreadsheet's trailing empty column
            pos = _next_line(text, eol)
        records.append((rec_line, fields))
    return records


def _line_end(text: str, pos: int) -> int:
    m = _EOL.search(text, pos)
    return m.start() if m else len(text)


def _next_line(text: str, eol: int) -> int:
    return eol + (2 if text.startswith("\r\n", eol) else 1)


def _unquote_simple(field: str) -> str:
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def _find_close(text: str, open_pos: int) -> tuple[int | None, int, int | None]:
    """The closing quote of a free-text last field opened at ``open_pos``.

    Inner quotes are unescaped, so the field cannot end at the first quote.
    It runs at most to the next line that looks like the start of a record
    (an id and a comma, an empty id, or a quoted id); within that span it ends
    at the last quote that ends a line. Captions that span lines, or hold a
    quote at a line end, stay whole; a quote left open never swallows the
    next record. Returns ``(close, after, next_record_pos)``; ``close`` is
    None when no closing quote precedes the next record.
    """
    m = _NEXT_RECORD.search(text, open_pos)
    limit = m.end() if m else len(text)
    best = None
    for c in _CLOSE.finditer(text, open_pos + 1):
        if c.start() >= limit:
            break
        best = c
    if best is None:
        return None, len(text), m.end() if m else None
    return best.start(), best.end(), None


# A column name as tables write them; anything else in a header line is not shown (the "table" may be any
# file a flag pointed at, and a message must never print a file's content).
_COLUMN_NAME = re.compile(r"^[A-Za-z][\w .-]{0,39}$")


def _describe_header(names: list) -> str:
    shown = [n for n in names if _COLUMN_NAME.match(n)]
    if names and len(shown) == len(names):
        return f"header {','.join(names)}"
    return f"a first line of {len(names)} comma-separated field(s) that are not column names"


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot name a file inside the image folder, or None.

    An ImageID is a file name relative to the image folder (``123.jpg``, ``train/123.jpg``). A table often
    comes from elsewhere, so it must not be able to make a job read (train on, predict, print) a file the
    user never put in that folder: absolute paths, URLs and ``..`` are refused, wherever they appear."""
    if any(ord(c) < 32 for c in image_id):
        return "it holds a control character"
    if image_id.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", image_id):
        return "it is an absolute path"
    if re.match(r"^[A-Za-z][\w+.-]*:", image_id):
        return "it is a URL"
    if ".." in re.split(r"[\\/]", image_id):
        return "'..' would leave the image folder"
    return None


def _id_error(url: str, line: int | None, image_id: str, problem: str) -> "TableError":
    shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
    return TableError(url, line, f"ImageID {shown!r} cannot name an image: {problem}. ImageIDs are file names "
                      "inside the image folder (--images); fix the table")


def read_table(url: str, *, require: tuple[str, ...] | None = None, labelled: bool = False,
               trains: bool = False, require_labels: bool = False) -> pd.DataFrame:
    """Read a COMP5329 table (train.csv, test.csv, a submission) from any URL.

    Returns a DataFrame with ``ImageID`` (str), ``Labels`` (list of label
    strings in file order) where the file has labels, and ``Caption`` (str,
    exactly as written) where it has captions, in file order. ``require``
    names columns the caller needs (e.g. ``("ImageID", "Labels")``).

    An empty Labels cell is an image that shows none of the labels: an all-negative example in a table
    that trains, a correct "nothing here" in a truth table, an image predicted with none in a submission.
    Removing such rows would teach a model that every image shows something. ``labelled``: the table
    trains or is the truth, so it needs a Labels column. ``trains``: a training table, refused when every
    row is empty (nothing to learn). ``require_labels`` (``--require-labels``): every row needs a label,
    and the first empty one is refused, naming its line.
    Every ImageID must name a file inside the image folder (:func:`id_problem`).
    """
    url = str(url)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as e:
        raise TableError(url, None, "file not found; check --data or the table's path") from e
    text = _decode(url, data)
    if not text.strip():
        raise TableError(url, 1, "empty file; expected a header such as ImageID,Labels,Caption")

    header_end = _line_end(text, 0)
    header = [h.strip().strip('"') for h in text[:header_end].split(",")]
    trailing_empty = False
    while len(header) > 1 and header[-1] == "":  # spreadsheet tools add an empty last column
        header.pop()
        trailing_empty = True
    if tuple(header) not in SCHEMAS:
        raise TableError(url, 1, f"unexpected header: {_describe_header(header)}; expected one of "
                         + "; ".join(",".join(s) for s in SCHEMAS))
    if (labelled or trains or require_labels) and "Labels" not in (require or ()):
        require = tuple(require or ()) + ("Labels",)
    missing = [c for c in (require or ()) if c not in header]
    if missing:
        raise TableError(url, 1, f"header {','.join(header)} lacks required column(s) {', '.join(missing)}")
    rfc = _parse_rfc(text)
    if rfc is not None:
        records = _rfc_records(url, header, rfc, trailing_empty)
    else:
        body = header_end + (2 if text.startswith("\r\n", header_end) else 1)
        records = _parse_comp5329(url, text, len(header), body)

    df = _to_frame(url, header, records, require_labels)
    if trains and not any(len(labs) for labs in df.Labels):
        raise TableError(url, None, f"every one of its {len(df)} rows has an empty Labels field: there is nothing to "
                         "learn; label at least some images (an empty field is an image with none of the labels)")
    return df


def _rfc_records(url: str, header: list[str], rfc: list, trailing_empty: bool) -> list:
    """The records of a valid RFC 4180 text, each checked against the header."""
    ncols, records = len(header), []
    for line, row in rfc[1:]:
        if not row:
            continue
        if trailing_empty and len(row) > ncols and not row[-1]:
            row = row[:-1]
        if len(row) > ncols and header[-1] == "Caption":
            # An unquoted caption holding a comma (spreadsheets write these): the text belongs together.
            row = row[:ncols - 1] + [",".join(row[ncols - 1:])]
        if len(row) != ncols:
            raise TableError(url, line, f"expected {ncols} fields ({','.join(header)}), found {len(row)}")
        records.append((line, row))
    return records


def _to_frame(url: str, header: list[str], records: list, require_labels: bool = False) -> pd.DataFrame:
    seen: dict[str, int] = {}
    ids, labels, captions = [], [], []
    has_labels, has_caption = "Labels" in header, "Caption" in header
    li = header.index("Labels") if has_labels else None
    ci = header.index("Caption") if has_caption else None
    for line, row in records:
        image_id = row[0].strip()
        if not image_id:
            raise TableError(url, line, "record without ImageID; every row must start with the image's file name")
        if (problem := id_problem(image_id)) is not None:
            raise _id_error(url, line, image_id, problem)
        if image_id in seen:
            raise TableError(url, line, f"duplicate ImageID {image_id!r} (first on line {seen[image_id]}); "
                             "each image must appear once")
        seen[image_id] = line
        ids.append(image_id)
        if has_labels:
            labs = row[li].split()
            if not labs and require_labels:
                raise TableError(url, line, f"empty Labels field for {image_id}, and --require-labels asks every "
                                 "image for a label; label it, or drop --require-labels to train on it as an "
                                 "image with none of the labels")
            labels.append(labs)
        if has_caption:
            captions.append(row[ci])
    cols = {"ImageID": pd.Series(ids, dtype=object)}
    if has_labels:
        cols["Labels"] = pd.Series(labels, dtype=object)
    if has_caption:
        cols["Caption"] = pd.Series(captions, dtype=object)
    return pd.DataFrame(cols)


def submission_csv(image_ids, label_lists) -> str:
    """Kaggle submission text: ``ImageID,Labels`` with labels space-separated."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["ImageID", "Labels"])
    for image_id, labs in zip(image_ids, label_lists):
        w.writerow([image_id, " ".join(labs)])
    return out.getvalue()


def captions_of(df: pd.DataFrame) -> list:
    """A table's captions, one per row (None for every row of a table without a Caption column)."""
    return df.Caption.tolist() if "Caption" in df.columns else [None] * len(df)


def unlabelled_rows(df: pd.DataFrame) -> int:
    """Rows whose Labels field is empty: images that show none of the labels."""
    return sum(1 for labs in df.Labels if not labs) if "Labels" in df.columns else 0


def read_ids(url: str) -> list[str]:
    """The ImageID column of a COMP5329 table or of any RFC 4180 CSV that has one (for prediction lists)."""
    return read_ids_captions(url)[0]


def read_ids_captions(url: str) -> tuple[list[str], list | None]:
    """The ImageID column and, when the table has one, the Caption column (else None): the rows to predict."""
    url = str(url)
    try:
        df = read_table(url, require=("ImageID",))
        return df.ImageID.tolist(), (captions_of(df) if "Caption" in df.columns else None)
    except TableError as e:
        if "unexpected header" not in e.problem:
            raise
    rows = _parse_rfc(_decode(url, storage.read_bytes(url)))
    if rows is None:
        raise TableError(url, None, "not a valid CSV file; quote fields that hold commas or quotes")
    header = [h.strip() for h in rows[0][1]] if rows else []
    if "ImageID" not in header:
        raise TableError(url, 1, f"no ImageID column in {_describe_header(header)}")
    col = header.index("ImageID")
    cap = header.index("Caption") if "Caption" in header else None
    ids, captions, seen = [], [], {}
    for line, row in rows[1:]:
        if not row:
            continue
        image_id = row[col].strip() if col < len(row) else ""
        if not image_id:
            raise TableError(url, line, "record without ImageID")
        if (problem := id_problem(image_id)) is not None:
            raise _id_error(url, line, image_id, problem)
        if image_id in seen:
            raise TableError(url, line, f"duplicate ImageID {image_id!r} (first on line {seen[image_id]})")
        seen[image_id] = line
        captions.append(row[cap] if cap is not None and cap < len(row) else None)
        ids.append(image_id)
    return ids, (captions if cap is not None else None)
