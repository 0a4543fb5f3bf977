"""Region-feature stores: our native LMDB store, readers for the formats users already hold, and converters.

Every store is a random-access sequence of records. A record is a dict:

    image_id   str
    image_w    int       image width in pixels
    image_h    int       image height in pixels
    features   float16 or float32 (num_boxes, feature_dim)    detector region features (feature_dim 2048 for
                                                              bottom-up-attention)
    boxes      float32 (num_boxes, 4)                         [x1, y1, x2, y2] in pixels of the original image
    cls_prob   float16 or float32 (num_boxes, num_classes)    detector class distribution (1601 for Visual
                                                              Genome); optional
    captions   list[str]                                      optional

features and cls_prob keep the precision they are stored in (float16 in the native store), and the native store's
arrays are read-only views of the record's bytes: a loader converts (copies) only the rows it uses. Other float or
integer arrays are read as float32.

Formats read (see `open_store`):
- "native": our store, written by `StoreWriter` / `convert` / `vilbert.data.synthetic`. One LMDB directory; key
  b"__meta__" holds JSON (format name, version, count, feature_dim, num_classes, checksum); key b"%010d" % i holds
  record i as crc32 (4 bytes, little endian) + msgpack map with fp16 features, float32 boxes, fp16 cls_prob, captions.
- "tsv": bottom-up-attention TSV rows image_id, image_w, image_h, num_boxes, boxes, features[, cls_prob], each array the
  base64 of float32 bytes (a header row naming the fields is honoured when present).
- "official-lmdb": the vilbert-multi-task downstream feature LMDB: key str(image_id) -> pickled dict, b"keys" -> pickled
  list of keys.
- "official-pretrain-lmdb": the official pretraining LMDB written by tensorpack's LMDBSerializer: key b"%08d" % i ->
  msgpack (with msgpack-numpy's array encoding) of [features, cls_prob, boxes, num_boxes, image_h, image_w, image_id,
  caption]; b"__keys__" -> list of keys.

LMDB environments are opened read-only, without locks or readahead, lazily and once per process (so a store object can
be handed to DataLoader workers or forked ranks: each process drops inherited handles and opens its own on first use).
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import uuid
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import lmdb
import msgpack
import numpy as np
from tqdm import tqdm

NATIVE_FORMAT = "vilbert-region-store"
NATIVE_VERSION = 1
META_KEY = b"__meta__"
FORMATS = ("native", "tsv", "official-lmdb", "official-pretrain-lmdb")
# LMDB reserves address space, not disk: a large map lets one store grow to any realistic size.
_MAP_SIZE = 1 << 40
_FP16_MAX = float(np.finfo(np.float16).max)


class BadRecordError(ValueError):
    """A record that cannot be read or fails validation; the message names the store, the index and the image id."""

    def __init__(self, message: str, index: int | None = None, image_id: str | None = None):
        super().__init__(message)
        self.index = index
        self.image_id = image_id


def describe_record(source: str, index: int | None, image_id: Any = None) -> str:
    """'record 12 (image_id '3017') of /data/x.lmdb': the phrase every bad-data error starts with."""
    parts = [f"record {index}" if index is not None else "record"]
    if image_id is not None:
        parts.append(f"(image_id {str(image_id)!r})")
    parts.append(f"of {source}")
    return " ".join(parts)


def _as_float(array: np.ndarray) -> np.ndarray:
    """float16 and float32 arrays as they are (no copy), anything else as float32."""
    return array if array.dtype in (np.float16, np.float32) else array.astype(np.float32)


# NumPy's float16 comparisons are ~10x slower than on the bits: these read float16 arrays as int16 (a loader checks
# every record it reads).
def _all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:
        return not ((array.view(np.int16) & 0x7C00) == 0x7C00).any()  # exponent all ones: inf or NaN
    return bool(np.isfinite(array).all())


def _any_negative(array: np.ndarray) -> bool:
    if array.dtype == np.float16:
        bits = array.view(np.int16)
        return bool(((bits < 0) & (bits != np.int16(-0x8000))).any())  # sign bit set, and not -0.0
    return bool((array < 0).any())


def validate_record(record: dict, where: str, index: int | None = None) -> dict:
    """Checks a record's fields, shapes and values; returns it with canonical types (see the module docstring), else
    raises BadRecordError with `where` (see describe_record) and `index`."""

    def bad(problem: str):
        image_id = record.get("image_id")
        raise BadRecordError(f"{where}: {problem}", index=index, image_id=None if image_id is None else str(image_id))

    for field in ("image_id", "image_w", "image_h", "features", "boxes"):
        if record.get(field) is None:
            bad(f"missing field {field!r}")
    out = {"image_id": str(record["image_id"])}
    for field in ("image_w", "image_h"):
        value = record[field]
        try:
            size = float(value)
        except (TypeError, ValueError):
            size = float("nan")
        if not size > 0:
            bad(f"{field} must be a positive number, got {value!r}")
        out[field] = int(round(size))

    features = np.asarray(record["features"])
    if features.ndim != 2 or features.shape[0] == 0:
        bad(f"features must have shape (num_boxes>=1, feature_dim), got {features.shape}")
    num_boxes = features.shape[0]
    boxes = np.asarray(record["boxes"])
    if boxes.shape != (num_boxes, 4):
        bad(f"boxes must have shape ({num_boxes}, 4) to match features {features.shape}, got {boxes.shape}")
    out["features"] = _as_float(features)
    out["boxes"] = boxes.astype(np.float32, copy=False)
    for field in ("features", "boxes"):
        if not _all_finite(out[field]):
            bad(f"{field} contain NaN or inf")

    if record.get("cls_prob") is not None:
        cls_prob = np.asarray(record["cls_prob"])
        if cls_prob.ndim != 2 or cls_prob.shape[0] != num_boxes:
            bad(f"cls_prob must have shape ({num_boxes}, num_classes), got {cls_prob.shape}")
        cls_prob = _as_float(cls_prob)
        if not _all_finite(cls_prob) or _any_negative(cls_prob):
            bad("cls_prob contain NaN, inf or negative values")
        out["cls_prob"] = cls_prob

    if "captions" in record and record["captions"] is not None:
        captions = record["captions"]
        if isinstance(captions, str):
            captions = [captions]
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            bad(f"captions must be a non-empty list of non-empty strings, got {captions!r}")
        out["captions"] = list(captions)
    return out


# Read-only environments opened by this process, keyed by the data file's identity. LMDB allows one handle per file
# per process, so every store object on the same files shares it.
_ENVS: dict[tuple, lmdb.Environment] = {}
_ENVS_PID = os.getpid()


def _env_key(path: str) -> tuple:
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    stat = os.stat(data_file)
    return stat.st_dev, stat.st_ino


def _shared_env(path: str) -> lmdb.Environment:
    """This process's read-only handle on the LMDB at `path` (a directory with data.mdb, or the data file itself)."""
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        # A forked child (DataLoader worker, launcher) must not use its parent's handles: drop them and reopen.
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    key = _env_key(path)
    if key not in _ENVS:
        _ENVS[key] = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=False,
                               meminit=False, max_readers=2048, max_dbs=0)
    return _ENVS[key]


