"""mlc.data.table.read_table against the real COMP5329 files and against malformed copies of their format.

The reference for the real files is plain Python on the raw text, independent of the parser: a record
starts where a line begins with the next ImageID in sequence, and its caption is the text between the
first ``"`` after the (ncols-1)-th comma and the last ``"`` of the record.
"""

from __future__ import annotations

import io
import uuid

import fsspec
import pytest
from PIL import Image

from mlc.data.table import unlabelled_rows, TableError, read_table, submission_csv

N_TRAIN, N_TEST = 30_000, 10_000
TRAIN_IDS = [f"{i}.jpg" for i in range(N_TRAIN)]
TEST_IDS = [f"{i}.jpg" for i in range(N_TRAIN, N_TRAIN + N_TEST)]


# ---------------------------------------------------------------------------------------------
# plain-Python reference for the raw files


def _raw_records(path, ids: list[str]) -> dict[str, str]:
    """ImageID -> the raw text of its record (without the final line break), found by sequential ids."""
    text = path.read_bytes().decode("utf-8")
    starts = []
    pos = 0
    for i, image_id in enumerate(ids):
        key = image_id + ","
        if i == 0:
            at = text.find("\n" + key) + 1
        else:
            at = text.find("\n" + key, pos) + 1
        assert at > 0, f"raw reference: {image_id} not found at a line start in {path}"
        starts.append(at)
        pos = at
    out = {}
    for i, image_id in enumerate(ids):
        end = starts[i + 1] if i + 1 < len(ids) else len(text)
        out[image_id] = text[starts[i]:end].rstrip("\r\n")
    return out


def _raw_caption(record: str, ncols: int) -> str:
    cut = 0
    for _ in range(ncols - 1):
        cut = record.index(",", cut) + 1
    first = record.index('"', cut)
    return record[first + 1:record.rindex('"')]


def _raw_line(path, image_id: str) -> str:
    """The single physical line that starts with ``image_id,``."""
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            if line.startswith(image_id + ","):
                return line.rstrip("\r\n")
    raise AssertionError(f"{image_id} not found in {path}")


@pytest.fixture(scope="module")
def raw_train(real_data):
    return _raw_records(real_data / "train.csv", TRAIN_IDS)


@pytest.fixture(scope="module")
def raw_test(real_data):
    return _raw_records(real_data / "test.csv", TEST_IDS)


# ---------------------------------------------------------------------------------------------
# the real files


def test_real_train_rows_in_file_order(real_train):
    assert list(real_train.columns) == ["ImageID", "Labels", "Caption"]
    assert len(real_train) == N_TRAIN
    assert list(real_train.ImageID) == TRAIN_IDS


def test_real_test_rows_in_file_order(real_test):
    assert list(real_test.columns) == ["ImageID", "Caption"]
    assert len(real_test) == N_TEST
    assert list(real_test.ImageID) == TEST_IDS


# Exact strings from SOURCE.md and the files: the records that break a naive reader's field count.
BROKEN_RECORDS = [
    ("train.csv", "9084.jpg",
     'A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground and a street stretching '
     "into the background."),
    ("train.csv", "9508.jpg", 'A cow in street with writing that reads "oh no, not beef on the menu again!"'),
    ("train.csv", "18112.jpg", 'A small hand is forming the"thumbs up," signal.'),
    ("train.csv", "27167.jpg",
     'A street sign that says "Sex St," along with a sign saying there is a $350 penalty is you honk.'),
    ("train.csv", "552.jpg",
     'A yellow and blue fire hydrant that has falling into the street with "caution" tape around it.'),
    ("test.csv", "36889.jpg", 'Stop sign with added "war" annotation, at an intersection.'),
]


@pytest.mark.parametrize("fname,image_id,expected", BROKEN_RECORDS, ids=[r[1] for r in BROKEN_RECORDS])
def test_real_captions_with_inner_quotes_are_exact(real_data, real_train, real_test, fname, image_id, expected):
    table = real_train if fname == "train.csv" else real_test
    ncols = len(table.columns)
    raw = _raw_caption(_raw_line(real_data / fname, image_id), ncols)
    assert raw == expected  # the reference itself agrees with SOURCE.md
    got = table.Caption[table.ImageID == image_id]
    assert len(got) == 1
    assert got.item() == expected


