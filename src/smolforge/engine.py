"""The inference engine: batched prefill + KV-cache decoding, sampling, stops, streaming.

One engine serves `smolforge generate`, chat, the HTTP server, generative evaluation and RL
rollouts (DESIGN "One of each"; nanochat's `engine.py` is the model to follow).

How a request runs:
1. Prompts of different lengths are left-padded into one batch and prefilled in a single
   forward. A key mask hides the padding and position ids count only real tokens, so a prompt
   gives exactly the same tokens alone or in any batch.
2. Decoding adds one token per step for every running row, reading keys and values from the
   model's pre-allocated `KVCache` (sized prompt + max_new_tokens, never beyond the model's
   context length).
3. A row that emits a stop token or completes a stop string leaves the batch at once
   (`KVCache.select`), so the late steps of a ragged batch get cheaper.

Sampling applies, in this order (each a small pure function logits -> logits):
repetition penalty (CTRL, Keskar et al. 2019) -> temperature -> top-k (Fan et al. 2018) ->
top-p / nucleus (Holtzman et al. 2020) -> min-p (Nguyen et al. 2024) -> draw with
`torch.multinomial` from a seeded `torch.Generator`; temperature 0 is greedy (argmax).

The per-step loop does no Python work proportional to the vocabulary and one host sync (the
sampled token ids, needed to check stops and to stream text).

For serving, `ContinuousBatcher` runs the same steps in a background thread over a batch that
requests join (prefilled, then merged into the running `KVCache`) and leave at any decode step,
each with its own sampling parameters; a request's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from smolforge.errors import SmolforgeError
from smolforge.model import KVCache, Transformer


class TokenizerLike(Protocol):
    """What the engine needs from a tokenizer (`smolforge.tokenizer.Tokenizer` fits)."""

    @property
    def eos_id(self) -> int: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class InvalidSamplingParam(ValueError):
    """A `SamplingParams` field is out of range; `.field` names it (the CLI maps it to a flag)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name} {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """How to continue a prompt. The defaults sample from the model's full distribution."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens of the prompt and output
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before them
    stop_token_ids: list[int] = field(default_factory=list)  # the tokenizer's EOS is added
    ignore_eos: bool = False  # True: EOS does not stop (benchmarks, fixed-length rollouts)
    seed: int | None = None  # None: the global torch RNG

    def validate(self) -> None:
        """Raise `InvalidSamplingParam` (a ValueError) naming the first bad field."""
        rules = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1) (0 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must hold non-empty strings"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise InvalidSamplingParam(name, f"{rule}, got {getattr(self, name)!r}")


@dataclass
class Completion:
    """One prompt's result.

    `tokens` are all generated ids, including the stop token that ended the row (RL needs its
    log-probability); `text` (None without a tokenizer) excludes that token and is cut before
    a matched stop string.
    """

    prompt_tokens: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length" ("abort" from ContinuousBatcher: cancelled or closed)


@dataclass
class StreamDelta:
    """What one running prompt (`index` into the request) produced in one decode step."""

    index: int
    tokens: list[int]
    text: str  # safe to print: whole characters, never part of a pending stop string
    finish_reason: str | None  # set on the row's last delta


# --- sampling filters: pure functions of (N, V) logits -----------------------------------------


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL penalty (Keskar et al. 2019, eq. 2): for tokens already seen (`seen` (N, V) bool),
    divide positive logits and multiply negative ones by `penalty`."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature (> 0; temperature 0 is handled as argmax by the caller)."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept too); 0 = off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p.

    A token is dropped when the tokens ranked above it already hold mass >= p, so the most
    likely token always survives.
    """
    if p >= 1.0:
        return logits
    ranked, order = logits.sort(dim=-1, descending=True)
    probs = ranked.softmax(-1)
    drop_ranked = probs.cumsum(-1) - probs >= p
    drop = torch.empty_like(drop_ranked).scatter_(-1, order, drop_ranked)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below `min_p` x the top token's probability."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_tokens(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Next token id per row of `logits` (N, V), through the filter pipeline above."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = apply_temperature(logits.float(), params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# --- incremental text with stop strings -------------------------------------------------------


class _TextStream:
    """Turns one row's growing token list into text pieces that are safe to emit.

    Decoding re-reads only a short window of recent tokens (the incremental detokenisation of
    Hugging Face's text-generation-inference), so a step costs O(1), not O(output). Text is held
    back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or while its tail
    could still be the start of a stop string.
    """

    def __init__(self, tokenizer: TokenizerLike, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.window = 0  # ids[window:read] decode to text already taken
        self.read = 0
        self.pending = ""  # decoded, not yet emitted (a possible stop-string prefix)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to emit now, whether a stop string was completed)."""
        self.ids.append(token)
        taken = self.tokenizer.decode(self.ids[self.window : self.read])
        now = self.tokenizer.decode(self.ids[self.window :])
        if len(now) <= len(taken) or now.endswith("\ufffd"):
            return "", False  # nothing new yet, or half a multi-byte character
        self.window, self.read = self.read, len(self.ids)
        self.pending += now[len(taken) :]
        return self._release()

    def finish(self) -> str:
        """The row ended: emit whatever is held (an incomplete character included)."""
        taken = self.tokenizer.decode(self.ids[self.window : self.read])
        self.pending += self.tokenizer.decode(self.ids[self.window :])[len(taken) :]
        self.window = self.read = len(self.ids)
        text, _ = self._release(final=True)
        return text

    def _release(self, final: bool = False) -> tuple[str, bool]:
        # Emitted text never contains the start of a stop string that might still complete,
        # so a stop string can only begin inside `pending`.
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False


def _row_delta(token: int, stop_ids: set[int], text: _TextStream | None, last: bool) -> tuple[str, str | None]:
    """Text to emit and finish reason (None: the row goes on) for a row's newly sampled token.

    A stop token ends the row ("stop") and is not turned into text; a completed stop string ends
    it too; otherwise the row's last allowed token (`last`) ends it with "length". Shared by
    `Engine._decode` and `ContinuousBatcher`, so both follow one set of rules.
    """
    if token in stop_ids:
        return (text.finish() if text is not None else ""), "stop"
    piece, reason = "", None
    if text is not None:
        piece, hit = text.push(token)
        reason = "stop" if hit else None
    if reason is None and last:
        reason = "length"
        if text is not None:
            piece += text.finish()
    return piece, reason


def _seen_tokens(prompts: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """(len(prompts), V) bool: True at the tokens of each prompt (repetition penalty state)."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    rows = torch.tensor([i for i, p in enumerate(prompts) for _ in p], device=device)
    seen[rows, torch.tensor([t for p in prompts for t in p], device=device)] = True
    return seen


# --- the engine ---------------------------------------------------------------------------------


class _GraphedDecodeStep:
    """One decode step of a fixed batch captured as a CUDA graph.

    Small models decode far below the GPU's limits because every step launches hundreds of
    kernels from Python; replaying a captured graph launches them all at once. The graph bakes
    in the cache's buffers and batch size, so it is captured again when rows leave the batch.
    """

    def __init__(self, model: Transformer, cache, rows: int) -> None:
        device = cache.key_mask.device
        if cache.slot is None:
            cache.start_static_decoding()
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        # Warm-up on a side stream, as CUDA graph capture requires. It writes to the next slot,
        # which the real step overwrites before attending to it.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(self.tokens, position_ids=self.positions, cache=cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, position_ids=self.positions, cache=cache).logits[:, -1]
        self.cache = cache

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions)
        self.graph.replay()
        self.cache.slot += 1
        return self.logits.clone()


class Engine:
    """Batched generation for one model (and optionally its tokenizer, for text and stops).

    The model's train/eval mode is left alone (RL shares the model with the trainer; the model
    has no dropout). With `device`, the model is moved there. On CUDA, decode steps replay a
    captured CUDA graph unless `cuda_graphs=False`.
    """

    def __init__(self, model: Transformer, tokenizer: TokenizerLike | None = None,
                 device: str | torch.device | None = None, cuda_graphs: bool | None = None) -> None:
        if device is not None:
            model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs

    def stream(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[StreamDelta]]:
        """After each decode step, yield one delta per prompt still running at that step.

        The request is checked here, before the first `next()`.
        """
        self._check(prompts, params)
        return self._decode(prompts, params)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Complete every prompt (lists of token ids); results in the order of `prompts`."""
        tokens: list[list[int]] = [[] for _ in prompts]
        texts = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        for deltas in self.stream(prompts, params):
            for d in deltas:
                tokens[d.index] += d.tokens
                texts[d.index].append(d.text)
                if d.finish_reason is not None:
                    reasons[d.index] = d.finish_reason
        return [Completion(list(p), t, "".join(x) if self.tokenizer is not None else None, r)
                for p, t, x, r in zip(prompts, tokens, texts, reasons)]

    def generate_text(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        """Encode the prompts with the tokenizer, then `generate`."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            raise ValueError("generate_text needs a tokenizer with an encode() method")
        return self.generate([encode(p) for p in prompts], params)

    @torch.inference_mode()
    def beam_search(self, prompt: list[int], num_beams: int, max_new_tokens: int,
                    length_penalty: float = 1.0, stop_token_ids: Sequence[int] = (),
                    ignore_eos: bool = False) -> list[Completion]:
        """The `num_beams` best continuations of one prompt, best first.

        Hypotheses are ranked by summed log-probability / length ** length_penalty (Wu et al.
        2016's normalisation in its simple form, as in `transformers`). The cache holds one row
        per beam and is re-indexed every step as beams fork or die.
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0,
                                stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
        self._check([prompt], params)
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        stop_ids, device = self._stop_ids(params), self.device
        cache = self.model.new_cache(1, len(prompt) + max_new_tokens)
        ids = torch.tensor([prompt], device=device)
        logits = self.model(ids, cache=cache).logits[:, -1]
        cache.select(torch.zeros(num_beams, dtype=torch.long, device=device))
        # Only the first beam is live at the start, so the first step does not pick duplicates.
        scores = torch.full((num_beams,), float("-inf"), device=device)
        scores[0] = 0.0
        logits = logits.expand(num_beams, -1)
        beams: list[list[int]] = [[] for _ in range(num_beams)]
        finished: list[tuple[float, list[int], str]] = []

        def rank(score: float, length: int) -> float:
            return score / max(length, 1) ** length_penalty

        for step in range(max_new_tokens):
            total = scores[:, None] + logits.float().log_softmax(-1)
            top_scores, top_index = total.flatten().topk(2 * num_beams)
            vocab = total.shape[-1]
            rows, next_beams, next_scores = [], [], []
            for score, index in zip(top_scores.tolist(), top_index.tolist()):
                row, token = divmod(index, vocab)
                if score == float("-inf") or len(rows) == num_beams:
                    break
                if token in stop_ids:
                    finished.append((rank(score, step + 1), beams[row] + [token], "stop"))
                else:
                    rows.append(row)
                    next_beams.append(beams[row] + [token])
                    next_scores.append(score)
            # Stop once num_beams hypotheses ended and no running one ranks above the worst of
            # them (exact for length_penalty <= 1, where growing longer only lowers a rank).
            kept = sorted((f[0] for f in finished), reverse=True)[:num_beams]
            best_live = max((rank(x, step + 1) for x in next_scores), default=float("-inf"))
            if not rows or (len(kept) == num_beams and best_live <= kept[-1]):
                break
            pad = num_beams - len(rows)  # fewer live beams than slots: fill with dead copies
            cache.select(torch.tensor(rows + rows[:1] * pad, device=device))
            beams = next_beams + [list(next_beams[0]) for _ in range(pad)]
            scores = torch.tensor(next_scores + [float("-inf")] * pad, device=device)
            if step == max_new_tokens - 1:
                finished += [(rank(x, len(b)), b, "length") for x, b in zip(next_scores, next_beams)]
                break
            tokens = torch.tensor([b[-1] for b in beams], device=device)
            positions = torch.full((num_beams, 1), len(prompt) + step, device=device)
            logits = self.model(tokens[:, None], position_ids=positions, cache=cache).logits[:, -1]
        finished.sort(key=lambda f: f[0], reverse=True)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return [Completion(list(prompt), ids, decode([t for t in ids if t not in stop_ids]) if decode else None,
                           reason) for _, ids, reason in finished[:num_beams]]

    # -- internals ------------------------------------------------------------------------------

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        params.validate()
        if not prompts:
            raise ValueError("no prompts given")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass one to Engine(model, tokenizer)")
        longest, limit = max(len(p) for p in prompts), self.model.config.max_seq_len
        if longest + params.max_new_tokens > limit:
            raise ValueError(
                f"the longest prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"= {longest + params.max_new_tokens} exceeds the model's context length ({limit}); "
                "shorten the prompt or lower max_new_tokens"
            )

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.tokenizer is not None:
            try:
                stop_ids.add(self.tokenizer.eos_id)
            except SmolforgeError:  # a tokenizer without EOS: only explicit stops apply
                pass
        return stop_ids

    def _prefill_inputs(self, prompts: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Left-padded ids, key mask (False at padding) and positions counting real tokens."""
        longest = max(len(p) for p in prompts)
        ids = [[0] * (longest - len(p)) + list(p) for p in prompts]
        mask = [[False] * (longest - len(p)) + [True] * len(p) for p in prompts]
        input_ids = torch.tensor(ids, device=self.device)
        key_mask = torch.tensor(mask, device=self.device)
        positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids, key_mask, positions

    @torch.inference_mode()
    def _decode(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[StreamDelta]]:
        n, device = len(prompts), self.device
        stop_ids = self._stop_ids(params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        seen = None  # (rows, V) bool: tokens of prompt + output, for the repetition penalty
        if params.repetition_penalty != 1.0:
            seen = _seen_tokens(prompts, self.model.config.vocab_size, device)
        texts = ([_TextStream(self.tokenizer, params.stop) for _ in prompts]
                 if self.tokenizer is not None else None)

        input_ids, key_mask, positions = self._prefill_inputs(prompts)
        cache = self.model.new_cache(n, input_ids.shape[1] + params.max_new_tokens)
        logits = self.model(input_ids, position_ids=positions, key_mask=key_mask, cache=cache).logits[:, -1]
        next_pos = positions[:, -1:] + 1  # (rows, 1)
        live = list(range(n))  # request index of each batch row
        batch_rows = torch.arange(n, device=device)
        last_step = params.max_new_tokens - 1
        graphed = None  # the captured decode step of the current batch, when using CUDA graphs
        for step in range(params.max_new_tokens):
            tokens = sample_tokens(logits, params, seen, generator)
            if seen is not None:
                seen[batch_rows, tokens] = True
            deltas, keep = [], []
            for b, (i, token) in enumerate(zip(live, tokens.tolist())):  # the step's one host sync
                text, reason = _row_delta(token, stop_ids, texts[i] if texts is not None else None,
                                          last=step == last_step)
                if reason is None:
                    keep.append(b)
                deltas.append(StreamDelta(i, [token], text, reason))
            yield deltas
            if not keep:
                return
            if len(keep) < len(live):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.select(index)
                tokens, next_pos = tokens[index], next_pos[index]
                if seen is not None:
                    seen = seen[index]
                live = [live[b] for b in keep]
                batch_rows = torch.arange(len(live), device=device)
                graphed = None
            if self.cuda_graphs:
                if graphed is None:
                    graphed = _GraphedDecodeStep(self.model, cache, len(live))
                logits = graphed(tokens, next_pos)
            else:
                logits = self.model(tokens[:, None], position_ids=next_pos, cache=cache).logits[:, -1]
            next_pos = next_pos + 1


# --- continuous batching --------------------------------------------------------------------------


class GenerationError(RuntimeError):
    """The batcher's model thread failed while this request was live; `__cause__` holds the
    original exception (e.g. CUDA out of memory)."""


class RequestStream:
    """One submitted request: iterate for its `StreamDelta`s (index always 0) as they come.

    Filled by the batcher's model thread, read by one consumer thread. `__next__` blocks until
    the next delta and stops after the delta that carries the finish reason ("stop", "length",
    or "abort" for a cancelled request or a closed batcher); it raises `GenerationError` if the
    model thread failed.
    """

    def __init__(self, prompt: list[int], has_tokenizer: bool) -> None:
        self.prompt = prompt
        self._items: queue.SimpleQueue[StreamDelta | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._has_tokenizer = has_tokenizer
        self._tokens: list[int] = []
        self._texts: list[str] = []
        self._finish_reason: str | None = None
        self._error: BaseException | None = None

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> StreamDelta:
        if self._error is not None:
            raise GenerationError(f"generation failed in the batcher's model thread: {self._error!r}") \
                from self._error
        if self._finish_reason is not None:
            raise StopIteration
        item = self._items.get()
        if isinstance(item, BaseException):
            self._error = item
            return self.__next__()
        self._tokens += item.tokens
        self._texts.append(item.text)
        self._finish_reason = item.finish_reason
        return item

    def cancel(self) -> None:
        """The client went away: the request leaves the batch at the next step (ends "abort")."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self) -> Completion:
        """Wait for the end and return the whole completion (deltas already read included);
        raises `GenerationError` like `__next__`."""
        for _ in self:
            pass
        text = "".join(self._texts) if self._has_tokenizer else None
        return Completion(list(self.prompt), list(self._tokens), text, self._finish_reason or "abort")

    # -- the model thread's side --
    def _put(self, delta: StreamDelta) -> None:
        self._items.put(delta)

    def _abort(self) -> None:
        self._items.put(StreamDelta(0, [], "", "abort"))

    def _fail(self, error: BaseException) -> None:
        self._items.put(error)


@dataclass
class _Request:
    """A request's decoding state, owned by the model thread once admitted."""

    stream: RequestStream
    params: SamplingParams
    stop_ids: set[int]
    generator: torch.Generator | None
    text: _TextStream | None
    generated: int = 0  # tokens sampled so far

    @property
    def sampling_group(self) -> tuple:
        """Rows with equal keys can be sampled in one `sample_tokens` call. A seeded request
        draws from its own generator, exactly as it would alone, so it is a group of its own."""
        p = self.params
        if p.temperature == 0:
            return ("greedy", p.repetition_penalty)
        if self.generator is not None:
            return ("seeded", id(self))
        return ("sampled", p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)

    @property
    def writes_left(self) -> int:
        """KV slots this row may still fill: each sampled token is fed back unless it is the last."""
        return self.params.max_new_tokens - self.generated - 1


class ContinuousBatcher:
    """One background thread runs the model; requests from any thread join the running batch at
    the next decode step and leave it when they finish (continuous batching, Yu et al. 2022,
    "Orca", at the granularity of whole decode steps).

    Each step: cancelled rows leave; queued requests (FIFO, while fewer than `max_batch_size`
    rows run) are prefilled together in one left-padded forward and their keys/values merged
    into the running `KVCache` (`KVCache.merge`); every row samples one token with its own
    parameters and generator; finished rows leave (`KVCache.select`, then `KVCache.trim` drops
    slots no row uses); the rest decode one token in one forward. Rows keep their own position
    ids (real tokens only), so for greedy decoding a request gets the tokens that
    `Engine.generate([prompt], params)` gives it alone, whatever shares the batch.

    No CUDA graphs here: the batch changes shape every few steps. If the model thread raises,
    every live request's stream raises `GenerationError` and the batcher goes on serving the
    queued and later requests with a fresh batch.
    """

    def __init__(self, engine: Engine, max_batch_size: int = 32) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()  # guarded by _lock
        self._closing = False  # guarded by _lock
        # The running batch, owned by the model thread; row b of every tensor is _rows[b].
        self._rows: list[_Request] = []
        self._joining: list[_Request] = []  # admitted, not yet merged into the batch
        self._cache: KVCache | None = None
        self._logits: Tensor | None = None  # (B, V) each row's next-token logits
        self._seen: Tensor | None = None  # (B, V) bool: prompt + output tokens (repetition penalty)
        self._next_pos: Tensor | None = None  # (B, 1) position id of each row's next token
        self._thread = threading.Thread(target=self._serve, name="smolforge-batcher", daemon=True)
        self._thread.start()

    def __enter__(self) -> ContinuousBatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Queue one prompt; return its stream. Checks the request here, in the caller's thread
        (`Engine`'s rules: ValueError / InvalidSamplingParam), and is safe from any thread."""
        prompt = list(prompt)
        self.engine._check([prompt], params)
        tokenizer = self.engine.tokenizer
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.engine.device).manual_seed(params.seed)
        request = _Request(
            stream=RequestStream(prompt, has_tokenizer=tokenizer is not None), params=params,
            stop_ids=self.engine._stop_ids(params), generator=generator,
            text=_TextStream(tokenizer, params.stop) if tokenizer is not None else None)
        with self._lock:
            if self._closing:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(request)
            self._lock.notify()
        return request.stream

    def close(self) -> None:
        """Stop the model thread; queued and running requests end with finish_reason "abort"."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the model thread -------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                while self._admit():
                    try:
                        self._step()
                    except Exception as exc:  # noqa: BLE001 - each live client must hear of it
                        for request in self._rows + self._joining:
                            request.stream._fail(exc)
                        self._reset()
        finally:
            with self._lock:
                self._closing = True
                left = self._rows + self._joining + list(self._waiting)
                self._waiting.clear()
            for request in left:
                request.stream._abort()
            self._reset()

    def _admit(self) -> bool:
        """Wait for work; move queued requests into `_joining` while rows are free. False: close."""
        with self._lock:
            while not self._closing and not self._rows and not self._waiting:
                self._lock.wait()
            if self._closing:
                return False
            for request in [r for r in self._waiting if r.stream.cancelled]:
                self._waiting.remove(request)
                request.stream._abort()
            while self._waiting and len(self._rows) + len(self._joining) < self.max_batch_size:
                self._joining.append(self._waiting.popleft())
            return True

    def _step(self) -> None:
        """One decode step of the whole batch (see the class docstring)."""
        if any(r.stream.cancelled for r in self._rows):
            for request in self._rows:
                if request.stream.cancelled:
                    request.stream._abort()
            self._keep([b for b, r in enumerate(self._rows) if not r.stream.cancelled])
        if self._joining:
            self._join()
        if not self._rows:
            return
        tokens = self._sample()
        self._seen[torch.arange(len(self._rows), device=tokens.device), tokens] = True
        keep = []
        for b, (request, token) in enumerate(zip(self._rows, tokens.tolist())):  # one host sync
            last = request.generated == request.params.max_new_tokens - 1
            text, reason = _row_delta(token, request.stop_ids, request.text, last)
            request.generated += 1
            request.stream._put(StreamDelta(0, [token], text, reason))
            if reason is None:
                keep.append(b)
        if len(keep) < len(self._rows):
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
            self._keep(keep)
        if not self._rows:
            return
        self._make_room()
        model = self.engine.model
        self._logits = model(tokens[:, None], position_ids=self._next_pos, cache=self._cache).logits[:, -1]
        self._next_pos = self._next_pos + 1

    def _join(self) -> None:
        """Prefill the admitted requests in one left-padded forward and merge them into the batch."""
        newcomers, engine = self._joining, self.engine
        prompts = [r.stream.prompt for r in newcomers]
        input_ids, key_mask, positions = engine._prefill_inputs(prompts)
        cache = engine.model.new_cache(len(prompts), input_ids.shape[1])
        logits = engine.model(input_ids, position_ids=positions, key_mask=key_mask, cache=cache).logits[:, -1]
        seen = _seen_tokens(prompts, engine.model.config.vocab_size, engine.device)
        next_pos = positions[:, -1:] + 1
        # Room for every row to finish without regrowing, up to the context length (the
        # longest row has at most max_seq_len - 1 tokens in the cache, so one slot always fits).
        length = max(cache.length, self._cache.length if self._cache is not None else 0)
        writes = max(r.writes_left for r in self._rows + newcomers)
        capacity = min(engine.model.config.max_seq_len, length + writes)
        if self._cache is None:
            cache.resize(capacity)
            self._cache, self._logits, self._seen, self._next_pos = cache, logits, seen, next_pos
        else:
            self._cache.merge(cache, capacity)
            self._logits = torch.cat([self._logits, logits])
            self._seen = torch.cat([self._seen, seen])
            self._next_pos = torch.cat([self._next_pos, next_pos])
        self._rows += newcomers
        self._joining = []

    def _sample(self) -> Tensor:
        """One token per row, each with its own request's sampling parameters and generator."""
        groups: dict[tuple, list[int]] = {}
        for b, request in enumerate(self._rows):
            groups.setdefault(request.sampling_group, []).append(b)
        if len(groups) == 1:
            first = self._rows[0]
            return sample_tokens(self._logits, first.params, self._seen, first.generator)
        tokens = torch.empty(len(self._rows), dtype=torch.long, device=self._logits.device)
        for rows in groups.values():
            first, index = self._rows[rows[0]], torch.tensor(rows, device=self._logits.device)
            seen = self._seen[index] if first.params.repetition_penalty != 1.0 else None
            tokens[index] = sample_tokens(self._logits[index], first.params, seen, first.generator)
        return tokens

    def _keep(self, keep: list[int]) -> None:
        """Keep only these batch rows (the others finished or were cancelled)."""
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        self._cache.select(index)
        self._cache.trim()  # a long row may have left: later steps attend over fewer slots
        self._logits, self._seen = self._logits[index], self._seen[index]
        self._next_pos = self._next_pos[index]
        self._rows = [self._rows[b] for b in keep]

    def _make_room(self) -> None:
        """Make sure the next decode step has a free slot (copying the cache into a bigger one)."""
        cache = self._cache
        if cache.length < cache.max_len:
            return
        cache.trim()  # normally done already when rows left; after it, length < max_seq_len
        writes = max(r.writes_left for r in self._rows) + 1  # + the token about to be fed
        cache.resize(min(self.engine.model.config.max_seq_len, cache.length + writes))

    def _reset(self) -> None:
        self._rows, self._joining = [], []
        self._cache = self._logits = self._seen = self._next_pos = None


# --- CLI ----------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="Generate text from a checkpoint.",
        description="Continue one or more prompts with a checkpoint's model; one prompt is streamed.")
    parser.add_argument("checkpoint", help="Checkpoint directory (smolforge or Hugging Face).")
    parser.add_argument("--prompt", action="append", required=True, help="Prompt text; repeat for a batch.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Most tokens to generate per prompt.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature; 0 = greedy.")
    parser.add_argument("--top-k", type=int, default=0, help="Sample among the k most likely tokens; 0 = off.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling probability mass; 1 = off.")
    parser.add_argument("--min-p", type=float, default=0.0, help="Drop tokens below min-p x the top probability.")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="CTRL penalty on tokens already seen; 1 = off.")
    parser.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                        help="Stop string(s); the output is cut before the first one found.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling.")
    parser.add_argument("--num-beams", type=int, default=1,
                        help="Beam search with this many beams (deterministic; sampling flags ignored).")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="Beam ranking: log-prob / length ** this; 0 = raw log-prob.")
    parser.add_argument("--no-stream", action="store_true", help="Print whole completions at the end.")
    parser.add_argument("--chat", action="store_true",
                        help="Send each prompt as a user message through the checkpoint's chat template "
                             "(generation prompt added; stops at the end of the turn).")
    parser.add_argument("--no-think", action="store_true",
                        help="With --chat: reasoning mode off (enable_thinking=false) for hybrid templates.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda when available.")
    parser.set_defaults(func=_generate_command)


def _chat_prompts(prompts: list[str], tokenizer: Any, enable_thinking: bool) -> list[str]:
    from smolforge.chat.render import render_messages, require_chat_template

    template = require_chat_template(tokenizer, "--chat")
    return [render_messages(template, [{"role": "user", "content": p}],
                            add_generation_prompt=True, enable_thinking=enable_thinking) for p in prompts]


def _generate_command(args: argparse.Namespace) -> int:
    from smolforge.train.checkpoint import load_model

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        stop=args.stop, seed=args.seed)
    try:
        params.validate()
    except InvalidSamplingParam as exc:
        raise SmolforgeError(f"--{exc.field.replace('_', '-')}: {exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.checkpoint, device=device)
    engine = Engine(model, tokenizer)
    if args.chat:
        args.prompt = _chat_prompts(args.prompt, tokenizer, enable_thinking=not args.no_think)
        from smolforge.chat.render import end_of_turn_ids

        params.stop_token_ids += end_of_turn_ids(tokenizer)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    try:
        if args.num_beams > 1:
            for prompt, ids in zip(args.prompt, prompts):
                best = engine.beam_search(ids, args.num_beams, args.max_new_tokens, args.length_penalty)[0]
                print(f"--- prompt {prompt!r} (beam search, {best.finish_reason}, {len(best.tokens)} tokens)")
                print(prompt + best.text)
            return 0
        if len(prompts) == 1 and not args.no_stream:
            steps = engine.stream(prompts, params)  # checks the request before printing anything
            sys.stdout.write(args.prompt[0])
            for deltas in steps:
                sys.stdout.write("".join(d.text for d in deltas))
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        for prompt, completion in zip(args.prompt, engine.generate(prompts, params)):
            print(f"--- prompt {prompt!r} ({completion.finish_reason}, {len(completion.tokens)} tokens)")
            print(prompt + completion.text)
    except ValueError as exc:  # e.g. prompt + --max-new-tokens beyond the context length
        raise SmolforgeError(f"{args.checkpoint}: {exc} (--prompt / --max-new-tokens)") from None
    return 0
