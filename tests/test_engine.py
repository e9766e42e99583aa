"""The inference engine against a naive no-cache loop, transformers' generate, hand-worked
sampling filters, and the text contract (stops, EOS, streaming, UTF-8)."""

from __future__ import annotations

import pytest
import torch

from smolforge.engine import (
    Engine,
    SamplingParams,
    _TextStream,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)
from smolforge.model import Transformer, debug

VOCAB = 97
INF = float("-inf")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [3, 1, 4, 1, 5]]


class ByteTokenizer:
    """Fake tokenizer: token id = byte value (ids >= 128 are UTF-8 continuation/lead bytes)."""

    def __init__(self, eos_id: int = 0) -> None:
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model() -> Transformer:
    # init_std 0.2, not 0.02: a model at the default init only repeats its last token, which
    # would let cache, padding and row-dropping bugs through.
    torch.manual_seed(0)
    return Transformer(debug().model_copy(update={"vocab_size": VOCAB, "init_std": 0.2})).eval()


def naive_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference: full forward over the whole sequence at every step, no cache, argmax."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


# --- decoding against references ----------------------------------------------------------------


def test_greedy_batch_equals_naive_loop(model):
    batched = Engine(model).generate(PROMPTS, GREEDY)
    assert [c.tokens for c in batched] == [naive_greedy(model, p, 12) for p in PROMPTS]
    assert all(c.finish_reason == "length" and c.text is None for c in batched)
    assert [c.prompt_tokens for c in batched] == PROMPTS


def test_left_padding_changes_nothing(model):
    """Each prompt alone gives the same tokens as in the padded batch, logits included."""
    engine = Engine(model)
    batched = engine.generate(PROMPTS, GREEDY)
    for prompt, completion in zip(PROMPTS, batched):
        assert engine.generate([prompt], GREEDY)[0].tokens == completion.tokens
    # The sampled path too: with top_k=1 sampling is deterministic whatever the seed.
    sampled = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1, seed=5, ignore_eos=True)
    assert [c.tokens for c in engine.generate(PROMPTS, sampled)] == [c.tokens for c in batched]


def test_greedy_equals_transformers_generate(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=True, attention_bias=False, max_position_embeddings=cfg.max_seq_len)).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    prompt = PROMPTS[0]
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert Engine(model).generate([prompt], GREEDY)[0].tokens == out[0, len(prompt):].tolist()


def test_finished_rows_leave_the_batch_without_disturbing_the_others(model):
    """A row stopped early (by a stop token) is dropped from the cache; the others go on as
    if they were alone."""
    engine = Engine(model)
    free = engine.generate(PROMPTS, GREEDY)
    stop_id = free[1].tokens[2]  # the middle row stops at its third token
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop_id])
    out = engine.generate(PROMPTS, params)
    for completion, reference in zip(out, free):
        if stop_id in reference.tokens:
            first = reference.tokens.index(stop_id)
            assert completion.tokens == reference.tokens[: first + 1]  # the stop token is kept
            assert completion.finish_reason == "stop"
        else:
            assert completion.tokens == reference.tokens and completion.finish_reason == "length"
    assert out[1].finish_reason == "stop" and len(out[1].tokens) <= 3


# --- sampling filters on hand-worked examples ------------------------------------------------------


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    seen = torch.tensor([[True, False, True, True]])
    # seen & positive: 2 / 2 = 1; unseen 1 stays; seen 0 stays 0; seen & negative: -1 * 2 = -2.
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_temperature_by_hand():
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    assert apply_temperature(logits, 0.5).tolist() == [[4.0, 2.0, -2.0]]
    assert apply_temperature(logits, 2.0).tolist() == [[1.0, 0.5, -0.5]]


def test_top_k_by_hand():
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.0], [1.0, 1.0, 1.0, 5.0]])
    assert top_k_filter(logits, 2).tolist() == [[INF, 3.0, INF, 2.0], [1.0, 1.0, 1.0, 5.0]]  # ties kept
    assert top_k_filter(logits, 1).tolist() == [[INF, 3.0, INF, INF], [INF, INF, INF, 5.0]]
    assert top_k_filter(logits, 0) is logits


