"""Check `smolforge export --format gguf` against llama.cpp itself (through llama-cpp-python).

For every dense architecture smolforge exports (Llama tied and untied, Qwen2 with q/k/v biases,
Qwen3 with QK-norm, SmolLM3 with NoPE layers) it builds a small model, writes GGUF files and asks
llama.cpp for
  1. the token ids of a mixed text (ASCII, accents, CJK, emoji, code, digits, special tokens),
     compared with smolforge's tokenizer;
  2. the logits of a prompt, compared with smolforge's (max abs difference; an f32 file, read
     with an f32 KV cache, must agree to 1e-4 of the largest logit);
  3. a 48-token greedy continuation, compared token by token with smolforge's engine.
The random models are initialised with a large std so that their next-token distributions are
peaked: a greedy continuation then tests the arithmetic, not rounding ties. If a checkpoint is
given (e.g. runs/quickstart/final), it is checked too, at every GGUF type.

llama-cpp-python builds llama.cpp from source (about 25 minutes on 2 cores), which is why this is
a script and not a CI test:
    pip install llama-cpp-python gguf
    python benchmarks/check_gguf.py [--checkpoint runs/quickstart/final]
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from smolforge.engine import Engine, SamplingParams
from smolforge.interop.gguf import write_gguf
from smolforge.model import ModelConfig, Transformer
from smolforge.tokenizer import Tokenizer, train_tokenizer
from smolforge.train.checkpoint import load_model

MIXED_TEXT = ("Hello, world! Café naïve façade — 東京は晴れ 🌤️🚀 def f(x):\n    return x**2  # 12345 "
              "<|im_start|>user\nHi<|im_end|> <think>ok</think>")
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."
ARCHITECTURES = {
    "llama (tied)": {},
    "llama (untied)": {"tie_embeddings": False},
    "qwen2 (q/k/v bias)": {"attention_bias": True},
    "qwen3 (QK-norm)": {"qk_norm": True},
    "smollm3 (NoPE 1 in 4)": {"nope_interval": 4, "n_layers": 4},
}


def bundled_tokenizer(work: Path) -> Tokenizer:
    from smolforge.quickstart import bundled_text

    (work / "corpus.txt").write_text(bundled_text()[:300_000] + "\n" + MIXED_TEXT * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_tokenizer([work / "corpus.txt"], vocab_size=1024)


def random_model(tokenizer: Tokenizer, **changes) -> Transformer:
    torch.manual_seed(0)
    shape = dict(vocab_size=1024, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
                 intermediate_size=256, max_seq_len=512, init_std=0.15)
    cfg = ModelConfig(**{**shape, **changes})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def tie_margin(model: Transformer, prompt: list[int], continuation: list[int], step: int) -> float:
    """smolforge's top-1 minus top-2 logit at generation step `step` (inf past the end)."""
    if step >= len(continuation):
        return float("inf")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + continuation[:step]])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def without_extra_buffer_types() -> None:
    """Load models without llama.cpp's "extra" CPU buffer types (weight repacking, AMX).

    On the Xeon with AMX where this was run, llama.cpp 0.3.36's AMX path crashes (SIGSEGV) on the
    first eval of any q8_0 model this small; with plain CPU buffers the same files run. Every
    file is checked the plain way so that all types go through the same kernels.
    """
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def params():  # noqa: ANN202 (a ctypes struct)
        p = defaults()
        p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params


def check(label: str, model: Transformer, tokenizer: Tokenizer, work: Path, dtypes: list[str]) -> bool:
    from llama_cpp import Llama

    prompt = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ours_logits = model(torch.tensor([prompt])).logits[0].float().numpy()
    engine = Engine(model, tokenizer)
    ours = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True))[0].tokens
    ok = True
    for dtype in dtypes:
        path = write_gguf(model, tokenizer, work / f"{label.split()[0]}-{dtype}.gguf", dtype=dtype)
        # f32 KV cache (llama.cpp defaults to f16) so that f32 files are compared at full precision.
        llm = Llama(str(path), n_ctx=model.config.max_seq_len, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
        ids = llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=True)
        same_ids = ids == tokenizer.encode(MIXED_TEXT)
        llm.reset()
        llm.eval(prompt)
        theirs_logits = np.asarray(llm.scores[: len(prompt)])
        diff = float(np.abs(theirs_logits - ours_logits).max())
        llm.reset()
        theirs = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(token)
            if len(theirs) == 48:
                break
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        scale = float(np.abs(ours_logits).max())
        margin = tie_margin(model, prompt, ours, agree)
        # A divergence counts as a near-tie (not an error) when smolforge's own top-2 margin at
        # that step is within twice the logit difference measured on the prompt.
        explained = agree == 48 or margin <= 2 * diff
        # f32 must match to float rounding; rounded weights (f16, bf16, q8_0) are judged by tokens.
        passed = same_ids and explained and (dtype != "f32" or diff / scale < 1e-4)
        ok &= passed
        where = "48/48" if agree == 48 else f"{agree}/48 (top-2 margin there {margin:.1e})"
        print(f"| {label} | {dtype} | {path.stat().st_size / 1e6:.2f} | {'yes' if same_ids else 'NO'} | "
              f"{diff:.1e} ({diff / scale:.1e} rel.) | {where} | {'pass' if passed else 'FAIL'} |")
        del llm
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="also check this trained checkpoint (smolforge or HF directory)")
    args = parser.parse_args()
    torch.manual_seed(0)
    without_extra_buffer_types()
    ok = True
    print("| model | GGUF type | MB | token ids equal | max abs logit diff | greedy tokens equal | result |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = bundled_tokenizer(work)
        for label, changes in ARCHITECTURES.items():
            ok &= check(label, random_model(tokenizer, **changes), tokenizer, work, ["f32", "f16"])
        if args.checkpoint:
            model, tok = load_model(args.checkpoint)
            ok &= check(Path(args.checkpoint).name, model.float().eval(), tok, work,
                        ["f32", "f16", "bf16", "q8_0"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