def _release_env(path: str) -> None:
    env = _ENVS.pop(_env_key(path), None)
    if env is not None:
        env.close()


class _LmdbStore(Sequence):
    """Base of the LMDB-backed stores: reads through this process's shared read-only handle, opened on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no store at {self.path!r}")
        if os.path.isdir(self.path) and not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise FileNotFoundError(f"{self.path!r} is a directory without data.mdb: not an LMDB store")

    @property
    def env(self) -> lmdb.Environment:
        return _shared_env(self.path)

    def _get(self, key: bytes) -> bytes | None:
        with self.env.begin(write=False) as txn:
            return txn.get(key)

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a store of {n} records")
        return int(index)

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, {len(self)} records)"


# ---------------------------------------------------------------------------------------------------- native store


def _native_key(index: int) -> bytes:
    return b"%010d" % index


class NativeStore(_LmdbStore):
    """Our store (see the module docstring); `meta` is the header record as a dict."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        raw = self._get(META_KEY)
        if raw is None:
            raise ValueError(f"{self.path!r} is an LMDB without a {META_KEY!r} record: not a native store "
                             f"(convert it first: python -m vilbert.data convert ...)")
        self.meta = json.loads(raw)
        if self.meta.get("format") != NATIVE_FORMAT or self.meta.get("version") != NATIVE_VERSION:
            raise ValueError(f"{self.path!r} has format {self.meta.get('format')!r} version "
                             f"{self.meta.get('version')!r}; expected {NATIVE_FORMAT!r} version {NATIVE_VERSION}")
        self._len = int(self.meta["count"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        value = self._get(_native_key(index))
        where = describe_record(self.path, index)
        if value is None:
            raise BadRecordError(f"{where}: missing (the store's header says {len(self)} records)", index=index)
        return _decode_native(value, where, index, self.meta)

    def image_ids(self) -> list:
        """Every record's image_id in order, read from the start of each payload (image_id is its first field)
        without copying or checking the rest: a damaged record shows when it is read (or by verify_store)."""
        ids = []
        with self.env.begin(write=False, buffers=True) as txn:
            for index in range(len(self)):
                value = txn.get(_native_key(index))
                unpacker = msgpack.Unpacker(raw=False)
                unpacker.feed(bytes(value[4:260]) if value is not None else b"")
                try:
                    unpacker.read_map_header()
                    if unpacker.unpack() != "image_id":
                        raise ValueError("the first field is not image_id")
                    ids.append(unpacker.unpack())
                except (ValueError, msgpack.OutOfData):  # cut short, damaged, or an id longer than the prefix
                    ids.append(self[index]["image_id"])  # raises the record's BadRecordError
        return ids


def _encode_native(record: dict) -> bytes:
    cls_prob = record.get("cls_prob")
    payload = msgpack.packb({
        "image_id": record["image_id"],
        "image_w": record["image_w"],
        "image_h": record["image_h"],
        "num_boxes": record["features"].shape[0],
        "features": record["features"].astype(np.float16).tobytes(),
        "boxes": record["boxes"].astype(np.float32).tobytes(),
        "cls_prob": None if cls_prob is None else cls_prob.astype(np.float16).tobytes(),
        "captions": record.get("captions"),
    }, use_bin_type=True)
    return zlib.crc32(payload).to_bytes(4, "little") + payload


def _decode_native(value: bytes, where: str, index: int, meta: dict) -> dict:
    payload = value[4:]
    if len(value) < 4 or zlib.crc32(payload) != int.from_bytes(value[:4], "little"):
        raise BadRecordError(f"{where}: checksum mismatch (truncated or damaged record)", index=index)
    try:
        item = msgpack.unpackb(payload, raw=False)
        num_boxes = int(item["num_boxes"])
        arrays = {}
        for field, dtype, width in (("features", np.float16, meta["feature_dim"]), ("boxes", np.float32, 4),
                                    ("cls_prob", np.float16, meta.get("num_classes"))):
            if item[field] is None:
                continue
            flat = np.frombuffer(item[field], dtype=dtype)
            if flat.size != num_boxes * width:
                raise ValueError(f"{field} holds {flat.size} values, expected num_boxes {num_boxes} x {width}")
            arrays[field] = flat.reshape(num_boxes, width)  # a read-only view (see the module docstring)
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as error:
        raise BadRecordError(f"{where}: cannot decode ({error})", index=index) from error
    record = {"image_id": item["image_id"], "image_w": item["image_w"], "image_h": item["image_h"], **arrays}
    if item["captions"] is not None:
        record["captions"] = item["captions"]
    return record


class StoreWriter:
    """Writes a native store record by record; `close()` writes the header, verifies count and checksum, and moves the
    store into place (it is written to `path.partial-<pid>-<random>` until then).

    with StoreWriter(path) as writer:
        for record in records:
            writer.add(record)          # validated; BadRecordError names the record

    Features are stored as fp16 (values beyond fp16's range are an error, not a silent inf).
    """

    def __init__(self, path: str | os.PathLike, source: str = "", commit_every: int = 1000):
        self.path = os.fspath(path)
        if os.path.exists(self.path):
            raise FileExistsError(f"{self.path!r} already exists; choose a new output path")
        # Written beside the target and renamed when complete: a reader never sees a half-written store.
        self._partial = f"{self.path}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        shutil.rmtree(self._partial, ignore_errors=True)
        os.makedirs(self._partial)
        self.source = source
        self.commit_every = commit_every
        self.count = 0
        self.num_captions = 0
        self.feature_dim = None
        self.num_classes = None
        self._checksum = 0
        self._env = lmdb.open(self._partial, map_size=_MAP_SIZE, subdir=True, meminit=False, map_async=True)
        self._txn = self._env.begin(write=True)

    def add(self, record: dict, where: str | None = None) -> None:
        where = where or describe_record(self.source or "input", self.count, record.get("image_id"))
        record = validate_record(record, where)
        dim = record["features"].shape[1]
        classes = record["cls_prob"].shape[1] if "cls_prob" in record else None
        if self.count == 0:
            self.feature_dim, self.num_classes = dim, classes
        elif dim != self.feature_dim or classes != self.num_classes:
            raise BadRecordError(f"{where}: feature_dim {dim} / num_classes {classes} differ from the first record's "
                                 f"{self.feature_dim} / {self.num_classes}", image_id=record["image_id"])
        for field in ("features", "cls_prob"):  # stored as fp16: beyond its range they would come back inf
            if field in record and np.abs(record[field]).max(initial=0) > _FP16_MAX:
                raise BadRecordError(f"{where}: {field} exceed fp16's range ({_FP16_MAX})",
                                     image_id=record["image_id"])
        value = _encode_native(record)
        self._txn.put(_native_key(self.count), value)
        self._checksum = zlib.crc32(value[:4], self._checksum)
        self.count += 1
        self.num_captions += len(record.get("captions", ()))
        if self.count % self.commit_every == 0:
            self._txn.commit()
            self._txn = self._env.begin(write=True)

    def close(self) -> dict:
        """Writes the header, then re-reads every record to check the count and checksum; returns the header."""
        if self._env is None:
            return self.meta
        if self.count == 0:
            self.abort()
            raise ValueError(f"no records were written to {self.path!r}")
        self.meta = {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "count": self.count,
                     "feature_dim": self.feature_dim, "num_classes": self.num_classes,
                     "num_captions": self.num_captions, "checksum": self._checksum, "source": self.source}
        self._txn.put(META_KEY, json.dumps(self.meta).encode())
        self._txn.commit()
        self._env.sync(True)
        self._env.close()
        self._env = None
        try:
            verify_store(self._partial)
            _release_env(self._partial)
            os.rename(self._partial, self.path)
        except BaseException:
            shutil.rmtree(self._partial, ignore_errors=True)
            raise
        return self.meta

    def abort(self) -> None:
        """Discards everything written."""
        if self._env is not None:
            self._txn.abort()
            self._env.close()
            self._env = None
        shutil.rmtree(self._partial, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def verify_store(path: str | os.PathLike) -> dict:
    """Reads every record of a native store once; raises ValueError unless count and checksum match the header."""
    store = NativeStore(path)
    checksum = 0
    count = 0
    with store.env.begin(write=False) as txn:
        for key, value in txn.cursor():
            if key == META_KEY:
                continue
            index = int(key)
            if zlib.crc32(value[4:]) != int.from_bytes(value[:4], "little"):
                raise BadRecordError(f"{describe_record(store.path, index)}: checksum mismatch", index=index)
            if index != count:
                raise ValueError(f"{store.path!r}: record {count} is missing (next key is {index})")
            checksum = zlib.crc32(value[:4], checksum)
            count += 1
    if count != store.meta["count"] or checksum != store.meta["checksum"]:
        raise ValueError(f"{store.path!r} is inconsistent: header says {store.meta['count']} records with checksum "
                         f"{store.meta['checksum']}, found {count} with checksum {checksum}")
    return store.meta


# ---------------------------------------------------------------------------------------------------- TSV


TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob")


class TsvReader(Sequence):
    """Bottom-up-attention TSV. Iteration streams the file; indexing builds a line-offset index once (one pass)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no TSV file at {self.path!r}")
        with open(self.path, "rb") as f:
            first = f.readline()
        self._has_header = first.startswith(b"image_id\t")
        self.fields = tuple(first.rstrip(b"\r\n").decode().split("\t")) if self._has_header else TSV_FIELDS
        self._offsets = None

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(byte offset, line) of every data line (not the header, not blank lines)."""
        with open(self.path, "rb") as f:
            offset = 0
            for number, line in enumerate(f):
                if not (number == 0 and self._has_header) and line not in (b"\n", b"\r\n"):
                    yield offset, line
                offset += len(line)

    def _index(self) -> list[int]:
        if self._offsets is None:
            self._offsets = [offset for offset, _ in self._lines()]
        return self._offsets

    def __len__(self) -> int:
        return len(self._index())

    def __getitem__(self, index: int) -> dict:
        offsets = self._index()
        if not -len(offsets) <= index < len(offsets):
            raise IndexError(f"index {index} out of range for a TSV of {len(offsets)} rows")
        index %= len(offsets)
        with open(self.path, "rb") as f:
            f.seek(offsets[index])
            return self._parse(f.readline(), index)

    def image_ids(self) -> list[str]:
        """Every row's image_id (its first cell) in order, without parsing the arrays."""
        return [line.rstrip(b"\r\n").split(b"\t", 1)[0].decode(errors="replace") for _, line in self._lines()]

    def iter_checked(self) -> Iterator[tuple[int, dict | BadRecordError]]:
        """Streams (index, record), or (index, BadRecordError) for a bad row, so a caller may skip it and go on."""
        for index, (_, line) in enumerate(self._lines()):
            try:
                yield index, self._parse(line, index)
            except BadRecordError as error:
                yield index, error

    def _parse(self, line: bytes, index: int) -> dict:
        cells = line.rstrip(b"\r\n").split(b"\t")
        image_id = cells[0].decode(errors="replace")
        where = describe_record(self.path, index, image_id)
        if len(cells) < 6:
            raise BadRecordError(f"{where}: {len(cells)} tab-separated fields, expected at least 6 "
                                 f"({', '.join(self.fields)}); truncated row?", index=index, image_id=image_id)
        row = dict(zip(self.fields, cells))
        try:
            num_boxes = int(row["num_boxes"])
            record = {"image_id": image_id, "image_w": float(row["image_w"]), "image_h": float(row["image_h"])}
            for field, width in (("boxes", 4), ("features", None), ("cls_prob", None)):
                if field not in row:
                    continue
                flat = np.frombuffer(base64.b64decode(row[field], validate=True), dtype=np.float32)
                if width is None:
                    width = flat.size // max(num_boxes, 1)
                if flat.size != num_boxes * width or flat.size == 0:
                    raise ValueError(f"{field} holds {flat.size} float32 values, not num_boxes {num_boxes} x {width}")
                record[field] = flat.reshape(num_boxes, width)
        except (ValueError, KeyError, base64.binascii.Error) as error:
            raise BadRecordError(f"{where}: cannot parse ({error})", index=index, image_id=image_id) from error
        return validate_record(record, where, index)


# ---------------------------------------------------------------------------------------------------- official LMDBs


class OfficialFeatureLmdb(_LmdbStore):
    """vilbert-multi-task downstream features: b"keys" -> pickled key list; key -> pickled dict (arrays or base64)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        raw = self._get(b"keys")
        if raw is None:
            raise ValueError(f"{self.path!r} has no b'keys' record: not an official feature LMDB")
        self._keys = [k if isinstance(k, bytes) else str(k).encode() for k in pickle.loads(raw, encoding="latin1")]

    def __len__(self) -> int:
        return len(self._keys)

    def image_ids(self) -> list[str]:
        """Every record's image_id in order: the keys, which are str(image_id) in this format."""
        return [key.decode(errors="replace") for key in self._keys]

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        key = self._keys[index]
        where = describe_record(self.path, index, key.decode(errors="replace"))
        raw = self._get(key)
        if raw is None:
            raise BadRecordError(f"{where}: key listed in b'keys' but absent", index=index, image_id=key.decode())
        try:
            item = pickle.loads(raw, encoding="latin1")
            num_boxes = int(item["num_boxes"]) if "num_boxes" in item else None
            record = {"image_id": item["image_id"], "image_w": item["image_w"], "image_h": item["image_h"]}
            # Without num_boxes, rows are cut as the official reader does: features into 2048, boxes into 4.
            for field, width in (("features", 2048), ("boxes", 4), ("cls_prob", None)):
                if field in item:
                    record[field] = _as_rows(item[field], num_boxes, width)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as error:
            raise BadRecordError(f"{where}: cannot decode ({error})", index=index,
                                 image_id=key.decode(errors="replace")) from error
        return validate_record(record, where, index)


def _as_rows(value, num_boxes: int | None, width: int | None) -> np.ndarray:
    """An array stored as ndarray or base64 float32 bytes -> (num_boxes, width)."""
    if isinstance(value, (bytes, str)):
        value = np.frombuffer(base64.b64decode(value), dtype=np.float32)
    value = np.asarray(value)
    if num_boxes is not None:
        if value.size % max(num_boxes, 1):
            raise ValueError(f"{value.size} values do not split into num_boxes {num_boxes} rows")
        return value.reshape(num_boxes, -1)
    return value.reshape(-1, width) if width else value


def _msgpack_numpy_hook(obj: dict):
    """Decodes msgpack-numpy's array encoding {nd, type, kind, shape, data} (keys bytes or str) back to numpy."""
    def get(name):
        return obj.get(name.encode(), obj.get(name))

    nd = get("nd")
    if nd is None or get("data") is None or get("type") is None:
        return obj
    dtype = get("type")
    dtype = np.dtype(dtype.decode() if isinstance(dtype, bytes) else dtype)
    data = get("data")
    if isinstance(data, str):
        data = data.encode()  # written without use_bin_type, and valid UTF-8 by chance: the same bytes back
    if nd:
        return np.frombuffer(data, dtype=dtype).reshape(get("shape"))
    return np.frombuffer(data, dtype=dtype)[0]


def _loads_tensorpack(raw: bytes):
    try:
        return msgpack.unpackb(raw, raw=False, object_hook=_msgpack_numpy_hook, strict_map_key=False)
    except UnicodeDecodeError:
        # Written with use_bin_type=False: every byte string came back as str; read raw and decode text ourselves.
        return msgpack.unpackb(raw, raw=True, object_hook=_msgpack_numpy_hook, strict_map_key=False)


class OfficialPretrainLmdb(_LmdbStore):
    """The official pretraining LMDB (tensorpack LMDBSerializer): key -> [features, cls_prob, boxes, num_boxes,
    image_h, image_w, image_id, caption]."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        raw = self._get(b"__keys__")
        if raw is not None:
            self._keys = [k if isinstance(k, bytes) else k.encode() for k in _loads_tensorpack(raw)]
        else:
            # LMDBSerializer writes b"__keys__" last; without it, fall back to its key pattern and the entry count.
            count = self.env.stat()["entries"]
            self._keys = [b"%08d" % i for i in range(count)]
            if count and self._get(self._keys[0]) is None:
                raise ValueError(f"{self.path!r} has neither b'__keys__' nor b'00000000': not a tensorpack LMDB")

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        where = describe_record(self.path, index)
        raw = self._get(self._keys[index])
        if raw is None:
            raise BadRecordError(f"{where}: key {self._keys[index]!r} listed but absent", index=index)
        try:
            item = _loads_tensorpack(raw)
            features, cls_prob, boxes, num_boxes, image_h, image_w, image_id, caption = item
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
            raise BadRecordError(f"{where}: cannot decode a tensorpack record ({error})", index=index) from error
        image_id = image_id.decode() if isinstance(image_id, bytes) else image_id
        where = describe_record(self.path, index, image_id)
        try:
            num_boxes = int(num_boxes)
            record = {"image_id": image_id, "image_w": image_w, "image_h": image_h,
                      "features": _as_rows(features, num_boxes, None), "boxes": _as_rows(boxes, num_boxes, 4),
                      "cls_prob": _as_rows(cls_prob, num_boxes, None)}
        except (ValueError, TypeError) as error:
            raise BadRecordError(f"{where}: {error}", index=index, image_id=image_id) from error
        if caption is not None:
            record["captions"] = [caption.decode() if isinstance(caption, bytes) else caption]
        return validate_record(record, where, index)


# ---------------------------------------------------------------------------------------------------- open / convert


_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")  # after the 16-byte page header of an LMDB data file's meta page
_READERS = {"native": NativeStore, "tsv": TsvReader, "official-lmdb": OfficialFeatureLmdb,
            "official-pretrain-lmdb": OfficialPretrainLmdb}


def detect_format(path: str | os.PathLike) -> str:
    """Which of FORMATS the file or directory at `path` is, from its contents."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no store at {path!r}")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4096)
        # An LMDB file (tensorpack writes the official pretraining LMDB as one) starts with a meta page whose binary
        # counters may hold a tab before any newline: its magic number rules it out as a TSV first.
        if head[16:20] != _LMDB_MAGIC and b"\t" in head.split(b"\n", 1)[0]:
            return "tsv"
    elif not os.path.exists(os.path.join(path, "data.mdb")):
        raise ValueError(f"{path!r} is a directory without data.mdb: not an LMDB store")
    try:
        env = _shared_env(path)
    except lmdb.Error as error:
        raise ValueError(f"{path!r} is neither a TSV nor an LMDB ({error})") from error
    with env.begin() as txn:
        kinds = [kind for key, kind in ((META_KEY, "native"), (b"keys", "official-lmdb"),
                                        (b"__keys__", "official-pretrain-lmdb"),
                                        (b"00000000", "official-pretrain-lmdb")) if txn.get(key) is not None]
    if not kinds:
        raise ValueError(f"{path!r} is an LMDB of unknown layout (no {META_KEY!r}, b'keys' or b'__keys__' record)")
    return kinds[0]


def open_store(path: str | os.PathLike, format: str | None = None) -> Sequence:
    """Opens a store of any supported format (detected from the contents unless `format` is given) as a random-access
    sequence of records (see the module docstring)."""
    if format is None:
        format = detect_format(path)
    if format not in _READERS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return _READERS[format](path)


def load_captions(path: str | os.PathLike) -> dict[str, list[str]]:
    """Captions keyed by str(image_id) from JSON: {image_id: caption or [captions]} (official caption_{train,val}.json)
    or COCO-style {"annotations": [{"image_id", "caption"}, ...]}. (`vilbert.tasks.retrieval.load_captions` gives
    (image_id, caption) pairs from these and from JSON lines.)"""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    captions: dict[str, list[str]] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        for annotation in data["annotations"]:
            captions.setdefault(str(annotation["image_id"]), []).append(annotation["caption"])
    elif isinstance(data, dict):
        for image_id, value in data.items():
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                karpathy = " (a Karpathy dataset_*.json: write the split you want as {image_id: [captions]})" \
                    if "images" in data and "dataset" in data else ""
                raise ValueError(f"captions file {os.fspath(path)!r}: the value of {str(image_id)!r} is not a caption "
                                 f"or a list of captions{karpathy}; expected {{image_id: caption or [captions]}} or "
                                 f"COCO's {{\"annotations\": [{{\"image_id\", \"caption\"}}, ...]}}")
            captions[str(image_id)] = value
    else:
        raise ValueError(f"captions file {os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}")
    return captions


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, source_format: str | None = None,
            captions: str | os.PathLike | dict | None = None, skip_bad: bool = False, progress: bool = True) -> dict:
    """Converts any readable store into a native store at `output_path`; returns its header plus "skipped".

    captions: a JSON file (see load_captions) or dict giving each image's captions; they replace the records' own.
    An image without a caption is then a bad record. skip_bad: skip bad records and count them instead of raising.
    """
    reader = open_store(input_path, source_format)
    if captions is not None and not isinstance(captions, dict):
        captions = load_captions(captions)
    total = None if isinstance(reader, TsvReader) else len(reader)
    skipped = 0
    with StoreWriter(output_path, source=os.fspath(input_path)) as writer, \
            tqdm(total=total, unit="img", desc=f"convert {os.path.basename(os.fspath(input_path))}",
                 disable=not progress) as bar:
        for index, record in iter_checked(reader):
            try:
                if isinstance(record, BadRecordError):
                    raise record
                if captions is not None:
                    image_captions = captions.get(str(record["image_id"]))
                    if image_captions is None:
                        raise BadRecordError(f"{describe_record(reader.path, index, record['image_id'])}: no caption "
                                             f"in the captions file", index=index, image_id=str(record["image_id"]))
                    record["captions"] = image_captions
                writer.add(record, describe_record(reader.path, index, record.get("image_id")))
            except BadRecordError:
                if not skip_bad:
                    raise
                skipped += 1
                bar.set_postfix(skipped=skipped, refresh=False)
            bar.update()
    return {**writer.meta, "skipped": skipped}


def iter_checked(store: Sequence) -> Iterator[tuple[int, dict | BadRecordError]]:
    """(index, record) in order, with a BadRecordError in place of each unreadable record (streams a TSV)."""
    if isinstance(store, TsvReader):
        yield from store.iter_checked()
        return
    for index in range(len(store)):
        try:
            yield index, store[index]
        except BadRecordError as error:
            yield index, error