def test_real_every_caption_and_label_matches_the_raw_text(real_train, real_test, raw_train, raw_test):
    for image_id, caption, labels in zip(real_train.ImageID, real_train.Caption, real_train.Labels):
        rec = raw_train[image_id]
        assert caption == _raw_caption(rec, 3), image_id
        assert labels == rec.split(",")[1].split(), image_id
    for image_id, caption in zip(real_test.ImageID, real_test.Caption):
        assert caption == _raw_caption(raw_test[image_id], 2), image_id


def test_real_quote_counts(real_train, real_test, raw_train, raw_test):
    assert sum('"' in c for c in real_train.Caption) == 82
    assert sum('"' in c for c in real_test.Caption) == 29
    # the same count from the raw records: more than the two wrapping quotes
    assert sum(r.count('"') > 2 for r in raw_train.values()) == 82
    assert sum(r.count('"') > 2 for r in raw_test.values()) == 29


@pytest.mark.parametrize("image_id,newlines", [("1014.jpg", 1), ("2259.jpg", 1), ("6751.jpg", 1), ("24624.jpg", 14)])
def test_real_multiline_captions_are_whole(real_train, raw_train, image_id, newlines):
    caption = real_train.Caption[real_train.ImageID == image_id].item()
    assert caption.count("\n") == newlines
    assert caption == _raw_caption(raw_train[image_id], 3)
    # the record after it is its own row, not part of the caption
    nxt = f"{int(image_id[:-4]) + 1}.jpg"
    assert nxt not in caption
    assert (real_train.ImageID == nxt).sum() == 1


def test_real_24624_caption(real_train):
    caption = real_train.Caption[real_train.ImageID == "24624.jpg"].item()
    assert caption == ("A couple of men standing around an exercise w" + "\n" * 14
                       + "A couple of men standing and sitting around an exercise bike with a green neon light.")


@pytest.mark.parametrize("fname,image_id,fragment", [
    ("train.csv", "448.jpg", "boogie/body"),
    ("test.csv", "30615.jpg", "and/or"),
])
def test_real_slashes_are_kept(real_train, real_test, fname, image_id, fragment):
    table = real_train if fname == "train.csv" else real_test
    caption = table.Caption[table.ImageID == image_id].item()
    assert fragment in caption


def test_real_448_caption(real_train):
    assert real_train.Caption[real_train.ImageID == "448.jpg"].item() == "Two children on boogie/body boards in the ocean."


def test_real_labels_are_string_lists_in_file_order(real_data, real_train):
    by_id = dict(zip(real_train.ImageID, real_train.Labels))
    assert by_id["0.jpg"] == ["1"]
    assert by_id["1.jpg"] == ["1", "19"]
    assert all(isinstance(labs, list) and labs and all(isinstance(x, str) for x in labs) for labs in real_train.Labels)
    # an unsorted label field in the file stays unsorted
    assert _raw_line(real_data / "train.csv", "3.jpg").startswith("3.jpg,8 3 13,")
    assert by_id["3.jpg"] == ["8", "3", "13"]
    unsorted = [labs for labs in real_train.Labels if labs != sorted(labs, key=int)]
    assert len(unsorted) > 1000  # thousands of rows list their labels unsorted; none were reordered


