"""Continuous batching (`ContinuousBatcher`): every request gets what `Engine.generate` gives it
alone, whatever joins or leaves the batch around it; plus cancellation, queueing, validation,
shutdown and model failures, and the `KVCache` re-layout it relies on."""

from __future__ import annotations

import threading
import time
from functools import partial

import pytest
import torch

from smolforge.engine import (
    Completion,
    ContinuousBatcher,
    Engine,
    GenerationError,
    InvalidSamplingParam,
    SamplingParams,
)
from smolforge.model import KVCache, Transformer, debug

TEXTS = [
    "the quick brown fox",
    "jumps",
    "over the lazy dog 0123456789 the quick brown fox jumps over the lazy dog",
    "dog 0123",
    "the lazy",
    "x",
]


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    # init_std 0.2 as in test_engine: at the default init the model only repeats its last
    # token, which would hide cache-layout bugs.
    torch.manual_seed(0)
    cfg = debug().model_copy(update={"vocab_size": tokenizer.vocab_size, "init_std": 0.2})
    return Transformer(cfg).eval()


@pytest.fixture
def engine(model, tokenizer) -> Engine:
    return Engine(model, tokenizer)


def solo(engine: Engine, prompt: list[int], params: SamplingParams) -> Completion:
    return engine.generate([prompt], params)[0]


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **kw)


def bounded(fn, timeout: float = 30.0):
    """fn() in a worker thread, so that a batcher bug fails the test instead of hanging it."""
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"the batcher did not answer within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def result(stream) -> Completion:
    return bounded(stream.result)


class ForwardSpy:
    """Wraps `model.forward` (restored by monkeypatch): records (batch, tokens) of each call,
    optionally sleeps (so a test can act while a request is mid-decode) or raises."""

    def __init__(self, model: Transformer, monkeypatch, delay: float = 0.0) -> None:
        self.calls: list[tuple[int, int]] = []
        self.spans: list[tuple[int, int]] = []  # (batch, cached slots) before each decode step
        self.prefilled: list[list[int]] = []  # ids of each prefill row, padding stripped
        self.delay, self.fail = delay, threading.Event()
        self.original = model.forward
        monkeypatch.setattr(model, "forward", self)

    def __call__(self, input_ids, *args, **kwargs):
        if self.fail.is_set():
            raise RuntimeError("boom: simulated device failure")
        self.calls.append(tuple(input_ids.shape))
        cache = kwargs.get("cache")
        if cache is not None and input_ids.shape[1] == 1:
            self.spans.append((input_ids.shape[0], cache.length))
        key_mask = kwargs.get("key_mask")
        if key_mask is not None:
            self.prefilled += [ids[m].tolist() for ids, m in zip(input_ids, key_mask)]
        if self.delay:
            time.sleep(self.delay)
        return self.original(input_ids, *args, **kwargs)

    def decode_batch_sizes(self) -> list[int]:
        return [b for b, t in self.calls if t == 1]


# --- KVCache re-layout ---------------------------------------------------------------------------


def filled_cache(lengths: list[int], length: int, capacity: int, offset: float) -> KVCache:
    """A 1-layer cache whose row b holds `lengths[b]` real slots ending at `length`; the key of a
    real slot is offset + 100 b + its index among the row's tokens, padding is -1."""
    cfg = debug().model_copy(update={"vocab_size": 8, "n_layers": 1})
    cache = KVCache(cfg, len(lengths), capacity, "cpu", torch.float32)
    for b, n in enumerate(lengths):
        cache.keys[0][b, :, :length] = -1.0
        for i in range(n):
            cache.keys[0][b, :, length - n + i] = offset + 100 * b + i
        cache.key_mask[b, length - n : length] = True
    cache.values = [k.clone() for k in cache.keys]
    cache.length = length
    return cache


def row_tokens(cache: KVCache, b: int) -> list[float]:
    """Key values of row b's real slots, in order (head 0, channel 0)."""
    return cache.keys[0][b, 0, : cache.length, 0][cache.key_mask[b, : cache.length]].tolist()