def test_top_p_by_hand():
    # probabilities 0.4, 0.3, 0.2, 0.1 in shuffled order.
    logits = torch.tensor([[0.2, 0.4, 0.1, 0.3]]).log()
    keep = lambda p: (top_p_filter(logits, p) > INF).tolist()[0]  # noqa: E731
    assert keep(0.35) == [False, True, False, False]  # 0.4 alone reaches 0.35
    assert keep(0.5) == [False, True, False, True]  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert keep(0.75) == [True, True, False, True]  # 0.7 < 0.75 so the 0.2 token joins
    assert keep(0.05) == [False, True, False, False]  # the top token always survives
    assert top_p_filter(logits, 1.0) is logits
    kept = top_p_filter(logits, 0.5)
    assert torch.equal(kept[0, [1, 3]], logits[0, [1, 3]])  # survivors keep their logits


def test_min_p_by_hand():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    # threshold = 0.3 * 0.5 = 0.15: 0.15 stays (not below), 0.1 goes.
    assert (min_p_filter(logits, 0.3) > INF).tolist() == [[True, True, True, False]]
    # threshold 0.6 * 0.5 = 0.3: only the top token survives.
    assert (min_p_filter(logits, 0.6) > INF).tolist() == [[True, False, False, False]]


def test_pipeline_order_penalty_before_filters():
    """Penalty first: the penalised token falls out of the top-1 and the other one is drawn."""
    logits = torch.tensor([[3.0, 2.0, -5.0]])
    seen = torch.tensor([[True, False, False]])
    params = SamplingParams(temperature=1.0, top_k=1, repetition_penalty=2.0)
    assert sample_tokens(logits, params, seen).tolist() == [1]
    assert sample_tokens(logits, SamplingParams(temperature=0), seen).tolist() == [0]


# --- sampling behaviour ---------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model):
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95,
                                                    seed=7, ignore_eos=True))
    assert [c.tokens for c in a] != [c.tokens for c in other]


def test_temperature_towards_zero_becomes_greedy(model):
    engine = Engine(model)
    greedy = [c.tokens for c in engine.generate(PROMPTS, GREEDY)]
    for seed in (1, 2):
        cold = SamplingParams(max_new_tokens=12, temperature=1e-4, seed=seed, ignore_eos=True)
        assert [c.tokens for c in engine.generate(PROMPTS, cold)] == greedy
    # A hot temperature on this near-uniform random model does not follow the greedy path.
    hot = SamplingParams(max_new_tokens=12, temperature=5.0, seed=1, ignore_eos=True)
    assert [c.tokens for c in engine.generate(PROMPTS, hot)] != greedy


def test_repetition_penalty_reduces_repeats(model):
    engine = Engine(model)
    prompt = [[5, 5, 5]]
    plain = engine.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))[0]
    strong = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, repetition_penalty=1e4)
    penalised = engine.generate(prompt, strong)[0]
    assert len(set(plain.tokens)) < len(plain.tokens)  # the random model does repeat itself
    # With a huge penalty every seen token loses to any unseen one: no repeats, no 5.
    assert len(set(penalised.tokens)) == len(penalised.tokens) and 5 not in penalised.tokens


# --- text: stops, EOS, streaming, UTF-8 ------------------------------------------------------


def test_max_new_tokens_gives_length_and_text_matches_decode(model):
    tok = ByteTokenizer()
    out = Engine(model, tok).generate_text(["ABC", "HELLO"], SamplingParams(max_new_tokens=20, temperature=0,
                                                                           ignore_eos=True))
    for c in out:
        assert c.finish_reason == "length" and len(c.tokens) == 20
        assert c.text == tok.decode(c.tokens)
    assert out[0].prompt_tokens == tok.encode("ABC")


def test_eos_stops_unless_ignored(model):
    prompt = [tuple(ByteTokenizer().encode("ABC"))]
    free = Engine(model).generate([list(prompt[0])], GREEDY)[0]
    eos = free.tokens[4]
    engine = Engine(model, ByteTokenizer(eos_id=eos))
    ended = engine.generate([list(prompt[0])], SamplingParams(max_new_tokens=12, temperature=0))[0]
    first = free.tokens.index(eos)
    assert ended.finish_reason == "stop" and ended.tokens == free.tokens[: first + 1]
    assert ended.text == ByteTokenizer().decode(free.tokens[:first])  # EOS itself is not text
    ignored = engine.generate([list(prompt[0])], GREEDY)[0]
    assert ignored.tokens == free.tokens and ignored.finish_reason == "length"


