"""Feature stores: every reader and converter round-trips files written here in the users' formats; bad data is
named."""
import base64
import json
import os
import pickle
import subprocess
import sys

import lmdb
import msgpack
import numpy as np
import pytest

from vilbert.data import (BadRecordError, NativeStore, OfficialFeatureLmdb, OfficialPretrainLmdb, StoreWriter,
                          TsvReader, convert, detect_format, open_store, verify_store)
from vilbert.data.__main__ import main
from vilbert.data.stores import validate_record

FEATURE_DIM = 2048
NUM_CLASSES = 1601


def make_records(seed, count=5, captions=True):
    """Records like a detector's: odd region counts (including 1), non-negative features, pixel boxes."""
    rng = np.random.default_rng(seed)
    records = []
    for i, num_boxes in enumerate([1, 7, 3, 10, 36][:count]):
        width, height = int(rng.integers(200, 800)), int(rng.integers(200, 800))
        corner = rng.uniform(0, 100, size=(num_boxes, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(1, 100, size=(num_boxes, 2))], axis=1)
        cls_prob = rng.dirichlet(np.full(NUM_CLASSES, 0.1), size=num_boxes)
        record = {"image_id": str(1000 + i), "image_w": width, "image_h": height,
                  "features": np.abs(rng.normal(size=(num_boxes, FEATURE_DIM))).astype(np.float32) * 3,
                  "boxes": boxes.astype(np.float32), "cls_prob": cls_prob.astype(np.float32)}
        if captions:
            record["captions"] = [f"caption {i} of image {record['image_id']}"]
        records.append(record)
    return records


def b64(array):
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes())


def write_tsv(path, records, header=False, cls_prob=True):
    """The bottom-up-attention extractor's TSV (no header row by default)."""
    fields = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"] + (["cls_prob"] if cls_prob else [])
    with open(path, "wb") as f:
        if header:
            f.write("\t".join(fields).encode() + b"\n")
        for r in records:
            cells = [r["image_id"].encode(), str(r["image_w"]).encode(), str(r["image_h"]).encode(),
                     str(len(r["boxes"])).encode(), b64(r["boxes"]), b64(r["features"])]
            if cls_prob:
                cells.append(b64(r["cls_prob"]))
            f.write(b"\t".join(cells) + b"\n")


def write_official_lmdb(path, records, base64_arrays=False, num_boxes=True):
    """vilbert-multi-task's downstream feature LMDB: str(image_id) -> pickled dict; b"keys" -> pickled key list."""
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for r in records:
            item = {"image_id": int(r["image_id"]), "image_h": r["image_h"], "image_w": r["image_w"]}
            if num_boxes:
                item["num_boxes"] = len(r["boxes"])
            for field in ("boxes", "features"):
                item[field] = b64(r[field]) if base64_arrays else r[field]
            txn.put(r["image_id"].encode(), pickle.dumps(item))
        txn.put(b"keys", pickle.dumps([r["image_id"].encode() for r in records]))
    env.close()


def msgpack_numpy_default(obj):
    """msgpack-numpy's encoding of numpy values, which tensorpack's serializer uses."""
    if isinstance(obj, np.ndarray):
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": obj.shape, b"data": obj.tobytes()}
    if isinstance(obj, np.generic):
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    raise TypeError(type(obj))


def write_tensorpack_lmdb(path, records, subdir=False, with_keys=True, use_bin_type=True):
    """The official pretraining LMDB as tensorpack's LMDBSerializer writes it (a single file unless subdir; old msgpack
    versions wrote without use_bin_type)."""
    env = lmdb.open(str(path), subdir=subdir, map_size=1 << 30)
    keys = []
    with env.begin(write=True) as txn:
        for i, r in enumerate(records):
            key = b"%08d" % i
            datapoint = [r["features"], r["cls_prob"], r["boxes"], np.int64(len(r["boxes"])), np.int64(r["image_h"]),
                         np.int64(r["image_w"]), r["image_id"], r["captions"][0]]
            txn.put(key, msgpack.packb(datapoint, default=msgpack_numpy_default, use_bin_type=use_bin_type))
            keys.append(key)
        if with_keys:
            txn.put(b"__keys__", msgpack.packb(keys, use_bin_type=use_bin_type))
    env.close()