def test_kv_cache_merge_trim_resize_keep_every_row_right_aligned():
    running = filled_cache([3, 5], length=7, capacity=9, offset=0)  # 2 unused leading slots
    newcomer = filled_cache([2], length=2, capacity=2, offset=1000)
    running.merge(newcomer, capacity=8)  # shorter newcomer: goes into the padding
    assert (running.length, running.max_len, running.key_mask.shape) == (5, 8, (3, 8))
    assert row_tokens(running, 0) == [0, 1, 2]
    assert row_tokens(running, 1) == [100, 101, 102, 103, 104]
    assert row_tokens(running, 2) == [1000, 1001]
    assert running.key_mask[:, 3].tolist() == [True, True, True]  # every row ends at length
    assert not running.key_mask[:, 5:].any()

    longer = filled_cache([6, 1], length=6, capacity=6, offset=5000)
    running.merge(longer, capacity=12)  # longer newcomer: the running rows shift right
    assert (running.length, running.max_len) == (6, 12)
    assert [row_tokens(running, b) for b in range(5)] == [
        [0, 1, 2], [100, 101, 102, 103, 104], [1000, 1001],
        [5000 + i for i in range(6)], [5100]]
    assert torch.equal(running.keys[0], running.values[0])

    running.select(torch.tensor([0, 2, 4]))  # the two long rows leave
    running.trim()  # the first 3 slots are padding in every remaining row
    assert (running.length, running.max_len) == (3, 9)
    assert [row_tokens(running, b) for b in range(3)] == [[0, 1, 2], [1000, 1001], [5100]]
    running.resize(4)
    assert (running.length, running.max_len, running.keys[0].shape[2]) == (3, 4, 4)
    assert [row_tokens(running, b) for b in range(3)] == [[0, 1, 2], [1000, 1001], [5100]]
    with pytest.raises(ValueError, match="below its length"):
        running.resize(2)


# --- parity with solo generation -----------------------------------------------------------------


def run_staggered(batcher: ContinuousBatcher, requests: list[tuple[list[int], SamplingParams]],
                  after: int = 2) -> list[tuple[list, Completion]]:
    """Submit request i from its own thread once request i-1 has streamed `after` deltas (or
    ended), so each joins a batch that is mid-decode. Returns (deltas, result) per request."""
    go = [threading.Event() for _ in requests]
    out: list = [None] * len(requests)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            go[i].wait(10)
            stream = batcher.submit(*requests[i])
            deltas = []
            for delta in stream:
                deltas.append(delta)
                if len(deltas) == after and i + 1 < len(requests):
                    go[i + 1].set()
            if i + 1 < len(requests):
                go[i + 1].set()
            out[i] = (deltas, stream.result())
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)
            for event in go:
                event.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    go[0].set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "the batcher did not answer within 60 s"
    assert not errors, errors
    return out


def test_greedy_requests_joining_mid_decode_equal_solo_generation(engine, tokenizer, monkeypatch):
    prompts = [tokenizer.encode(t) for t in TEXTS]
    prompts[2] = (prompts[2] * 8)[:150]  # joins a shorter running batch: running rows shift right
    free = [solo(engine, p, greedy(24)) for p in prompts]
    stop_token = free[1].tokens[5]  # stops request 1 early by a token id
    stop_text = free[3].text[4:6]  # and request 3 by a string
    assert stop_text.strip(), free[3].text
    params = [greedy(40), greedy(24, stop_token_ids=[stop_token]), greedy(12),
              greedy(24, stop=[stop_text]), greedy(3), greedy(30, repetition_penalty=1.3)]
    requests = list(zip(prompts, params))
    expected = [solo(engine, p, q) for p, q in requests]
    assert expected[1].finish_reason == "stop" and expected[3].finish_reason == "stop"

    merges: list[tuple[int, int]] = []  # (running length, newcomer length) of each merge
    original_merge = KVCache.merge

    def spy_merge(self, other, capacity):
        merges.append((self.length, other.length))
        return original_merge(self, other, capacity)

    monkeypatch.setattr(KVCache, "merge", spy_merge)
    spy = ForwardSpy(engine.model, monkeypatch)
    with ContinuousBatcher(engine) as batcher:
        out = run_staggered(batcher, requests)
    for (deltas, result), want in zip(out, expected):
        assert result.tokens == want.tokens
        assert result.text == want.text and result.finish_reason == want.finish_reason
        assert [t for d in deltas for t in d.tokens] == want.tokens
        assert "".join(d.text for d in deltas) == want.text
        assert all(d.index == 0 for d in deltas) and deltas[-1].finish_reason == want.finish_reason
    # The schedule really mixed rows: newcomers both shorter and longer than the running batch.
    assert max(spy.decode_batch_sizes()) >= 3
    assert any(a < b for a, b in merges) and any(a > b for a, b in merges)