def test_stop_strings_cut_the_text(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok)
    free = engine.generate_text(["ABC"], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = free.text[6:9]
    cut = engine.generate_text(["ABC"], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True,
                                                      stop=["never-there", stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    # Generation ended at the token that completed the stop string.
    assert cut.tokens == free.tokens[: free.text.find(stop) + len(stop)]


def test_stream_deltas_concatenate_to_generate(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok)
    free = engine.generate_text(["ABC"], SamplingParams(max_new_tokens=15, temperature=0, ignore_eos=True))[0]
    params = SamplingParams(max_new_tokens=15, temperature=0.9, seed=3, stop=[free.text[4:6]])
    prompts = [tok.encode(p) for p in ["ABC", "HELLO", "X"]]
    whole = engine.generate(prompts, params)
    streamed, tokens, reasons = ["", "", ""], [[], [], []], [None] * 3
    for deltas in engine.stream(prompts, params):
        for d in deltas:
            assert reasons[d.index] is None  # nothing after a row's final delta
            streamed[d.index] += d.text
            tokens[d.index] += d.tokens
            reasons[d.index] = d.finish_reason
    assert streamed == [c.text for c in whole]
    assert tokens == [c.tokens for c in whole]
    assert reasons == [c.finish_reason for c in whole]


def test_raw_byte_output_streams_as_whole_characters():
    """With a 256-byte vocabulary the random model emits invalid and partial UTF-8: streamed
    pieces never split a character, and they add up to a plain decode of the tokens."""
    torch.manual_seed(1)
    byte_model = Transformer(debug().model_copy(update={"vocab_size": 256, "init_std": 0.2})).eval()
    tok = ByteTokenizer(eos_id=255)
    engine = Engine(byte_model, tok)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=0, ignore_eos=True)
    prompts = [tok.encode(p) for p in ["é→", "wörld 🙂"]]
    streamed = ["", ""]
    for deltas in engine.stream(prompts, params):
        for d in deltas:
            streamed[d.index] += d.text
            if d.finish_reason is None:
                assert not d.text.endswith("\ufffd")  # an unfinished character is held back
    whole = engine.generate(prompts, params)
    assert streamed == [c.text for c in whole] == [tok.decode(c.tokens) for c in whole]
    assert any(t >= 128 for c in whole for t in c.tokens)


def test_text_stream_holds_partial_utf8_and_stop_prefixes():
    tok = ByteTokenizer()
    text = "héllo → wörld 🙂 end"
    ids = tok.encode(text)
    stream = _TextStream(tok, stops=[])
    pieces = [stream.push(t)[0] for t in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # "wör" is a prefix of the stop string "wörx": held back, then released when "l" rules it out.
    stream = _TextStream(tok, stops=["wörx"])
    released = "".join(stream.push(t)[0] for t in tok.encode("→ wör"))
    assert released == "→ "
    piece, hit = stream.push(ord("l"))
    assert not hit and released + piece == "→ wörl"
    # A stop string split across tokens: the token completing it reports the hit; text before it.
    stream = _TextStream(tok, stops=["ör"])
    out = [stream.push(t) for t in tok.encode("wör")]
    assert [hit for _, hit in out] == [False, False, False, True]
    assert "".join(p for p, _ in out) == "w"
    # A partial character still pending when the row ends is flushed as U+FFFD.
    stream = _TextStream(tok, stops=[])
    assert stream.push(0xF0) == ("", False) and stream.finish() == "\ufffd"


# --- refused requests ------------------------------------------------------------------------


def test_over_long_request_is_refused(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="context length"):
        engine.generate([[1] * 200], SamplingParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="context length"):
        engine.stream([[1] * 10, [1] * 250], SamplingParams(max_new_tokens=7))  # refused before next()


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                         ("min_p", 1.0), ("min_p", -0.1), ("top_k", -1),
                                         ("repetition_penalty", 0.0), ("max_new_tokens", 0)])
def test_invalid_params_name_the_field(model, field, value):
    with pytest.raises(ValueError, match=field):
        Engine(model).generate([[1, 2]], SamplingParams(**{field: value}))


def test_bad_prompts_and_missing_tokenizer_are_refused(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([[1, 2]], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([[1, VOCAB]], SamplingParams())


def test_cli_maps_bad_values_to_the_flag(capsys):
    from smolforge.cli import main

    assert main(["generate", "missing-dir", "--prompt", "hi", "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoding_equals_eager(model):
    cuda_model = Transformer(model.config).cuda().eval()
    cuda_model.load_state_dict(model.state_dict())
    free = Engine(cuda_model, cuda_graphs=False).generate(PROMPTS, GREEDY)
    stop = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[free[1].tokens[2]])
    for params in (GREEDY, stop):  # the second makes a row finish early: the graph is captured again
        eager = Engine(cuda_model, cuda_graphs=False).generate(PROMPTS, params)
        graphed = Engine(cuda_model, cuda_graphs=True).generate(PROMPTS, params)
        assert [c.tokens for c in graphed] == [c.tokens for c in eager]
        assert [c.finish_reason for c in graphed] == [c.finish_reason for c in eager]


# --- beam search -----------------------------------------------------------------------------------


def sequence_logprob(model: Transformer, prompt: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum().item()


def test_one_beam_is_greedy(model):
    out = Engine(model).beam_search(PROMPTS[0], num_beams=1, max_new_tokens=12, ignore_eos=True)
    assert out[0].tokens == naive_greedy(model, PROMPTS[0], 12)


def test_wide_beam_search_finds_the_exact_best_sequence():
    torch.manual_seed(1)
    tiny = Transformer(debug().model_copy(update={"vocab_size": 6, "init_std": 0.5})).eval()
    prompt = [1, 2]
    ids = torch.cartesian_prod(*[torch.arange(6)] * 3)  # all 216 continuations of 3 tokens
    with torch.no_grad():
        full = torch.cat([torch.tensor(prompt).expand(len(ids), 2), ids], dim=1)
        logprobs = tiny(full).logits[:, 1:-1].log_softmax(-1)
        totals = logprobs.gather(-1, full[:, 2:, None]).squeeze(-1).sum(-1)
    best = ids[totals.argmax()].tolist()
    out = Engine(tiny).beam_search(prompt, num_beams=36, max_new_tokens=3, length_penalty=0.0, ignore_eos=True)
    assert out[0].tokens == best
    scores = [sequence_logprob(tiny, prompt, c.tokens) for c in out]
    assert scores == sorted(scores, reverse=True) and len(out) == 36
    greedy = Engine(tiny).generate([prompt], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))[0]
    assert scores[0] >= sequence_logprob(tiny, prompt, greedy.tokens) - 1e-6


def test_beam_search_stops_at_stop_tokens(model):
    # Without length normalisation a sum of log-probs only falls as a hypothesis grows, so the
    # most likely first token, made a stop token, must end the best hypothesis at once.
    first = Engine(model).generate([PROMPTS[2]], SamplingParams(max_new_tokens=1, temperature=0))[0].tokens[0]
    out = Engine(model).beam_search(PROMPTS[2], num_beams=3, max_new_tokens=10, length_penalty=0.0,
                                    stop_token_ids=[first])
    assert out[0].tokens == [first] and out[0].finish_reason == "stop"
    with pytest.raises(ValueError, match="num_beams"):
        Engine(model).beam_search(PROMPTS[0], num_beams=0, max_new_tokens=4)


def test_cli_chat_renders_the_prompt_with_the_checkpoint_template(tmp_path, capsys):
    """--chat sends the prompt through the chat template (generation prompt included)."""
    import warnings

    from smolforge.chat.render import load_template, render_messages
    from smolforge.cli import main
    from smolforge.tokenizer import train_tokenizer
    from smolforge.train.checkpoint import save_checkpoint

    (tmp_path / "c.txt").write_text("hello there, what is 2 + 2? it is 4.\n" * 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = train_tokenizer([tmp_path / "c.txt"], vocab_size=384)
    torch.manual_seed(0)
    model = Transformer(debug().model_copy(update={"vocab_size": 384, "init_std": 0.2}))
    save_checkpoint(tmp_path / "plain", model, tok)
    assert main(["generate", str(tmp_path / "plain"), "--chat", "--prompt", "hi"]) == 2
    assert "no chat template" in capsys.readouterr().err
    tok.chat_template = load_template("smollm3")
    save_checkpoint(tmp_path / "chat", model, tok)
    args = ["generate", str(tmp_path / "chat"), "--chat", "--no-think", "--prompt", "what is 2 + 2?",
            "--temperature", "0", "--max-new-tokens", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    expected = render_messages(tok.chat_template, [{"role": "user", "content": "what is 2 + 2?"}],
                               add_generation_prompt=True, enable_thinking=False)
    assert out.startswith(expected) and expected.endswith("<think>\n\n</think>\n")