def assert_same_record(got, want, fp16=False, captions=True, cls_prob=True):
    assert got["image_id"] == want["image_id"]
    assert (got["image_w"], got["image_h"]) == (want["image_w"], want["image_h"])
    np.testing.assert_array_equal(got["boxes"], want["boxes"])
    # The native store gives its float16 arrays as they are; other readers give float32.
    stored = np.float16 if fp16 else np.float32
    assert got["features"].dtype == stored
    np.testing.assert_array_equal(got["features"], want["features"].astype(stored))
    if cls_prob:
        assert got["cls_prob"].dtype == stored
        np.testing.assert_array_equal(got["cls_prob"], want["cls_prob"].astype(stored))
    else:
        assert "cls_prob" not in got
    if captions:
        assert got["captions"] == want["captions"]


@pytest.fixture
def records():
    return make_records(seed=0)


def test_native_store_round_trip(tmp_path, records):
    with StoreWriter(tmp_path / "store") as writer:
        for r in records:
            writer.add(r)
    store = open_store(tmp_path / "store")
    assert isinstance(store, NativeStore) and len(store) == len(records)
    assert store.meta["count"] == len(records) and store.meta["num_classes"] == NUM_CLASSES
    for i in (0, 3, -1, 2, 1, 4):  # random access, negative index
        assert_same_record(store[i], records[i], fp16=True)
    with pytest.raises(IndexError):
        store[len(records)]
    assert not list(tmp_path.glob("*.partial-*"))
    # Many readers at once: a second store object on the same files shares this process's handle.
    assert_same_record(NativeStore(tmp_path / "store")[4], records[4], fp16=True)
    assert store.image_ids() == [r["image_id"] for r in records]


def test_tsv_reader_and_converter(tmp_path, records):
    write_tsv(tmp_path / "a.tsv", records)
    write_tsv(tmp_path / "b.tsv", records, header=True, cls_prob=False)
    captions = {r["image_id"]: r["captions"][0] for r in records}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    for name in ("a.tsv", "b.tsv"):
        assert detect_format(tmp_path / name) == "tsv"
        reader = open_store(tmp_path / name)
        assert isinstance(reader, TsvReader) and len(reader) == len(records)
        for i in (4, 0, 2):
            assert_same_record(reader[i], records[i], captions=False, cls_prob=name == "a.tsv")
        assert reader.image_ids() == [r["image_id"] for r in records]
    with open(tmp_path / "b.tsv", "ab") as f:
        f.write(b"123\r\n")  # a row cut after its id: the id as the row's reader sees it
    assert open_store(tmp_path / "b.tsv").image_ids()[-1] == "123"
    meta = convert(tmp_path / "a.tsv", tmp_path / "store", "tsv", captions=tmp_path / "captions.json",
                   progress=False)
    assert meta["count"] == len(records) and meta["skipped"] == 0
    store = open_store(tmp_path / "store")
    for i, r in enumerate(records):
        assert_same_record(store[i], r, fp16=True)


def test_single_file_lmdb_whose_first_line_holds_a_tab_is_not_a_tsv(tmp_path):
    """tensorpack writes the official pretraining LMDB as one file; its meta page's counters can put a tab before the
    first newline byte (here after 38 write transactions), which a TSV sniff alone would take for a TSV header."""
    path = str(tmp_path / "one_file.lmdb")
    env = lmdb.open(path, subdir=False, map_size=1 << 24)
    for i in range(60):
        with env.begin(write=True) as txn:
            txn.put(b"%08d" % i, b"x" * 100)
        with open(path, "rb") as f:
            if b"\t" in f.read(4096).split(b"\n", 1)[0]:
                break
    else:
        pytest.fail("no write left a tab in the LMDB file's first line: this test no longer tests anything")
    env.close()
    assert detect_format(path) == "official-pretrain-lmdb"


