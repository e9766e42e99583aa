"""Multiple-choice eval: record parsing and its errors, the cloze / MCF contexts, scoring on
hand-made log-likelihoods, batched log-likelihoods against an unbatched loop, and parity with a
plain `transformers` computation on the exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smolforge.engine import Engine
from smolforge.errors import SmolforgeError
from smolforge.eval import multiple_choice as mc
from smolforge.eval.core import EvalContext
from smolforge.model import Transformer, debug
from smolforge.train.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")

# First rows of ../shared/data/mc (see tests/data/mc/SOURCE.txt).
MC_DATA = Path(__file__).parent / "data" / "mc"


def tiny_model(vocab_size: int, max_seq_len: int = 1024) -> Transformer:
    # init_std 0.2: a model at the default init gives nearly uniform log-likelihoods, which would
    # hide a wrong split between context and continuation.
    torch.manual_seed(0)
    cfg = debug().model_copy(update={"vocab_size": vocab_size, "init_std": 0.2, "max_seq_len": max_seq_len})
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    return tiny_model(tokenizer.vocab_size)


def context(model, tokenizer, tmp_path, **options) -> EvalContext:
    return EvalContext(task=options.pop("task", "arc_easy"), model=model, tokenizer=tokenizer,
                       engine=Engine(model, tokenizer), checkpoint=tmp_path, out_dir=tmp_path,
                       batch_size=options.pop("batch_size", 8), limit=options.pop("limit", None), options=options)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- records and prompts ------------------------------------------------------------------------


def test_both_record_formats_parse():
    q = mc.parse_question({"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1}, "f.jsonl:1")
    assert (q.query, q.choices, q.gold) == ("Question: 2+2?", ["3", "4"], 1)
    h = mc.parse_question({"ctx": "He opens the door and", "endings": ["walks in.", "flies."], "label": "0"},
                          "f.jsonl:2")
    assert (h.query, h.choices, h.gold) == ("He opens the door and", ["walks in.", "flies."], 0)


@pytest.mark.parametrize("record, message", [
    ({"query": "Q", "choices": ["a", "b"]}, r"f.jsonl:3 field 'gold': missing"),
    ({"choices": ["a", "b"], "gold": 0}, r"f.jsonl:3 field 'query': missing"),
    ({"query": "Q", "choices": "a b", "gold": 0}, r"field 'choices': expected list"),
    ({"query": "Q", "choices": ["a"], "gold": 0}, r"field 'choices': needs at least 2"),
    ({"query": "Q", "choices": ["a", ""], "gold": 0}, r"field 'choices\[1\]': every choice"),
    ({"query": "Q", "choices": ["a", "b"], "gold": 2}, r"field 'gold': index 2 outside the 2 choices"),
    ({"query": "Q", "choices": ["a", "b"], "gold": True}, r"field 'gold': expected int or str"),
    ({"query": "  ", "choices": ["a", "b"], "gold": 0}, r"field 'query': empty question"),
    ({"ctx": "c", "endings": ["a", "b"], "label": "x"}, r"field 'label': expected a choice index"),
    ({"question": "Q", "answer": "A"}, r"f.jsonl:3: expected a multiple-choice record"),
])
def test_bad_records_name_file_line_and_field(record, message):
    with pytest.raises(SmolforgeError, match=message):
        mc.parse_question(record, "f.jsonl:3")


def test_contexts_follow_the_query_style():
    arc = mc.Question("Question: Which is a mammal? ", ["cat", "trout"], 0, "x")
    obqa = mc.Question("The sun is", ["hot", "cold"], 0, "x")
    assert mc.cloze_context(arc.query) == "Question: Which is a mammal?\nAnswer:"
    assert mc.cloze_context(obqa.query) == "The sun is"
    assert mc.mcf_context(arc) == "Question: Which is a mammal?\nA. cat\nB. trout\nAnswer:"
    assert mc.mcf_context(obqa) == "Question: The sun is\nA. hot\nB. cold\nAnswer:"
    assert mc.requests_for(arc, ["cloze", "mcf"]) == [
        ("Question: Which is a mammal?\nAnswer:", " cat"), ("Question: Which is a mammal?\nAnswer:", " trout"),
        (mc.mcf_context(arc), " A"), (mc.mcf_context(arc), " B")]


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(tokenizer):
    context_ids, continuation_ids = mc.encode_pair(tokenizer, "the quick brown ", "fox")
    assert context_ids == tokenizer.encode("the quick brown")
    assert context_ids + continuation_ids == tokenizer.encode("the quick brown fox")
    assert mc.encode_pair(tokenizer, "", "fox") == ([tokenizer.eos_id], tokenizer.encode("fox"))


# --- scoring ------------------------------------------------------------------------------------


def test_scores_on_hand_made_loglikelihoods():
    # Choice 1 has the largest total, choice 0 the largest per character (-6/12 > -4/3).
    q = mc.Question("Question: Q", ["a long answer", "abc", "zz"], gold=0, location="x")
    cloze, mcf = [-6.0, -4.0, -9.0], [-2.0, -1.0, -0.5]
    record = mc.score_question(q, cloze + mcf, ["cloze", "mcf"])
    assert record["cloze_acc_pred"] == 1 and record["cloze_acc_norm_pred"] == 0 and record["mcf_pred"] == 2
    assert record["correct"] == {"cloze_acc": False, "cloze_acc_norm": True, "cloze_acc_bytes": True,
                                 "mcf_acc": False}
    # Bytes differ from characters for non-ASCII text: "éé" is 2 characters, 4 bytes.
    q2 = mc.Question("Q", ["éé", "abc"], gold=1, location="x")
    record = mc.score_question(q2, [-2.2, -3.0], ["cloze"])
    assert record["cloze_acc_norm_pred"] == 1 and record["cloze_acc_bytes_pred"] == 0
    # Ties go to the first choice, as numpy's argmax.
    assert mc.score_question(q, [-1.0, -1.0, -2.0], ["mcf"])["mcf_pred"] == 0


def test_run_scores_every_question_with_the_given_loglikelihoods(model, tokenizer, tmp_path, monkeypatch):
    """Plumbing with a stub: shorter continuations are more likely, so cloze_acc picks the shortest
    choice and MCF always picks A; the metrics must equal those predictions' accuracy."""
    data = write_jsonl(tmp_path / "q.jsonl", [
        {"query": "Question: q1", "choices": ["bb", "a", "cccc"], "gold": 1},
        {"query": "Question: q2", "choices": ["a", "bbb"], "gold": 1},
        {"ctx": "The end", "endings": ["x", "yy", "zzz", "w"], "label": "0"},
    ])
    monkeypatch.setattr(mc, "loglikelihoods",
                        lambda model, tok, requests, batch_size: [(-float(len(c)), False) for _, c in requests])
    result = mc.run(context(model, tokenizer, tmp_path, data=str(data)))
    assert result.n == 3
    # cloze: shortest wins -> q1 picks 1 (right), q2 picks 0 (wrong), q3 picks 0 (first of the ties: right)
    assert result.metrics["cloze_acc"] == pytest.approx(2 / 3)
    # per character: -(len + 1) / len is largest for the longest choice -> 2, 1, 2 -> q2 right
    assert result.metrics["cloze_acc_norm"] == pytest.approx(1 / 3)
    assert result.metrics["mcf_acc"] == pytest.approx(1 / 3)  # " A" ties everywhere -> A; only q3 gold 0
    assert list(result.metrics)[0] == "cloze_acc_norm"
    assert any(n.startswith("chance 0.3") for n in result.notes)


