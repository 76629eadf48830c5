#!/usr/bin/env python3
"""Generate the independent reference fixtures for the Rust GGUF/quantization tests.

Writes, relative to the repository root (found from this file's location):
  tests/fixtures/quant/<TYPE>.json   for F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K:
      {"generator", "type", "n_elems", "bytes_hex", "values", ["input"]}
      `values` is gguf.quants.dequantize(bytes); `input` (Q4_0/Q4_1/Q8_0/BF16 only) is the f32 data
      that gguf.quants.quantize turned into `bytes`, so the Rust quantizers can be checked too.
  tests/fixtures/gguf/python_writer.gguf.hex (the 1 KiB file as hex text: no binary
  model-format files in the repository)
      a small GGUF written by gguf.GGUFWriter (metadata of several types, nested arrays, custom
      alignment, F32/F16/Q8_0 tensors), so the Rust reader is checked against another writer.

Run (any directory):
    pip install gguf==0.17.1 numpy==2.4.6
    python3 scripts/make_quant_fixtures.py

Output is deterministic for the pinned versions (fixed numpy seed); the script refuses other gguf
versions so the fixtures always say exactly what produced them.
"""

import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

GGUF_VERSION = "0.17.1"
NUMPY_VERSION = "2.4.6"

ROOT = Path(__file__).resolve().parent.parent
QUANT_DIR = ROOT / "tests" / "fixtures" / "quant"
GGUF_DIR = ROOT / "tests" / "fixtures" / "gguf"


def check_versions() -> str:
    gv = importlib.metadata.version("gguf")
    nv = np.__version__
    if gv != GGUF_VERSION:
        sys.exit(f"need gguf=={GGUF_VERSION}, found {gv}")
    if nv != NUMPY_VERSION:
        print(f"warning: fixtures were pinned with numpy=={NUMPY_VERSION}, found {nv}", file=sys.stderr)
    return f"gguf=={gv} numpy=={nv}"


def block_floats(rng: np.random.Generator, n_blocks: int, block: int) -> np.ndarray:
    """Random floats with a different magnitude per block, so scales vary."""
    scales = 10.0 ** rng.uniform(-3, 1, size=(n_blocks, 1))
    x = rng.standard_normal((n_blocks, block)) * scales
    return x.astype(np.float32).reshape(-1)


def f16_bytes(values) -> bytes:
    return np.asarray(values, dtype=np.float16).tobytes()


def kquant_bytes(rng: np.random.Generator, qtype: T, n_blocks: int) -> bytes:
    """Random K-quant blocks: random payload bits with sane (finite, modest) f16 scale fields."""
    blocks = []
    for _ in range(n_blocks):
        if qtype in (T.Q4_K, T.Q5_K):
            # d, dmin (f16), then scales[12] + (qh[32]) + qs[128], all random bits.
            rest = 12 + 128 + (32 if qtype == T.Q5_K else 0)
            d = rng.uniform(-0.05, 0.05)
            dmin = rng.uniform(0.0, 0.05)
            blocks.append(f16_bytes([d, dmin]) + rng.integers(0, 256, rest, dtype=np.uint8).tobytes())
        else:  # Q6_K: ql[128], qh[64], scales[16] (int8), then d (f16)
            payload = rng.integers(0, 256, 128 + 64 + 16, dtype=np.uint8).tobytes()
            blocks.append(payload + f16_bytes([rng.uniform(-0.01, 0.01)]))
    return b"".join(blocks)


def write_fixture(name: str, generator: str, data: bytes, qtype: T, inp=None) -> None:
    raw = np.frombuffer(data, dtype=np.uint8).copy()
    values = dequantize(raw, qtype).astype(np.float32).reshape(-1)
    doc = {
        "generator": generator,
        "type": name,
        "n_elems": int(values.size),
        "bytes_hex": data.hex(),
        # float32 -> Python float (float64) is exact, and json writes the shortest repr that
        # round-trips, so the Rust side recovers the exact f32 bits.
        "values": [float(v) for v in values],
    }
    if inp is not None:
        doc["input"] = [float(v) for v in np.asarray(inp, dtype=np.float32)]
    QUANT_DIR.mkdir(parents=True, exist_ok=True)
    (QUANT_DIR / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def make_quant_fixtures(gen: str) -> None:
    rng = np.random.default_rng(20240917)

    # Float types, with signed zero, subnormals and extremes among random values.
    f32 = np.concatenate([
        np.array([0.0, -0.0, 1.0, -2.5, 1e-40, -1e-45, 3.4028235e38, 1.1754944e-38], dtype=np.float32),
        rng.standard_normal(56).astype(np.float32) * 10.0,
    ])
    write_fixture("F32", gen, f32.tobytes(), T.F32)

    f16 = np.concatenate([
        np.array([0.0, -0.0, 1.0, -65504.0, 6e-8, -6.1e-5, 3.0e-5, 0.33325], dtype=np.float16),
        rng.standard_normal(56).astype(np.float16),
    ])
    write_fixture("F16", gen, f16.tobytes(), T.F16)

    bf_in = np.concatenate([
        np.array([0.0, -0.0, 1.0, -3.3895314e38, 1e-40, 0.1, 1.00390625, 1.01171875], dtype=np.float32),
        rng.standard_normal(56).astype(np.float32) * 100.0,
    ])
    write_fixture("BF16", gen, quantize(bf_in, T.BF16).tobytes(), T.BF16, inp=bf_in)

    for name, qtype in (("Q4_0", T.Q4_0), ("Q4_1", T.Q4_1), ("Q8_0", T.Q8_0)):
        x = block_floats(rng, 4, 32)
        # One all-zero block exercises the d == 0 path.
        x[32:64] = 0.0
        write_fixture(name, gen, quantize(x, qtype).tobytes(), qtype, inp=x)

    for name, qtype in (("Q4_K", T.Q4_K), ("Q5_K", T.Q5_K), ("Q6_K", T.Q6_K)):
        write_fixture(name, gen, kquant_bytes(rng, qtype, 2), qtype)


def make_gguf_fixture() -> None:
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    path = GGUF_DIR / "python_writer.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.15625)
    w.add_uint64("test.u64", 1 << 40)
    w.add_int64("test.i64", -(1 << 40))
    w.add_float64("test.f64", 2.718281828459045)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "h\u00e9llo \u2603")
    w.add_array("test.str_arr", ["a", "bc", ""])
    w.add_array("test.i32_arr", [1, -2, 3])
    w.add_array("test.f32_arr", [0.5, -1.25])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_tensor("t.f32", np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5)
    w.add_tensor("t.f16", (np.arange(4, dtype=np.float32) / 3).astype(np.float16).reshape(1, 4))
    q = quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), T.Q8_0)
    w.add_tensor("t.q8_0", q, raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Keep it as hex text, 64 digits a line: no binary model-format file in the repository.
    data = path.read_bytes()
    digits = data.hex()
    (GGUF_DIR / "python_writer.gguf.hex").write_text(
        "\n".join(digits[i : i + 64] for i in range(0, len(digits), 64)) + "\n"
    )
    path.unlink()


def main() -> None:
    gen = check_versions()
    make_quant_fixtures(gen)
    make_gguf_fixture()
    print(f"wrote fixtures under {QUANT_DIR.relative_to(ROOT)} and {GGUF_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
