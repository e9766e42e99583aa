"""The inference engine: batched prefill + decode with a KV cache, sampling, stops, streaming.

One engine serves `generate`, chat, serving, generative evaluation and RL rollouts (nanochat's
`engine.py` idea). Prompts of different lengths are left-padded into one batch: a key mask
hides the padding and position ids count only real tokens, so a prompt gives the same tokens
alone or in a batch. Finished rows leave the batch, so late decode steps get cheaper.

Sampling applies, in order: repetition penalty (CTRL, Keskar et al. 2019) → temperature →
top-k → top-p (nucleus, Holtzman et al. 2020) → min-p (Nguyen et al. 2024) → draw.
Each filter is a small pure function of the logits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from smolforge.errors import SmolforgeError
from smolforge.model import Transformer


class TextCodec(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def validate(self) -> None:
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature >= 0, "must be >= 0"),
                  ("top_k", self.top_k >= 0, "must be >= 0"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "must be > 0")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"


@dataclass
class StreamDelta:
    index: int
    tokens: list[int]
    text: str
    finish_reason: str | None


# --- sampling filters: logits (N, V) -> logits ----------------------------------------------------


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Divide positive / multiply negative logits of tokens already seen (`seen` (N, V) bool)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (the top one always)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_next(logits: Tensor, seen: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# --- the engine ------------------------------------------------------------------------------------


class _TextTracker:
    """Decoded text of one row, released only when it cannot be part of a stop string or an
    unfinished multi-byte character."""

    def __init__(self, codec: TextCodec | None, stops: list[str]) -> None:
        self.codec, self.stops = codec, stops
        self.tokens: list[int] = []
        self.sent = 0  # characters already released
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new releasable text, hit a stop string)."""
        self.tokens.append(token)
        if self.codec is None:
            return "", False
        text = self.codec.decode(self.tokens)
        for stop in self.stops:
            cut = text.find(stop, max(0, self.sent - len(stop)))
            if cut >= 0:
                out, self.sent = text[self.sent : cut], cut
                return out, True
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            safe = min(safe, len(text) - 1)
        if safe <= self.sent:
            return "", False
        out, self.sent = text[self.sent : safe], safe
        return out, False

    def flush(self) -> str:
        if self.codec is None:
            return ""
        text = self.codec.decode(self.tokens)
        out, self.sent = text[self.sent :], len(text)
        return out

    @property
    def text(self) -> str | None:
        return None if self.codec is None else self.codec.decode(self.tokens)[: self.sent]


class Engine:
    def __init__(self, model: Transformer, tokenizer: TextCodec | None = None,
                 device: str | torch.device | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        if device:
            self.model.to(self.device)

    @torch.inference_mode()
    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[StreamDelta]]:
        """Yield, after each decode step, the new tokens and text of every row that changed."""
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        longest = max(len(p) for p in prompts)
        limit = self.model.config.max_seq_len
        if longest + params.max_new_tokens > limit:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the model's context length ({limit})")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            stop_ids.add(self.tokenizer.eos_id)
        stop_ids_t = torch.tensor(sorted(stop_ids) or [-1], device=self.device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)

        n, V = len(prompts), self.model.config.vocab_size
        input_ids = torch.zeros(n, longest, dtype=torch.long, device=self.device)
        key_mask = torch.zeros(n, longest, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            input_ids[i, longest - len(p):] = torch.tensor(p, device=self.device)
            key_mask[i, longest - len(p):] = True
        positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
        seen = torch.zeros(n, V, dtype=torch.bool, device=self.device)
        if params.repetition_penalty != 1.0:
            seen.scatter_(1, input_ids, key_mask)
        cache = self.model.new_cache(n, longest + params.max_new_tokens)
        logits = self.model(input_ids, position_ids=positions, key_mask=key_mask, cache=cache).logits[:, -1]
        next_pos = positions[:, -1] + 1
        rows = list(range(n))  # original index of each live batch row
        trackers = [_TextTracker(self.tokenizer, params.stop) for _ in prompts]
        for step in range(params.max_new_tokens):
            tokens = sample_next(logits, seen, params, generator)
            is_stop = torch.isin(tokens, stop_ids_t)
            seen[torch.arange(len(rows), device=self.device), tokens] = True
            host_tokens, host_stop = tokens.tolist(), is_stop.tolist()  # the one sync per step
            deltas, keep = [], []
            for b, (row, token, stop_token) in enumerate(zip(rows, host_tokens, host_stop)):
                tracker = trackers[row]
                if stop_token:
                    deltas.append(StreamDelta(row, [], tracker.flush(), "stop"))
                    continue
                text, hit_stop = tracker.push(token)
                if hit_stop:
                    deltas.append(StreamDelta(row, [token], text, "stop"))
                elif step == params.max_new_tokens - 1:
                    deltas.append(StreamDelta(row, [token], text + tracker.flush(), "length"))
                else:
                    deltas.append(StreamDelta(row, [token], text, None))
                    keep.append(b)
            yield deltas
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                cache.select(index)
                tokens, next_pos, seen = tokens[index], next_pos[index], seen[index]
                rows = [rows[b] for b in keep]
            logits = self.model(tokens[:, None], position_ids=next_pos[:, None], cache=cache).logits[:, -1]
            next_pos = next_pos + 1

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        tokens: list[list[int]] = [[] for _ in prompts]
        texts = ["" for _ in prompts]
        reasons = ["length" for _ in prompts]
        for deltas in self.stream(prompts, params):
            for d in deltas:
                tokens[d.index] += d.tokens
                texts[d.index] += d.text
                if d.finish_reason:
                    reasons[d.index] = d.finish_reason
        return [Completion(list(p), t, texts[i] if self.tokenizer else None, reasons[i])
                for i, (p, t) in enumerate(zip(prompts, tokens))]

    def generate_text(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        if self.tokenizer is None:
            raise ValueError("generate_text needs a tokenizer")
        return self.generate([self.tokenizer.encode(p) for p in prompts], params)


# --- CLI ------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="Generate text from a checkpoint.",
                                   description="Sample continuations of one or more prompts.")
    parser.add_argument("checkpoint", help="Checkpoint directory (smolforge or Hugging Face).")
    parser.add_argument("--prompt", action="append", required=True, help="Prompt text; repeat for a batch.")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="Tokens to generate per prompt.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature; 0 = greedy.")
    parser.add_argument("--top-k", type=int, default=0, help="Keep the k most likely tokens; 0 = off.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass; 1 = off.")
    parser.add_argument("--min-p", type=float, default=0.0, help="Drop tokens below min-p x the top probability.")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty; 1 = off.")
    parser.add_argument("--stop", action="append", default=[], help="Stop string; repeat for several.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling.")
    parser.add_argument("--no-stream", action="store_true", help="Print whole completions at the end.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N.")
    parser.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from smolforge.train.checkpoint import load_model

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            stop=args.stop, seed=args.seed)
    try:
        params.validate()
    except ValueError as exc:
        raise SmolforgeError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}") from None
    model, tokenizer = load_model(args.checkpoint, device=args.device)
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    try:
        if len(prompts) == 1 and not args.no_stream:
            sys.stdout.write(args.prompt[0])
            for deltas in engine.stream(prompts, params):
                for d in deltas:
                    sys.stdout.write(d.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        for prompt, completion in zip(args.prompt, engine.generate(prompts, params)):
            print(f"--- {completion.finish_reason}, {len(completion.tokens)} tokens\n{prompt}{completion.text}")
    except ValueError as exc:
        raise SmolforgeError(str(exc)) from None
    return 0