@pytest.mark.parametrize("content, message", [
    ("", r"no examples \(the file is empty\)"),
    ('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n[1, 2]\n', r"q.jsonl:2: expected a JSON object"),
    ('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q"\n', r"q.jsonl:2: malformed JSON"),
])
def test_bad_files_give_clear_errors(content, message, model, tokenizer, tmp_path):
    (tmp_path / "q.jsonl").write_text(content)
    with pytest.raises(SmolforgeError, match=message):
        mc.run(context(model, tokenizer, tmp_path, data=str(tmp_path / "q.jsonl")))


def test_missing_data_and_unknown_format_are_errors(model, tokenizer, tmp_path):
    with pytest.raises(SmolforgeError, match="needs a data file"):
        mc.run(context(model, tokenizer, tmp_path))
    with pytest.raises(SmolforgeError, match="formats"):
        mc.run(context(model, tokenizer, tmp_path, data=str(MC_DATA / "piqa.jsonl"), formats="cloze,letters"))


# --- log-likelihoods --------------------------------------------------------------------------------


def naive_loglikelihood(model, tokenizer, context_text: str, continuation: str) -> tuple[float, bool]:
    """One request alone, no padding: sum of log-softmax at the continuation's positions."""
    context_ids, continuation_ids = mc.encode_pair(tokenizer, context_text, continuation)
    whole = (context_ids + continuation_ids)[-(model.config.max_seq_len + 1):]
    n = min(len(continuation_ids), len(whole) - 1)
    with torch.no_grad():
        logprobs = model(torch.tensor([whole[:-1]])).logits[0, -n:].double().log_softmax(-1)
    target = torch.tensor(whole[-n:])
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def arc_requests(limit: int = 6) -> list[tuple[str, str]]:
    lines = (MC_DATA / "arc_easy.jsonl").read_text().splitlines()[:limit]
    questions = [mc.parse_question(json.loads(line), "x") for line in lines]
    return [r for q in questions for r in mc.requests_for(q, mc.FORMATS)]