def test_official_lmdb_reader_and_converter(tmp_path, records):
    write_official_lmdb(tmp_path / "feat.lmdb", records)
    write_official_lmdb(tmp_path / "feat_b64.lmdb", records, base64_arrays=True)
    # Without num_boxes the rows are cut as the official reader cuts them: features into 2048, boxes into 4.
    write_official_lmdb(tmp_path / "feat_no_count.lmdb", records, base64_arrays=True, num_boxes=False)
    # COCO-style captions, two per image.
    annotations = [{"image_id": int(r["image_id"]), "caption": c} for r in records for c in (r["captions"][0], "x")]
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": annotations}))
    for name in ("feat.lmdb", "feat_b64.lmdb", "feat_no_count.lmdb"):
        assert detect_format(tmp_path / name) == "official-lmdb"
        reader = open_store(tmp_path / name)
        assert isinstance(reader, OfficialFeatureLmdb) and len(reader) == len(records)
        for i in (3, 0):
            assert_same_record(reader[i], records[i], captions=False, cls_prob=False)
        assert reader.image_ids() == [r["image_id"] for r in records]
    convert(tmp_path / "feat.lmdb", tmp_path / "store", "official-lmdb", captions=tmp_path / "captions.json",
            progress=False)
    store = open_store(tmp_path / "store")
    assert store.meta["num_classes"] is None and store.meta["num_captions"] == 2 * len(records)
    for i, r in enumerate(records):
        assert_same_record(store[i], {**r, "captions": [r["captions"][0], "x"]}, fp16=True, cls_prob=False)


@pytest.mark.parametrize("subdir,with_keys,use_bin_type", [(False, True, True), (True, False, False)])
def test_official_pretrain_lmdb_reader_and_converter(tmp_path, records, subdir, with_keys, use_bin_type):
    path = tmp_path / "training_feat_all.lmdb"
    write_tensorpack_lmdb(path, records, subdir=subdir, with_keys=with_keys, use_bin_type=use_bin_type)
    assert detect_format(path) == "official-pretrain-lmdb"
    reader = open_store(path)
    assert isinstance(reader, OfficialPretrainLmdb) and len(reader) == len(records)
    for i in (4, 1):
        assert_same_record(reader[i], records[i])
    meta = convert(path, tmp_path / "store", "official-pretrain-lmdb", progress=False)
    assert meta["count"] == len(records)
    store = open_store(tmp_path / "store")
    for i, r in enumerate(records):
        assert_same_record(store[i], r, fp16=True)


def test_official_pretrain_lmdb_whose_arrays_read_as_text(tmp_path, records):
    """Written without use_bin_type, a record whose every byte string is valid UTF-8 (all-zero arrays, say) decodes
    with its arrays as str: they are the same bytes."""
    zeros = {**records[1], **{field: np.zeros_like(records[1][field]) for field in ("features", "boxes", "cls_prob")}}
    write_tensorpack_lmdb(tmp_path / "zeros.lmdb", [zeros, records[2]], use_bin_type=False)
    reader = open_store(tmp_path / "zeros.lmdb")
    assert_same_record(reader[0], zeros)
    assert_same_record(reader[1], records[2])


def test_validate_record_gives_canonical_types(records):
    """Sizes as ints rounded from any number, a caption as a one-caption list."""
    record = validate_record({**records[0], "image_w": "639.6", "image_h": 480.4, "captions": "a dog"}, "here")
    assert (record["image_w"], record["image_h"], record["captions"]) == (640, 480, ["a dog"])