def test_real_variant_excel_resaved_matches_original(real_data, real_train, real_test):
    vdir = real_data / "variant_2021_excel_resaved"
    if not (vdir / "train.csv").is_file():
        pytest.skip(f"{vdir} not present")
    vtrain = read_table(str(vdir / "train.csv"))
    vtest = read_table(str(vdir / "test.csv"))
    assert list(vtrain.columns) == ["ImageID", "Labels", "Caption"]  # the trailing empty column is dropped
    assert list(vtrain.ImageID) == list(real_train.ImageID)
    assert list(vtrain.Labels) == list(real_train.Labels)
    assert list(vtest.ImageID) == list(real_test.ImageID)
    # captions differ only where the 2021 copy was already mangled: inner quotes, and '/' for '.'
    slash = {"4787.jpg", "14712.jpg", "14957.jpg", "29877.jpg"}
    for image_id, a, b in zip(real_train.ImageID, real_train.Caption, vtrain.Caption):
        if '"' not in a and image_id not in slash:
            assert a == b, image_id
    v = dict(zip(vtrain.ImageID, vtrain.Caption))
    assert v["4787.jpg"] == "Man and his dog laying on the floor inside of a room/"
    # Excel "" quoting is unescaped: the raw line is ..."caution"" tape around it.""",
    assert v["552.jpg"] == 'A yellow and blue fire hydrant that has falling into the street with caution" tape around it."'
    assert v["1014.jpg"] == dict(zip(real_train.ImageID, real_train.Caption))["1014.jpg"]  # multi-line in a CRLF file


def test_real_train_as_crlf_reads_the_same(real_data, real_train, tmp_path):
    """The Kaggle download may have had CRLF line ends."""
    p = tmp_path / "train_crlf.csv"
    p.write_bytes((real_data / "train.csv").read_bytes().replace(b"\n", b"\r\n"))
    t = read_table(str(p))
    assert list(t.ImageID) == list(real_train.ImageID)
    assert list(t.Labels) == list(real_train.Labels)
    assert [c.replace("\r\n", "\n") for c in t.Caption] == list(real_train.Caption)
    assert not any(c.endswith("\r") or c.startswith("\n") for c in t.Caption)


def test_real_test_without_trailing_newline(real_data, real_test, tmp_path):
    p = tmp_path / "test.csv"
    data = (real_data / "test.csv").read_bytes()
    assert data.endswith(b"\n")
    p.write_bytes(data.rstrip(b"\n"))
    t = read_table(str(p))
    assert list(t.ImageID) == list(real_test.ImageID)
    assert list(t.Caption) == list(real_test.Caption)


# ---------------------------------------------------------------------------------------------
# malformed inputs: every problem is a TableError naming the file and the physical line

HEADER = "ImageID,Labels,Caption\n"
# Line 2. "rfc" keeps the file valid RFC 4180 up to the bad part; "comp5329" has an unescaped inner
# quote (as 82 real rows do), so the whole file is read by the COMP5329-dialect parser.
FIRST = {"rfc": '0.jpg,1,"A plain caption."\n', "comp5329": '0.jpg,1,"A sign reading "STOP" here."\n'}



