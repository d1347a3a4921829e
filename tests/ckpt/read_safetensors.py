#!/usr/bin/env python3
"""A small safetensors reader in pure Python + numpy (the layout Hugging Face's `safetensors`
reads), used to check that tessera's consolidated checkpoint is a plain, valid file.

    read_safetensors.py FILE EXPECT.json

EXPECT.json: {"order": [names], "tensors": {name: {"dtype": "F32", "shape": [...],
"values": [row-major values]}}, "config": {...}}. Checks the header (length field, 8-byte
padding, JSON, offsets tiling the data exactly), every tensor's dtype, shape and values
(exactly), the "format": "pt" metadata and tessera's CRC-32s (against zlib). Prints "ok" and
exits 0; exits 1 naming the first difference; exits 77 (skip) without numpy.
"""
import json
import struct
import sys
import zlib

try:
    import numpy as np
except ImportError:
    print("numpy is not installed: skipped")
    sys.exit(77)

DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8"}


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def read(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        fail(f"header length {n} exceeds the file of {len(buf)} bytes")
    if n % 8 != 0:
        fail(f"header length {n} is not a multiple of 8")
    header = json.loads(buf[8 : 8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    data = buf[8 + n :]
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items())
    at = 0
    for b, e, name in spans:
        if b != at:
            fail(f"tensor {name} begins at {b}, expected {at}")
        at = e
    if at != len(data):
        fail(f"tensors end at {at} but the data has {len(data)} bytes")
    tensors = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        arr = np.frombuffer(data[b:end], dtype=DTYPES[e["dtype"]]).reshape(e["shape"])
        if arr.nbytes != end - b:
            fail(f"tensor {name}: {arr.nbytes} bytes for shape {e['shape']}, offsets hold {end - b}")
        tensors[name] = (e["dtype"], arr, data[b:end])
    return meta, tensors


def main():
    path, expect_path = sys.argv[1], sys.argv[2]
    with open(expect_path) as f:
        expect = json.load(f)
    meta, tensors = read(path)
    if meta.get("format") != "pt":
        fail(f"metadata format is {meta.get('format')!r}, not 'pt'")
    crcs = json.loads(meta.get("tessera.crc32", "{}"))
    config = json.loads(meta.get("tessera.config", "{}"))
    if config != expect["config"]:
        fail(f"config {config} != {expect['config']}")
    if sorted(tensors) != sorted(expect["order"]):
        fail(f"names {sorted(tensors)} != {sorted(expect['order'])}")
    for name in expect["order"]:
        want = expect["tensors"][name]
        dtype, arr, raw = tensors[name]
        if dtype != want["dtype"]:
            fail(f"{name}: dtype {dtype} != {want['dtype']}")
        if list(arr.shape) != want["shape"]:
            fail(f"{name}: shape {list(arr.shape)} != {want['shape']}")
        ref = np.array(want["values"], dtype=DTYPES[dtype]).reshape(want["shape"])
        if not np.array_equal(arr, ref):
            fail(f"{name}: values differ (max |diff| {np.max(np.abs(arr.astype('f8') - ref.astype('f8')))})")
        if name in crcs and int(crcs[name], 16) != zlib.crc32(raw):
            fail(f"{name}: CRC-32 {crcs[name]} != zlib's {zlib.crc32(raw):08x}")
    print(f"ok: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