def write_tsv_truncating_row_2(path, records):
    """write_tsv, then record 2's row (image 1002) cut in half."""
    write_tsv(path, records)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][: len(lines[2]) // 2]
    path.write_bytes(b"\n".join(lines))


def test_bad_tsv_row_is_named_or_skipped(tmp_path, records):
    write_tsv_truncating_row_2(tmp_path / "a.tsv", records)
    with pytest.raises(BadRecordError, match=r"record 2 \(image_id '1002'\)") as error:
        convert(tmp_path / "a.tsv", tmp_path / "store", progress=False)
    assert error.value.image_id == "1002"
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob("store.partial-*"))
    meta = convert(tmp_path / "a.tsv", tmp_path / "store", skip_bad=True, progress=False)
    assert meta["skipped"] == 1 and meta["count"] == len(records) - 1
    assert [r["image_id"] for r in open_store(tmp_path / "store")] == ["1000", "1001", "1003", "1004"]


def test_cli_skips_bad_records_only_when_asked_and_verifies(tmp_path, records, capsys):
    write_tsv_truncating_row_2(tmp_path / "a.tsv", records)
    assert main(["convert", "--from", "tsv", str(tmp_path / "a.tsv"), str(tmp_path / "store")]) == 1
    assert "record 2 (image_id '1002')" in capsys.readouterr().err
    assert main(["convert", "--from", "tsv", str(tmp_path / "a.tsv"), str(tmp_path / "store"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 records to" in out and "(skipped 1 bad)" in out
    env = lmdb.open(str(tmp_path / "store"))
    with env.begin(write=True) as txn:
        value = txn.get(b"%010d" % 2)
        txn.put(b"%010d" % 2, value[: len(value) // 2])  # damaged after the conversion
    env.close()
    assert main(["info", str(tmp_path / "store"), "--sample", "1"]) == 0  # reads record 0 only
    assert main(["info", str(tmp_path / "store"), "--sample", "1", "--verify"]) == 1
    assert "record 2" in capsys.readouterr().err


def test_bad_values_and_shapes_are_named(tmp_path, records):
    nan = [dict(r) for r in records]
    nan[3]["features"] = nan[3]["features"].copy()
    nan[3]["features"][2, 5] = np.nan
    write_official_lmdb(tmp_path / "nan.lmdb", nan)
    with pytest.raises(BadRecordError, match=r"record 3 \(image_id '1003'\).*NaN"):
        convert(tmp_path / "nan.lmdb", tmp_path / "out1", progress=False)

    shapes = [dict(r) for r in records]
    shapes[1]["boxes"] = shapes[1]["boxes"][:, :3]  # (7, 3): wrong shape
    write_tensorpack_lmdb(tmp_path / "shapes.lmdb", shapes)
    with pytest.raises(BadRecordError, match=r"record 1 \(image_id '1001'\)"):
        open_store(tmp_path / "shapes.lmdb")[1]

    write_tsv(tmp_path / "a.tsv", records)
    captions = {r["image_id"]: r["captions"] for r in records if r["image_id"] != "1004"}
    with pytest.raises(BadRecordError, match=r"record 4 \(image_id '1004'\).*no caption"):
        convert(tmp_path / "a.tsv", tmp_path / "out2", captions=captions, progress=False)

    with pytest.raises(BadRecordError, match="image_w must be a positive number"):
        with StoreWriter(tmp_path / "out3") as writer:
            writer.add({**records[0], "image_w": 0})
    with pytest.raises(BadRecordError, match=r"cls_prob must have shape \(\d+, num_classes\)"):
        validate_record({**records[0], "cls_prob": records[0]["cls_prob"][1:]}, "here")  # a row per region


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_and_negative_values_are_caught_in_every_precision(records, dtype):
    """validate_record reads float16 arrays through their bits (fast paths): the same verdicts as on float64."""
    def check(features=None, cls_prob=None):
        record = records[0]
        return validate_record({**record, "features": (record["features"] if features is None else features),
                                "cls_prob": (record["cls_prob"] if cls_prob is None else cls_prob)}, "here")

    ok = check(records[0]["features"].astype(dtype), records[0]["cls_prob"].astype(dtype))
    assert ok["features"].dtype == ok["cls_prob"].dtype == (np.float32 if dtype == np.float64 else dtype)
    for bad in (np.nan, np.inf, -np.inf):
        features = records[0]["features"].astype(dtype)
        features[-1, 7] = bad
        with pytest.raises(BadRecordError, match="features contain NaN or inf"):
            check(features=features)
    for bad, rejected in ((-1e-3, True), (-0.0, False), (0.0, False), (np.nan, True), (-np.inf, True)):
        cls_prob = records[0]["cls_prob"].astype(dtype)
        cls_prob[-1, 2] = bad
        if rejected:
            with pytest.raises(BadRecordError, match="cls_prob contain NaN, inf or negative"):
                check(cls_prob=cls_prob)
        else:
            check(cls_prob=cls_prob)


@pytest.mark.parametrize("field", ["features", "cls_prob"])
def test_values_beyond_fp16_are_refused_by_the_writer(tmp_path, records, field):
    """The store keeps features and class distributions in fp16: a value it would turn into inf is an error."""
    big = records[1][field].copy()
    big[0, 0] = 7e4
    with StoreWriter(tmp_path / "store") as writer:
        writer.add(records[0])
        with pytest.raises(BadRecordError, match=f"record 1 .*{field} exceed fp16's range"):
            writer.add({**records[1], field: big})


def test_damaged_native_record_is_detected(tmp_path, records):
    with StoreWriter(tmp_path / "store") as writer:
        for r in records:
            writer.add(r)
    env = lmdb.open(str(tmp_path / "store"))
    with env.begin(write=True) as txn:
        value = txn.get(b"%010d" % 2)
        txn.put(b"%010d" % 2, value[: len(value) // 2])  # truncated
        txn.put(b"%010d" % 3, b"\0" * 10)  # overwritten from the start
    env.close()
    store = NativeStore(tmp_path / "store")
    assert_same_record(store[1], records[1], fp16=True)
    with pytest.raises(BadRecordError, match=r"record 2 of .*checksum mismatch"):
        store[2]
    with pytest.raises(BadRecordError, match="record 2"):
        verify_store(tmp_path / "store")
    # The id index reads only each record's first field: record 2's survived the cut, record 3's did not, and then
    # the full decode names the record.
    with pytest.raises(BadRecordError, match=r"record 3 of .*checksum mismatch"):
        store.image_ids()


def test_open_store_rejects_unknown_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no store"):
        open_store(tmp_path / "missing")
    env = lmdb.open(str(tmp_path / "other"))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(ValueError, match="unknown layout"):
        open_store(tmp_path / "other")
    with pytest.raises(ValueError, match="format must be one of"):
        open_store(tmp_path / "other", format="hdf5")


def test_cli_convert_synth_info(tmp_path, records, capsys):
    write_tensorpack_lmdb(tmp_path / "pre.lmdb", records)
    assert main(["convert", "--from", "official-pretrain-lmdb", str(tmp_path / "pre.lmdb"), str(tmp_path / "a")]) == 0
    assert "wrote 5 records" in capsys.readouterr().out
    assert main(["synth", str(tmp_path / "s"), "--num-images", "20", "--seed", "3"]) == 0
    assert len(open_store(tmp_path / "s")) == 20
    assert main(["info", str(tmp_path / "a"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "records     5" in out and "(verified)" in out and "features (1, 2048)" in out
    # Bad input: exit status 1 and a message naming the problem, not a traceback.
    assert main(["convert", "--from", "tsv", str(tmp_path / "missing.tsv"), str(tmp_path / "b")]) == 1
    assert "no TSV file at" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "s"), "--num-images", "20"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "a"), "--sample", "0"]) == 1
    assert "--sample must be at least 1, got 0" in capsys.readouterr().err
    # The module entry point, as users run it.
    result = subprocess.run([sys.executable, "-m", "vilbert.data", "info", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert "records     20" in result.stdout and "num_classes 1601" in result.stdout