@pytest.mark.parametrize("max_seq_len", [1024, 48])  # 48: long requests keep their last tokens
def test_batched_loglikelihoods_equal_one_request_at_a_time(tokenizer, max_seq_len):
    model = tiny_model(tokenizer.vocab_size, max_seq_len)
    requests = arc_requests(3) + [("", "the lazy dog")]
    batched = mc.loglikelihoods(model, tokenizer, requests, batch_size=7)
    for (ctx_text, cont), (ll, greedy) in zip(requests, batched):
        ref_ll, ref_greedy = naive_loglikelihood(model, tokenizer, ctx_text, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    assert any(len(tokenizer.encode(c + x)) > max_seq_len for c, x in requests) == (max_seq_len == 48)


def test_greedy_flag_is_true_for_the_models_own_continuation(model, tokenizer):
    ids = tokenizer.encode("the quick brown")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    prompt = tokenizer.encode("the quick brown")
    continuation = tokenizer.decode(ids[len(prompt):])
    if tokenizer.encode("the quick brown" + continuation) != ids:
        pytest.fail("test setup: the greedy continuation does not re-encode to the same ids")
    (ll, greedy), = mc.loglikelihoods(model, tokenizer, [("the quick brown", continuation)])
    assert greedy and ll < 0


def test_loglikelihoods_match_transformers_on_the_exported_model(model, tokenizer, tmp_path):
    """The issue's parity check: the same log-likelihoods from plain transformers, its own
    tokenizer and one unpadded forward per request, within 1e-4."""
    directory = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    requests = arc_requests(3)
    ours = mc.loglikelihoods(model, tokenizer, requests, batch_size=5)
    worst = 0.0
    for (context_text, continuation), (ll, greedy) in zip(requests, ours):
        context_ids = hf_tokenizer(context_text, add_special_tokens=False)["input_ids"]
        whole = hf_tokenizer(context_text + continuation, add_special_tokens=False)["input_ids"]
        n = len(whole) - len(context_ids)
        with torch.no_grad():
            logits = hf_model(torch.tensor([whole])).logits[0, -n - 1:-1].double()
        target = torch.tensor(whole[-n:])
        logprobs = logits.log_softmax(-1)
        reference = float(logprobs.gather(-1, target[:, None]).sum())
        worst = max(worst, abs(ll - reference))
        assert greedy == bool((logprobs.argmax(-1) == target).all())
    assert worst <= 1e-4, worst
    assert not math.isclose(ours[0][0], ours[1][0])  # the choices really differ


def test_run_on_shared_sets_end_to_end(model, tokenizer, tmp_path):
    for name in ("arc_easy", "piqa", "openbook_qa"):
        result = mc.run(context(model, tokenizer, tmp_path, task=name, data=str(MC_DATA / f"{name}.jsonl"), limit=4))
        assert result.n == 4 and len(result.samples) == 4
        assert set(result.metrics) == {"cloze_acc", "cloze_acc_norm", "cloze_acc_bytes", "mcf_acc"}
        assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
        sample = result.samples[0]
        assert len(sample["cloze_loglikelihoods"]) == len(sample["choices"]) == len(sample["mcf_loglikelihoods"])
    only_mcf = mc.run(context(model, tokenizer, tmp_path, data=str(MC_DATA / "arc_easy.jsonl"), limit=3, formats=["mcf"]))
    assert list(only_mcf.metrics) == ["mcf_acc"]