def test_seeded_sampling_equals_solo_generation_per_request(engine, tokenizer):
    prompts = [tokenizer.encode(t) for t in TEXTS]
    params = [
        SamplingParams(max_new_tokens=20, temperature=0.9, top_k=20, seed=1, ignore_eos=True),
        SamplingParams(max_new_tokens=25, temperature=0.9, top_k=20, seed=2, ignore_eos=True),
        SamplingParams(max_new_tokens=15, temperature=1.3, top_p=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_new_tokens=30, temperature=0.7, min_p=0.1, repetition_penalty=1.4,
                       seed=4, ignore_eos=True),
        SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_new_tokens=20, temperature=1.0, seed=5),
    ]
    requests = list(zip(prompts, params))
    expected = [solo(engine, p, q) for p, q in requests]
    with ContinuousBatcher(engine) as batcher:
        at_once = [batcher.submit(p, q) for p, q in requests]
        results = [result(s) for s in at_once]
        staggered = [r for _, r in run_staggered(batcher, requests, after=3)]
    for got in (results, staggered):
        assert [r.tokens for r in got] == [e.tokens for e in expected]
        assert [r.text for r in got] == [e.text for e in expected]
    assert expected[0].tokens != expected[1].tokens  # different seeds, same filters


def test_cache_regrows_and_trims_as_long_rows_leave(engine, monkeypatch):
    """A long prompt with few new tokens and a short one with many: the merged cache is capped
    at the context length, trimmed when the long row leaves, then regrown."""
    limit = engine.model.config.max_seq_len
    long_prompt = [(7 * i) % 290 + 3 for i in range(200)]
    requests = [(long_prompt, greedy(20, ignore_eos=True)), ([5, 9, 11], greedy(120, ignore_eos=True))]
    expected = [solo(engine, p, q) for p, q in requests]
    capacities: list[int] = []
    original_resize = KVCache.resize

    def spy_resize(self, capacity):
        capacities.append(capacity)
        return original_resize(self, capacity)

    monkeypatch.setattr(KVCache, "resize", spy_resize)
    spy = ForwardSpy(engine.model, monkeypatch)
    with ContinuousBatcher(engine) as batcher:
        out = run_staggered(batcher, requests)
    assert [r.tokens for _, r in out] == [e.tokens for e in expected]
    assert len(capacities) >= 2 and max(capacities) <= limit  # first fill + a regrowth
    # Once the long row has left, the short one attends over its own slots only.
    last_shared = max(i for i, (batch, _) in enumerate(spy.spans) if batch == 2)
    assert spy.spans[last_shared][1] > 200
    batch, span = spy.spans[last_shared + 1]
    assert batch == 1 and span <= 3 + 20  # its prompt + the tokens it generated beside the long row


# --- lifecycle -----------------------------------------------------------------------------------


