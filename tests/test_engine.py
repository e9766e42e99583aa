"""The inference engine against naive decoding, transformers' generate, and hand-worked filters."""

from __future__ import annotations

import pytest
import torch

from smolforge.engine import (
    Engine,
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)
from smolforge.model import Transformer, debug

VOCAB = 97
INF = float("-inf")


class ByteCodec:
    """Fake tokenizer: token id = a printable character (id + 32); id 0 is EOS."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i + 32) for i in ids if i != 0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(debug().model_copy(update={"vocab_size": VOCAB})).eval()


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [3, 1, 4, 1, 5]]


def test_greedy_batch_equals_naive_loop_and_single_runs(model):
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    batched = Engine(model).generate(PROMPTS, params)
    for prompt, completion in zip(PROMPTS, batched):
        assert completion.tokens == naive_greedy(model, prompt, 12)
        assert completion.tokens == Engine(model).generate([prompt], params)[0].tokens
        assert completion.finish_reason == "length"


def test_greedy_equals_transformers_generate(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
        max_position_embeddings=cfg.max_seq_len)).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    prompt = PROMPTS[0]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    ours = Engine(model).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert ours[0].tokens == out[0, len(prompt):].tolist()


def test_filters_on_hand_worked_examples():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert top_k_filter(logits, 2).tolist() == [[2.0, 1.0, INF, INF]]
    # softmax([2,1,0,-1]) = [0.644, 0.237, 0.087, 0.032]: mass 0.644 < 0.8 so keep two tokens.
    assert top_p_filter(logits, 0.8).tolist() == [[2.0, 1.0, INF, INF]]
    assert top_p_filter(logits, 0.5).tolist() == [[2.0, INF, INF, INF]]
    # min_p 0.2: threshold 0.2 * 0.644 = 0.129 keeps tokens 0 and 1.
    assert min_p_filter(logits, 0.2).tolist() == [[2.0, 1.0, INF, INF]]
    seen = torch.tensor([[True, False, False, True]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    shuffled = torch.tensor([[0.0, -1.0, 2.0, 1.0]])
    assert top_p_filter(shuffled, 0.8).tolist() == [[INF, INF, 2.0, 1.0]]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution(model):
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, seed=123, ignore_eos=True)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, seed=7, ignore_eos=True))
    assert [x.tokens for x in a] != [x.tokens for x in c]
    # top_k=1 sampling is greedy whatever the temperature.
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=5.0, top_k=1, seed=1, ignore_eos=True))
    assert [x.tokens for x in greedy] == [x.tokens for x in top1]


def test_stop_strings_eos_and_streaming(model):
    codec = ByteCodec()
    engine = Engine(model, codec)
    prompt = codec.encode("abc")
    free = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.tokens) == 20
    text = free.text
    stop = text[5:7]
    cut = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    # A stop token id ends the row and is not part of the output.
    stop_id = free.tokens[3]
    ended = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop_id]))[0]
    first = free.tokens.index(stop_id)
    assert ended.finish_reason == "stop" and ended.tokens == free.tokens[:first]
    # Streaming deltas concatenate to the non-streamed text, for every row of a batch.
    params = SamplingParams(max_new_tokens=15, temperature=0.9, seed=3, stop=[stop])
    prompts = [prompt, codec.encode("hello"), codec.encode("x")]
    whole = engine.generate(prompts, params)
    streamed = ["", "", ""]
    for deltas in engine.stream(prompts, params):
        for d in deltas:
            streamed[d.index] += d.text
    assert streamed == [c.text for c in whole]


def test_bad_requests_are_refused(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="context length"):
        engine.generate([[1] * 200], SamplingParams(max_new_tokens=100))
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("min_p", 1.0), ("top_k", -1),
                         ("repetition_penalty", 0.0), ("max_new_tokens", 0)]:
        with pytest.raises(ValueError, match=field):
            engine.generate([[1, 2]], SamplingParams(**{field: value}))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([[1, 2]], SamplingParams(stop=["x"]))


def test_repetition_penalty_reduces_repeats(model):
    engine = Engine(model)
    plain = engine.generate([[5, 5, 5]], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))[0]
    penalised = engine.generate([[5, 5, 5]], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True,
                                                            repetition_penalty=5.0))[0]
    assert len(set(penalised.tokens)) >= len(set(plain.tokens))
