"""On-policy preference pairs scored by a grader: `smolforge pairs`.

The Smol Training Playbook (ch. 07) builds preference data either from strong/weak model pairs
or from on-policy samples scored by a grader; this is the second recipe. For every prompt the
policy itself samples N responses through the one engine, each response is scored by the
prompt's own checker (`data.synth.check_response`, the smol-tasks format), and a prompt where
some responses pass and some fail yields one pair: chosen = the first passing response, rejected
= the first failing one, in sampling order. Prompts where all N pass or all N fail teach nothing
about the difference and are skipped (counted in the summary). Only checkers grade for now; a
reward-model scorer may come later.

Grading, beyond the checker:
- When the chat template has reasoning modes (it reads `enable_thinking`, like smollm3), the
  response must also follow the prompt's mode (`thinking_honoured`): think mode needs non-empty
  reasoning, and no_think mode no reasoning — the latter too, because smollm3 drops reasoning in
  no_think mode, so such a response could never be rendered back as it was sampled.
- A response cut off by max_new_tokens fails: it never closed its turn, and as "chosen" it would
  teach the <|im_end|> the template appends but the model did not write.

Responses keep their reasoning: the `<think>...</think>` part moves to the assistant message's
`reasoning_content` (split exactly as smollm3.jinja splits inline reasoning), so the template
renders chosen and rejected back as the policy wrote them, up to the template's whitespace
(a template that never reads `reasoning_content`, like chatml, keeps the whole reply in `content`).

Output records (what `smolforge dpo` reads, `data.preference.to_pair`):
  {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message],
   "chat_template_kwargs": {...}, "check": {...}, optional "task"}
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smolforge.chat.render import load_template, render_messages
from smolforge.data.check import reasoning_mode
from smolforge.data.sources import iter_records
from smolforge.data.synth import check_response, thinking_honoured, write_jsonl
from smolforge.engine import InvalidSamplingParam, SamplingParams
from smolforge.errors import SmolforgeError

END_OF_TURN = "<|im_end|>"


@dataclass
class PairStats:
    """What `make_pairs` saw: prompts = pairs + all_passed + all_failed."""

    prompts: int = 0
    pairs: int = 0
    all_passed: int = 0
    all_failed: int = 0
    responses: int = 0
    passed: int = 0
    truncated: int = 0  # responses cut off at max_new_tokens (counted as failures)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.responses if self.responses else 0.0

    def summary(self, out: str | Path | None = None, n: int | None = None) -> str:
        per = f" x {n} responses" if n else ""
        dest = f" -> {out}" if out else ""
        return "\n".join([
            f"pairs: {self.prompts} prompts{per}",
            f"  pairs written  {self.pairs}{dest}",
            f"  all passed     {self.all_passed} (skipped)",
            f"  all failed     {self.all_failed} (skipped)",
            f"  pass rate      {100 * self.pass_rate:.1f}% ({self.passed}/{self.responses} responses; "
            f"{self.truncated} cut off at max_new_tokens)",
        ])


@dataclass
class _Prompt:
    messages: list[dict[str, Any]]
    kwargs: dict[str, Any]
    check: dict[str, Any]
    location: str
    task: Any = None  # carried into the pair, so pairs can be counted per task


def _prompt_of(record: Any, location: str) -> _Prompt:
    """The prompt of one record; bad fields raise naming the location and field."""
    if not isinstance(record, Mapping):
        raise SmolforgeError(f"{location}: expected a JSON object, got {type(record).__name__}")
    if "check" not in record:
        raise SmolforgeError(f"{location} field 'check': missing; every prompt needs a checker spec "
                             "(e.g. from `smolforge data synth`) to grade its responses (a reward-model "
                             "scorer is not supported yet)")
    check = record["check"]
    if not isinstance(check, dict):
        raise SmolforgeError(f"{location} field 'check': must be an object, got {type(check).__name__}")
    try:
        check_response(check, "")  # unknown types and missing fields fail here, not mid-sampling
    except SmolforgeError as exc:
        raise SmolforgeError(f"{location} field 'check': {exc}") from None
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise SmolforgeError(f"{location} field 'messages': must be a list of messages, "
                                 f"got {type(record['messages']).__name__}")
        messages = list(record["messages"])
        if messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # the reference answer: the policy writes its own
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        messages = [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("prompt"), list):
        messages = list(record["prompt"])
    else:
        raise SmolforgeError(f"{location} field 'messages': missing; expected 'messages' (a list of "
                             "messages) or 'prompt' (a non-empty string)")
    if not messages:
        raise SmolforgeError(f"{location} field 'messages': nothing is left to prompt with")
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SmolforgeError(f"{location} field 'chat_template_kwargs': must be an object, "
                             f"got {type(kwargs).__name__}")
    return _Prompt(messages, kwargs, check, location, record.get("task"))


def split_reasoning(reply: str, template: str | None = None) -> dict[str, Any]:
    """The assistant message of a reply: `<think>` reasoning in `reasoning_content`, the answer in
    `content`. Mirrors smollm3.jinja's own split of inline reasoning, so rendering the message
    gives back the reply (the template writes "<think>\\n{reasoning}\\n</think>\\n{content}").
    A `template` that never reads `reasoning_content` (chatml) would drop it: the reply then
    stays whole in `content`."""
    if "</think>" not in reply or (template is not None and "reasoning_content" not in template):
        return {"role": "assistant", "content": reply}
    reasoning = reply.split("</think>")[0].split("<think>")[-1].strip()
    message = {"role": "assistant", "content": reply.split("</think>")[-1].lstrip("\n")}
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def _check_n(n: int) -> None:
    if n < 2:
        raise SmolforgeError(f"--n must be at least 2 (a pair needs two responses), got {n}")


def _passes(prompt: _Prompt, reply: str, finish_reason: str, has_modes: bool) -> bool:
    if finish_reason == "length":
        return False
    if has_modes and not thinking_honoured(reply, reasoning_mode(prompt.messages, prompt.kwargs) == "think"):
        return False
    return check_response(prompt.check, reply)


def make_pairs(engine: Any, template: str, records: Sequence[Mapping[str, Any]], n: int,
               params: SamplingParams, seed: int, *, batch_size: int = 32,
               locations: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], PairStats]:
    """Preference pairs from `n` sampled responses per record, graded by each record's `check`.

    `engine` is an `Engine` (or anything with its `generate` and `tokenizer`); `params.seed` is
    replaced by seeds derived from `seed` and the batch, so the same seed and `batch_size` give
    the same pairs. `batch_size` counts responses per engine call (a prompt's n share a call).
    `locations` name the records in errors (default "record i").
    """
    _check_n(n)
    if params.temperature == 0:
        raise SmolforgeError("--temperature 0 samples the same response n times: no pair can form")
    tokenizer = engine.tokenizer
    names = list(locations) if locations is not None else [f"record {i}" for i in range(len(records))]
    prompts = [_prompt_of(r, loc) for r, loc in zip(records, names)]
    stop = tokenizer.token_to_id(END_OF_TURN)
    if stop is None:
        warnings.warn(f"the tokenizer has no {END_OF_TURN} token: responses stop only at EOS",
                      stacklevel=2)
    params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids,
                                                         *([] if stop is None else [stop])])
    has_modes = "enable_thinking" in template  # as `data check` decides it
    stats, pairs = PairStats(prompts=len(prompts)), []
    per_call = max(1, batch_size // n)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        ids = []
        for p in chunk:
            try:
                text = render_messages(template, p.messages, add_generation_prompt=True, **p.kwargs)
            except SmolforgeError as exc:
                raise SmolforgeError(f"{p.location} {exc}") from None
            ids.append(tokenizer.encode(text))
        # One seed per call from (seed, first prompt): chunks differ, reruns repeat.
        call_seed = int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
        try:
            completions = engine.generate([i for i in ids for _ in range(n)],
                                          dataclasses.replace(params, seed=call_seed))
        except ValueError as exc:  # e.g. a prompt + max_new_tokens beyond the context length
            longest = chunk[max(range(len(chunk)), key=lambda k: len(ids[k]))].location
            raise SmolforgeError(f"{longest}: {exc} (--max-new-tokens)") from None
        for k, p in enumerate(chunk):
            samples = completions[k * n:(k + 1) * n]
            grades = [_passes(p, c.text or "", c.finish_reason, has_modes) for c in samples]
            stats.responses += n
            stats.passed += sum(grades)
            stats.truncated += sum(c.finish_reason == "length" for c in samples)
            if all(grades):
                stats.all_passed += 1
                continue
            if not any(grades):
                stats.all_failed += 1
                continue
            chosen, rejected = samples[grades.index(True)], samples[grades.index(False)]
            pair = {"prompt": p.messages, "chosen": [split_reasoning(chosen.text or "", template)],
                    "rejected": [split_reasoning(rejected.text or "", template)],
                    "chat_template_kwargs": p.kwargs, "check": p.check}
            if p.task is not None:
                pair["task"] = p.task
            pairs.append(pair)
    stats.pairs = len(pairs)
    return pairs, stats


# --- CLI ---------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pairs", help="Build on-policy preference pairs: sample N responses, grade them with checkers.",
        description="Sample N responses per prompt with the checkpoint's chat template, grade each with "
                    "the prompt's 'check' (the smol-tasks checker format; in templates with reasoning "
                    "modes the response must also follow /think or /no_think; a response cut off at "
                    "--max-new-tokens fails), and write chosen = first passing, rejected = first failing "
                    "response as JSONL for `smolforge dpo`. Prompts whose N responses all pass or all fail "
                    "are skipped. Only checkers grade for now (a reward-model scorer may come later).")
    parser.add_argument("checkpoint", help="Policy checkpoint directory; its tokenizer must carry a chat template.")
    parser.add_argument("--prompts", required=True,
                        help="JSONL of records with 'messages' (a final assistant message is the reference "
                             "answer and is dropped) or 'prompt' (string), optional 'chat_template_kwargs', "
                             "and a required 'check' spec (e.g. from `smolforge data synth`).")
    parser.add_argument("--n", type=int, default=4, help="Responses sampled per prompt (>= 2). Default: 4.")
    parser.add_argument("--out", required=True, help="Output .jsonl of pairs, written atomically.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature (> 0). Default: 0.8.")
    parser.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling mass; 1 = off. Default: 0.95.")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Most tokens per response. Default: 96.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Sampling seed; the same seed and --batch-size write the same file. Default: 0.")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="Responses generated per engine call (a prompt's N share one call). Default: 32.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda when available.")
    parser.set_defaults(func=_pairs_command)


def _read_prompts(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.is_file():
        raise SmolforgeError(f"--prompts {path}: no such file")
    records, locations = [], []
    for location, record in iter_records(path):
        _prompt_of(record, location)  # every record checked before the model is loaded
        records.append(record)
        locations.append(location)
    if not records:
        raise SmolforgeError(f"--prompts {path}: no records")
    return records, locations


def _pairs_command(args: argparse.Namespace) -> int:
    import torch

    from smolforge.engine import Engine
    from smolforge.train.checkpoint import load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SmolforgeError(f"{out} already exists; pass --overwrite to replace it")
    _check_n(args.n)
    if args.batch_size < 1:
        raise SmolforgeError(f"--batch-size must be at least 1, got {args.batch_size}")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p)
    try:
        params.validate()
    except InvalidSamplingParam as exc:
        raise SmolforgeError(f"--{exc.field.replace('_', '-')}: {exc}") from None
    records, locations = _read_prompts(Path(args.prompts))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.checkpoint, device=device)
    if not tokenizer.chat_template:
        raise SmolforgeError(f"{args.checkpoint}: the tokenizer has no chat template; pairs are sampled "
                             "through it (train the checkpoint with `smolforge sft`, or use one that ships one)")
    template = load_template("tokenizer", tokenizer)
    model.eval()
    pairs, stats = make_pairs(Engine(model, tokenizer), template, records, args.n, params, args.seed,
                              batch_size=args.batch_size, locations=locations)
    write_jsonl(pairs, out)
    print(stats.summary(out, args.n))
    return 0