def test_cancelled_stream_stops_and_leaves_the_others_alone(engine, monkeypatch):
    ForwardSpy(engine.model, monkeypatch, delay=0.003)
    other_params = greedy(40, ignore_eos=True)
    expected = solo(engine, [4, 5, 6], other_params)
    with ContinuousBatcher(engine, max_batch_size=2) as batcher:
        doomed = batcher.submit([10, 11, 12, 13], greedy(200, ignore_eos=True))
        other = batcher.submit([4, 5, 6], other_params)
        bounded(doomed.__next__)
        queued = batcher.submit([1, 2], greedy(5))  # waits: the batch is full
        queued.cancel()
        assert result(queued) == Completion([1, 2], [], "", "abort")  # it never ran
        doomed.cancel()
        rest = bounded(partial(list, doomed))
        assert rest[-1].finish_reason == "abort" and rest[-1].tokens == []
        assert result(doomed).finish_reason == "abort" and len(result(doomed).tokens) < 200
        assert result(other).tokens == expected.tokens


def test_requests_beyond_max_batch_size_wait_in_fifo_order(engine, monkeypatch):
    spy = ForwardSpy(engine.model, monkeypatch)
    prompts = [[3, 4], [5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15, 16], [17] * 6]
    params = greedy(10, ignore_eos=True)
    expected = [solo(engine, p, params).tokens for p in prompts]
    spy.calls.clear()
    spy.prefilled.clear()
    with ContinuousBatcher(engine, max_batch_size=2) as batcher:
        streams = [batcher.submit(p, params) for p in prompts]
        assert [result(s).tokens for s in streams] == expected
    assert max(spy.decode_batch_sizes()) == 2
    assert max(b for b, _ in spy.calls) <= 2
    assert spy.prefilled == prompts  # admitted first come, first served


@pytest.mark.parametrize("prompt, params, error, match", [
    ([1, 2], SamplingParams(temperature=-1), InvalidSamplingParam, "temperature"),
    ([1, 2], SamplingParams(top_p=0), InvalidSamplingParam, "top_p"),
    ([], SamplingParams(), ValueError, "empty"),
    ([1, 10_000], SamplingParams(), ValueError, "outside the vocabulary"),
    ([1] * 200, SamplingParams(max_new_tokens=100), ValueError, "context length"),
])
def test_submit_refuses_bad_requests_in_the_callers_thread(engine, prompt, params, error, match):
    with ContinuousBatcher(engine) as batcher:
        with pytest.raises(error, match=match):
            batcher.submit(prompt, params)
        assert result(batcher.submit([1, 2], greedy(2))).tokens == solo(engine, [1, 2], greedy(2)).tokens


def test_stop_strings_need_a_tokenizer(model):
    with ContinuousBatcher(Engine(model)) as batcher:
        with pytest.raises(ValueError, match="tokenizer"):
            batcher.submit([1, 2], SamplingParams(stop=["x"]))
        assert result(batcher.submit([1, 2], greedy(3))).text is None


def test_close_ends_running_and_queued_streams_with_abort(engine, monkeypatch):
    ForwardSpy(engine.model, monkeypatch, delay=0.003)
    batcher = ContinuousBatcher(engine, max_batch_size=1)
    running = batcher.submit([1, 2, 3], greedy(200, ignore_eos=True))
    queued = batcher.submit([4, 5], greedy(200, ignore_eos=True))
    bounded(running.__next__)
    bounded(batcher.close)
    assert result(running).finish_reason == "abort" and len(result(running).tokens) < 200
    assert result(queued) == Completion([4, 5], [], "", "abort")
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([1], greedy(1))
    batcher.close()  # idempotent


def test_model_failure_reaches_every_live_client_and_the_batcher_recovers(engine, monkeypatch):
    spy = ForwardSpy(engine.model, monkeypatch, delay=0.002)
    with ContinuousBatcher(engine) as batcher:
        streams = [batcher.submit(p, greedy(100, ignore_eos=True)) for p in ([1, 2], [3, 4, 5])]
        for s in streams:
            bounded(s.__next__)  # both are live in the batch
        spy.fail.set()
        for s in streams:
            with pytest.raises(GenerationError, match="boom") as caught:
                bounded(partial(list, s))
            assert isinstance(caught.value.__cause__, RuntimeError)
            with pytest.raises(GenerationError):
                bounded(s.__next__)  # stays failed
        spy.fail.clear()
        again = batcher.submit([1, 2], greedy(6))
        assert result(again).tokens == solo(engine, [1, 2], greedy(6)).tokens