def _write(tmp_path, text: str | bytes, name: str = "table.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return p


def _assert_error(p, line: int | None, *fragments: str, require=None, labelled=True, **kw) -> TableError:
    with pytest.raises(TableError) as ei:
        read_table(str(p), require=require, labelled=labelled, **kw)
    e = ei.value
    msg = str(e)
    assert isinstance(e, ValueError)
    assert e.url == str(p)
    assert str(p) in msg
    assert e.line == line
    if line is not None:
        assert f"line {line}:" in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return e


MALFORMED = [
    # name, body after line 2, expected line, message fragments, marks per dialect
    ("no_image_id", ',2,"b"\n3.jpg,3,"c"\n', 3, ("without ImageID",), {}),
    ("quoted_empty_image_id", '"",2,"b"\n', 3, ("without ImageID",), {}),
    ("quote_never_closed_before_eof", '1.jpg,2,"b never closed\n', 3, ("never closed",), {}),
    ("quote_never_closed_multiline", '1.jpg,2,"b never closed\nstill the caption\n', 3, ("never closed",), {}),
    ("quote_left_open_mid_file", '1.jpg,2,"b\n2.jpg,3,"c"\n3.jpg,4,"d"\n', 3, ("never closed before the next record on line 4",),
     {}),
    ("duplicate_after_multiline", '1.jpg,2,"two\nlines"\n0.jpg,3,"c"\n', 5,
     ("duplicate ImageID '0.jpg'", "first on line 2"), {}),
    ("too_few_fields_id_only", '1.jpg\n2.jpg,3,"c"\n', 3, ("expected 3 fields",), {}),
    ("too_few_fields_two", '1.jpg,2\n2.jpg,3,"c"\n', 3, ("expected 3 fields", "found 2"), {}),
]


def _malformed_params():
    for name, body, line, frags, bugs in MALFORMED:
        for dialect in ("rfc", "comp5329"):
            marks = [bugs[dialect]] if dialect in bugs else []
            yield pytest.param(dialect, body, line, frags, id=f"{name}-{dialect}", marks=marks)


@pytest.mark.parametrize("dialect,body,line,frags", list(_malformed_params()))
def test_malformed_record(tmp_path, dialect, body, line, frags):
    p = _write(tmp_path, HEADER + FIRST[dialect] + body)
    _assert_error(p, line, *frags)


@pytest.mark.parametrize("header", ["ImageID,Label,Caption", "ImageId,Labels,Caption", "id,labels",
                                    "Labels,ImageID,Caption", "0.jpg,1,A caption"])
def test_wrong_header(tmp_path, header):
    p = _write(tmp_path, header + '\n0.jpg,1,"a"\n')
    _assert_error(p, 1, "unexpected header", "expected one of")


def test_required_column_missing(tmp_path):
    p = _write(tmp_path, 'ImageID,Caption\n30000.jpg,"a"\n')
    _assert_error(p, 1, "lacks required column", "Labels", require=("ImageID", "Labels"))


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data", [_png_bytes(), b"ImageID,Labels\x00\x01\x02\n0.jpg,1\n"], ids=["png", "nul_bytes"])
def test_binary_file(tmp_path, data):
    p = _write(tmp_path, data, "train.csv")
    _assert_error(p, None, "binary file")


def test_non_utf8(tmp_path):
    data = (HEADER + '0.jpg,1,"a"\n').encode() + '1.jpg,2,"caf\xe9 au lait"\n'.encode("latin-1")
    _assert_error(_write(tmp_path, data), 3, "not UTF-8")


@pytest.mark.parametrize("data", [b"", b"   \n\n", b"\xef\xbb\xbf"], ids=["empty", "blank_lines", "bom_only"])
def test_empty_file(tmp_path, data):
    _assert_error(_write(tmp_path, data), 1, "empty file")


def test_missing_file(tmp_path):
    p = tmp_path / "nope" / "train.csv"
    _assert_error(p, None, "not found")


def test_missing_memory_url():
    url = f"memory://mlc-test-{uuid.uuid4().hex}/train.csv"
    with pytest.raises(TableError) as ei:
        read_table(url)
    assert url in str(ei.value) and "not found" in str(ei.value)


def test_duplicate_in_submission(tmp_path):
    p = _write(tmp_path, "ImageID,Labels\n0.jpg,1\n1.jpg,2 3\n0.jpg,3\n")
    _assert_error(p, 4, "duplicate ImageID '0.jpg'", "first on line 2")


@pytest.mark.parametrize("dialect", ["rfc", "comp5329"])
@pytest.mark.parametrize("cell", ["", " "])
def test_empty_labels_are_images_with_none_of_the_labels(tmp_path, dialect, cell):
    """An empty (or blank) Labels cell reads as an empty label list in every kind of table: an all-negative
    training example, a truth row of none of the labels, a submission row predicted with none."""
    p = _write(tmp_path, HEADER + FIRST[dialect] + f'1.jpg,{cell},"b"\n2.jpg,3,"c"\n')
    t = read_table(str(p), trains=True)
    assert list(t.Labels) == [["1"], [], ["3"]] and unlabelled_rows(t) == 1
    assert list(read_table(str(p), labelled=True).Labels) == [["1"], [], ["3"]]


@pytest.mark.parametrize("dialect", ["rfc", "comp5329"])
def test_require_labels_refuses_the_first_empty_row_naming_its_line(tmp_path, dialect):
    p = _write(tmp_path, HEADER + FIRST[dialect] + '1.jpg,2,"b"\n2.jpg,,"c"\n3.jpg, ,"d"\n')
    _assert_error(p, 4, "empty Labels", "2.jpg", "--require-labels", trains=True, require_labels=True)


def test_a_training_table_with_no_label_at_all_is_refused(tmp_path):
    """Every row empty: nothing to learn, refused naming the file (not an empty vocabulary later). A truth
    table or a submission of such rows is still read."""
    text = "ImageID,Labels,Caption\n0.jpg,,a\n1.jpg,,b\n"
    _assert_error(_write(tmp_path, text), None, "every one of its 2 rows", "empty Labels", "nothing to learn",
                  trains=True)
    assert unlabelled_rows(read_table(str(_write(tmp_path, text)), labelled=True)) == 2
    _assert_error(_write(tmp_path, "ImageID,Caption\n0.jpg,a\n"), 1, "lacks required column", "Labels")


@pytest.mark.parametrize("image_id,problem", [
    ("../../../../../etc/shadow", "'..' would leave the image folder"),
    ("sub/../../x.jpg", "'..'"),
    ("/etc/hostname", "absolute path"),
    ("\\\\server\\share\\x.jpg", "absolute path"),
    ("C:\\x.jpg", "absolute path"),
    ("gs://other-bucket/x.jpg", "a URL"),
    ("file:///etc/passwd", "a URL"),
])
@pytest.mark.parametrize("dialect", ["rfc", "comp5329", "ids_only"])
def test_an_image_id_that_would_leave_the_image_folder_is_refused_with_its_line(tmp_path, image_id, problem,
                                                                                 dialect):
    from mlc.data.table import read_ids
    if dialect == "ids_only":  # any CSV with an ImageID column (jobs/predict.py --ids)
        p = _write(tmp_path, f"Other,ImageID\nx,0.jpg\ny,{image_id}\n")
        with pytest.raises(TableError) as ei:
            read_ids(str(p))
    else:
        caption = '"a ""quoted"" word"' if dialect == "rfc" else '"a "quoted" word"'
        p = _write(tmp_path, f"ImageID,Labels,Caption\n0.jpg,1,{caption}\n{image_id},2,{caption}\n")
        with pytest.raises(TableError) as ei:
            read_table(str(p))
    assert ei.value.line == 3 and problem in str(ei.value) and "inside the image folder" in str(ei.value)


def test_ids_inside_subfolders_are_fine(tmp_path):
    t = read_table(str(_write(tmp_path, "ImageID,Labels\ntrain/0.jpg,1\n./1.jpg,2\nx..y.jpg,3\n")))
    assert list(t.ImageID) == ["train/0.jpg", "./1.jpg", "x..y.jpg"]


def test_a_file_that_is_no_table_is_not_shown_in_the_error(tmp_path):
    """A flag pointing at the wrong file (or a secret) gets a description, never the file's first line."""
    p = _write(tmp_path, "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/usr/sbin/nologin\n")
    for read in (read_table, lambda u: __import__("mlc.data.table", fromlist=["read_ids"]).read_ids(u)):
        with pytest.raises(TableError) as ei:
            read(str(p))
        assert "root:x" not in str(ei.value) and "bash" not in str(ei.value)
    e = _assert_error(_write(tmp_path, "ImageId,Labels,Caption\n0.jpg,1,a\n"), 1, "header ImageId,Labels,Caption")
    assert "expected one of" in str(e)


# ---------------------------------------------------------------------------------------------
# encodings, line ends and URLs

SMALL = (HEADER + '0.jpg,1 19,"A sign reading "STOP," here."\n'
         + '1.jpg,2,"two\nlines"\n'
         + '2.jpg,3 1,"plain"\n')
SMALL_EXPECTED = {"ImageID": ["0.jpg", "1.jpg", "2.jpg"],
                  "Labels": [["1", "19"], ["2"], ["3", "1"]],
                  "Caption": ['A sign reading "STOP," here.', "two\nlines", "plain"]}


def _as_lists(df):
    return {c: list(df[c]) for c in df.columns}


def test_small_lf(tmp_path):
    assert _as_lists(read_table(str(_write(tmp_path, SMALL)))) == SMALL_EXPECTED


def test_crlf(tmp_path):
    t = read_table(str(_write(tmp_path, SMALL.replace("\n", "\r\n"))))
    assert list(t.ImageID) == SMALL_EXPECTED["ImageID"]
    assert list(t.Labels) == SMALL_EXPECTED["Labels"]
    assert [c.replace("\r\n", "\n") for c in t.Caption] == SMALL_EXPECTED["Caption"]
    assert t.Caption[0] == SMALL_EXPECTED["Caption"][0]  # no stray \r


def test_crlf_error_line_numbers(tmp_path):
    body = SMALL + '3.jpg,4,"x"\n1.jpg,5,"dup"\n'
    p = _write(tmp_path, body.replace("\n", "\r\n"))
    _assert_error(p, 7, "duplicate ImageID '1.jpg'", "first on line 3")


def test_cr_only_error_line_numbers(tmp_path):
    p = _write(tmp_path, (SMALL.replace("two\nlines", "two lines") + '1.jpg,5,"dup"\n').replace("\n", "\r"))
    _assert_error(p, 5, "duplicate ImageID '1.jpg'", "first on line 3")


def test_no_trailing_newline(tmp_path):
    assert _as_lists(read_table(str(_write(tmp_path, SMALL.rstrip("\n"))))) == SMALL_EXPECTED
    rfc = 'ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,2,"end"'
    assert list(read_table(str(_write(tmp_path, rfc, "rfc.csv"))).Caption) == ["a", "end"]


def test_bom(tmp_path):
    t = read_table(str(_write(tmp_path, b"\xef\xbb\xbf" + SMALL.encode())))
    assert list(t.columns) == ["ImageID", "Labels", "Caption"]
    assert _as_lists(t) == SMALL_EXPECTED


def test_memory_url():
    url = f"memory://mlc-test-{uuid.uuid4().hex}/train.csv"
    with fsspec.open(url, "wb") as f:
        f.write(SMALL.encode())
    try:
        assert _as_lists(read_table(url)) == SMALL_EXPECTED
    finally:
        fs = fsspec.filesystem("memory")
        fs.rm(url.split("://", 1)[1])


def test_memory_url_error_names_url():
    url = f"memory://mlc-test-{uuid.uuid4().hex}/train.csv"
    with fsspec.open(url, "wb") as f:
        f.write((HEADER + '0.jpg,1,"a"\n0.jpg,2,"b"\n').encode())
    try:
        with pytest.raises(TableError) as ei:
            read_table(url)
        assert ei.value.line == 3 and url in str(ei.value)
    finally:
        fsspec.filesystem("memory").rm(url.split("://", 1)[1])


# ---------------------------------------------------------------------------------------------
# submissions


def test_submission_csv_round_trip(tmp_path):
    ids = ["30000.jpg", "30001.jpg", "30002.jpg", "30003.jpg"]
    labels = [["1", "19"], [], ["19", "1", "3"], ["cat"]]
    text = submission_csv(ids, labels)
    assert text.splitlines()[0] == "ImageID,Labels"
    assert text.splitlines()[1] == "30000.jpg,1 19"
    p = _write(tmp_path, text, "submission.csv")
    t = read_table(str(p), require=("ImageID", "Labels"))
    assert list(t.columns) == ["ImageID", "Labels"]
    assert list(t.ImageID) == ids
    assert list(t.Labels) == labels


def test_read_table_is_public_at_package_level(tmp_path):
    import mlc
    p = _write(tmp_path, 'ImageID,Caption\n5.jpg,"a "b" c"\n')
    df = mlc.read_table(str(p))
    assert df.ImageID.tolist() == ["5.jpg"] and df.Caption.tolist() == ['a "b" c']
