"""On-policy preference pairs scored by a grader: `smolforge pairs`.

The Smol Training Playbook (ch. 07) builds preference data either from strong/weak model pairs
or from on-policy samples scored by a grader; this is the second recipe. For every prompt the
policy itself samples N responses through the one engine and a grader scores them. Two graders:

Checkers (the default). Each response is graded pass/fail by the prompt's own checker
(`data.synth.check_response`, the smol-tasks format), and a prompt where some responses pass and
some fail yields one pair: chosen = the first passing response, rejected = the first failing
one, in sampling order. Prompts where all N pass or all N fail teach nothing about the
difference and are skipped (counted in the summary). Beyond the checker:
- When the chat template has reasoning modes (it reads `enable_thinking`, like smollm3), the
  response must also follow the prompt's mode (`thinking_honoured`): think mode needs non-empty
  reasoning, and no_think mode no reasoning — the latter too, because smollm3 drops reasoning in
  no_think mode, so such a response could never be rendered back as it was sampled.
- A response cut off by max_new_tokens fails: it never closed its turn, and as "chosen" it would
  teach the <|im_end|> the template appends but the model did not write.

Rewards (`rewards=`, `--reward`). The weighted rewards of GRPO's registry (`train.rewards`:
verifiable ones such as smol_task, ifeval, gsm8k, think_format, or a trained reward model) score
each response; chosen = the highest-scoring response, rejected = the lowest (the first of equals,
in sampling order): the best-vs-worst of N pairs of online iterative DPO (Dong et al. 2024,
"RLHF Workflow", arXiv:2405.07863), where the widest gap gives the clearest signal. A response
cut off by max_new_tokens ranks below every complete one whatever its score, for the reason
above: it is never chosen, and is the rejected one whenever the prompt has one. Otherwise a
prompt whose best and worst responses tie, or differ by less than `min_margin`, is skipped
(counted as a tie); a prompt with no complete response is skipped too. Records are checked up front for the fields the
rewards read (the registry's `fields`: `check`, `constraints`, `answer`), as `smolforge grpo`
reads its prompts (`data.rl.to_rl_prompt`, IFEval rows included).

Responses keep their reasoning: the `<think>...</think>` part moves to the assistant message's
`reasoning_content` (split exactly as smollm3.jinja splits inline reasoning), so the template
renders chosen and rejected back as the policy wrote them, up to the template's whitespace
(a template that never reads `reasoning_content`, like chatml, keeps the whole reply in `content`).

Output records (what `smolforge dpo` reads, `data.preference.to_pair`):
  {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message],
   "chat_template_kwargs": {...}, "check": {...}, optional "task"}
and, scored by rewards, instead of "check" the record fields the rewards read, and
  "chosen_score", "rejected_score" (the weighted sums), "rejected_truncated" (bool)
are added, so pairs can be filtered by margin later (the name `margin` is left alone: it is the
per-pair Bradley-Terry margin that `smolforge reward` reads).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smolforge.chat.render import load_template, render_messages
from smolforge.data.check import reasoning_mode
from smolforge.data.sources import iter_records
from smolforge.data.synth import check_response, thinking_honoured, write_jsonl
from smolforge.engine import InvalidSamplingParam, SamplingParams
from smolforge.errors import SmolforgeError

if TYPE_CHECKING:
    from smolforge.train.rewards import RewardSet

END_OF_TURN = "<|im_end|>"


@dataclass
class PairStats:
    """What `make_pairs` saw. Graded by checkers: prompts = pairs + all_passed + all_failed;
    scored by rewards (`scored_by` set): prompts = pairs + ties + all_cut_off."""

    prompts: int = 0
    pairs: int = 0
    all_passed: int = 0
    all_failed: int = 0
    responses: int = 0
    passed: int = 0
    truncated: int = 0  # responses cut off at max_new_tokens (failures; scored: the lowest rank)
    # scored by rewards only:
    scored_by: str = ""  # the weighted rewards, e.g. "1 x ifeval + 0.5 x think_format"
    min_margin: float = 0.0
    ties: int = 0  # skipped: best and worst complete responses within min_margin (or equal)
    all_cut_off: int = 0  # skipped: no complete response to choose
    score_sum: float = 0.0  # over the complete responses
    margin_sum: float = 0.0  # chosen - rejected score, over the pairs of two complete responses
    margin_pairs: int = 0  # pairs whose rejected response is complete (the rest reject a cut-off one)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.responses if self.responses else 0.0

    @property
    def mean_margin(self) -> float:
        return self.margin_sum / self.margin_pairs if self.margin_pairs else 0.0

    @property
    def mean_score(self) -> float:
        complete = self.responses - self.truncated
        return self.score_sum / complete if complete else 0.0

    def summary(self, out: str | Path | None = None, n: int | None = None) -> str:
        per = f" x {n} responses" if n else ""
        dest = f" -> {out}" if out else ""
        if self.scored_by:
            cut = self.pairs - self.margin_pairs
            return "\n".join([
                f"pairs: {self.prompts} prompts{per}, scored by {self.scored_by}",
                f"  pairs written  {self.pairs}{dest}",
                f"  ties           {self.ties} (skipped: best - worst score < {self.min_margin:g} or equal)",
                f"  all cut off    {self.all_cut_off} (skipped)",
                f"  mean margin    {self.mean_margin:.4g} (chosen - rejected score, {self.margin_pairs} pairs; "
                f"{cut} more reject a reply cut off at max_new_tokens)",
                f"  mean score     {self.mean_score:.4g} ({self.responses - self.truncated}/{self.responses} "
                f"responses complete; {self.truncated} cut off at max_new_tokens)",
            ])
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
    check: dict[str, Any] | None  # None when rewards score the responses
    location: str
    task: Any = None  # carried into the pair, so pairs can be counted per task
    sample: dict[str, Any] | None = None  # the record as the rewards see it (`data.rl.RLPrompt.sample`)


def _prompt_of(record: Any, location: str) -> _Prompt:
    """The prompt of one record; bad fields raise naming the location and field."""
    if not isinstance(record, Mapping):
        raise SmolforgeError(f"{location}: expected a JSON object, got {type(record).__name__}")
    if "check" not in record:
        raise SmolforgeError(f"{location} field 'check': missing; every prompt needs a checker spec "
                             "(e.g. from `smolforge data synth`) to grade its responses, unless rewards "
                             "score them (--reward: ifeval, gsm8k, a reward-model, ...)")
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


def _scored_prompt(record: Any, location: str, rewards: RewardSet) -> _Prompt:
    """The prompt of one record scored by `rewards`: read as `smolforge grpo` reads its prompts,
    so the rewards' fields are checked (missing or malformed ones raise naming location and field)."""
    from smolforge.data.rl import to_rl_prompt

    prompt = to_rl_prompt(record, location, rewards)
    return _Prompt(prompt.messages, prompt.sample["chat_template_kwargs"], None, location,
                   prompt.sample.get("task"), prompt.sample)


def read_prompt(record: Any, location: str, rewards: RewardSet | None = None) -> _Prompt:
    """One record's prompt, graded by its checker (`rewards` None) or scored by `rewards`."""
    return _prompt_of(record, location) if rewards is None else _scored_prompt(record, location, rewards)


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


def _check_margin(min_margin: float) -> None:
    if not math.isfinite(min_margin) or min_margin < 0:
        raise SmolforgeError(f"--min-margin must be a finite number >= 0, got {min_margin}")


def _tie(best: float, worst: float, min_margin: float) -> bool:
    # isclose: weighted sums of equal rewards can differ in the last bits (0.1 + 0.2 vs 0.3)
    return math.isclose(best, worst, rel_tol=1e-9, abs_tol=1e-12) or best - worst < min_margin


def _pair(p: _Prompt, chosen: Any, rejected: Any, template: str) -> dict[str, Any]:
    pair = {"prompt": p.messages, "chosen": [split_reasoning(chosen.text or "", template)],
            "rejected": [split_reasoning(rejected.text or "", template)], "chat_template_kwargs": p.kwargs}
    if p.check is not None:
        pair["check"] = p.check
    return pair


def _graded_pairs(chunk: Sequence[_Prompt], completions: Sequence[Any], n: int, template: str,
                  stats: PairStats) -> list[dict[str, Any]]:
    """Checker grading: chosen = first passing, rejected = first failing response."""
    has_modes = "enable_thinking" in template  # as `data check` decides it
    pairs = []
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
        pair = _pair(p, samples[grades.index(True)], samples[grades.index(False)], template)
        if p.task is not None:
            pair["task"] = p.task
        pairs.append(pair)
    return pairs


def _scored_pairs(chunk: Sequence[_Prompt], texts: Sequence[str], completions: Sequence[Any], n: int,
                  template: str, rewards: RewardSet, min_margin: float, stats: PairStats) -> list[dict[str, Any]]:
    """Reward scoring: chosen = best, rejected = worst response; cut-off responses rank lowest."""
    from smolforge.chat.reasoning import prompt_opens_think
    from smolforge.train.rewards import Reply

    rows = [(p, text) for p, text in zip(chunk, texts) for _ in range(n)]
    replies = [Reply(c.text or "", tuple(c.tokens), c.finish_reason == "length", prompt_opens_think(text))
               for (_, text), c in zip(rows, completions)]
    # One call for the whole chunk: a reward model scores it in its own batches, loaded once.
    totals, _ = rewards([text for _, text in rows], replies, [p.sample or {} for p, _ in rows])
    pairs = []
    for k, p in enumerate(chunk):
        group = range(k * n, (k + 1) * n)
        complete = [i for i in group if not replies[i].truncated]
        stats.responses += n
        stats.truncated += n - len(complete)
        stats.score_sum += sum(totals[i] for i in complete)
        if not complete:
            stats.all_cut_off += 1
            continue
        chosen = max(complete, key=lambda i: totals[i])  # the first of equal scores, in sampling order
        cut = [i for i in group if replies[i].truncated]
        rejected = min(cut or complete, key=lambda i: totals[i])
        if not cut:
            if _tie(totals[chosen], totals[rejected], min_margin):
                stats.ties += 1
                continue
            stats.margin_sum += totals[chosen] - totals[rejected]
            stats.margin_pairs += 1
        pair = _pair(p, completions[chosen], completions[rejected], template)
        pair.update({f: p.sample[f] for f in rewards.fields if p.sample and f in p.sample})
        pair.update({"chosen_score": totals[chosen], "rejected_score": totals[rejected],
                     "rejected_truncated": bool(cut)})
        if p.task is not None:
            pair["task"] = p.task
        pairs.append(pair)
    return pairs


def make_pairs(engine: Any, template: str, records: Sequence[Mapping[str, Any]], n: int,
               params: SamplingParams, seed: int, *, batch_size: int = 32,
               locations: Sequence[str] | None = None, rewards: RewardSet | None = None,
               min_margin: float = 0.0) -> tuple[list[dict[str, Any]], PairStats]:
    """Preference pairs from `n` sampled responses per record, graded by each record's `check`,
    or, given `rewards` (`train.rewards.build_rewards`), scored by them: chosen = the best,
    rejected = the worst response, skipping prompts whose best and worst differ by less than
    `min_margin` (ties always).

    `engine` is an `Engine` (or anything with its `generate` and `tokenizer`); `params.seed` is
    replaced by seeds derived from `seed` and the batch, so the same seed and `batch_size` give
    the same pairs. `batch_size` counts responses per engine call (a prompt's n share a call).
    `locations` name the records in errors (default "record i").
    """
    _check_n(n)
    _check_margin(min_margin)
    if params.temperature == 0:
        raise SmolforgeError("--temperature 0 samples the same response n times: no pair can form")
    tokenizer = engine.tokenizer
    names = list(locations) if locations is not None else [f"record {i}" for i in range(len(records))]
    prompts = [read_prompt(r, loc, rewards) for r, loc in zip(records, names)]
    stop = tokenizer.token_to_id(END_OF_TURN)
    if stop is None:
        warnings.warn(f"the tokenizer has no {END_OF_TURN} token: responses stop only at EOS",
                      stacklevel=2)
    params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids,
                                                         *([] if stop is None else [stop])])
    stats, pairs = PairStats(prompts=len(prompts)), []
    if rewards is not None:
        stats.scored_by = " + ".join(f"{b.weight:g} x {b.label}" for b in rewards.rewards)
        stats.min_margin = min_margin
    per_call = max(1, batch_size // n)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        texts = []
        for p in chunk:
            try:
                texts.append(render_messages(template, p.messages, add_generation_prompt=True, **p.kwargs))
            except SmolforgeError as exc:
                raise SmolforgeError(f"{p.location} {exc}") from None
        ids = [tokenizer.encode(text) for text in texts]
        # One seed per call from (seed, first prompt): chunks differ, reruns repeat.
        call_seed = int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
        try:
            completions = engine.generate([i for i in ids for _ in range(n)],
                                          dataclasses.replace(params, seed=call_seed))
        except ValueError as exc:  # e.g. a prompt + max_new_tokens beyond the context length
            longest = chunk[max(range(len(chunk)), key=lambda k: len(ids[k]))].location
            raise SmolforgeError(f"{longest}: {exc} (--max-new-tokens)") from None
        if rewards is None:
            pairs += _graded_pairs(chunk, completions, n, template, stats)
        else:
            pairs += _scored_pairs(chunk, texts, completions, n, template, rewards, min_margin, stats)
    stats.pairs = len(pairs)
    return pairs, stats


# --- CLI ---------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pairs", help="Build on-policy preference pairs: sample N responses, grade them with checkers or rewards.",
        description="Sample N responses per prompt with the checkpoint's chat template and write one "
                    "chosen/rejected pair per prompt as JSONL for `smolforge dpo`. By default each response "
                    "is graded pass/fail by the prompt's 'check' (the smol-tasks checker format; in templates "
                    "with reasoning modes the response must also follow /think or /no_think; a response cut "
                    "off at --max-new-tokens fails): chosen = first passing, rejected = first failing "
                    "response; prompts whose N responses all pass or all fail are skipped. With --reward, "
                    "the weighted rewards of `smolforge grpo` score each response instead (verifiable ones "
                    "such as ifeval or gsm8k, or a reward-model trained by `smolforge reward`): chosen = "
                    "highest, rejected = lowest score; prompts whose best and worst differ by less than "
                    "--min-margin, or tie, are skipped, and the scores are written into each pair "
                    "(chosen_score, rejected_score).")
    parser.add_argument("checkpoint", help="Policy checkpoint directory; its tokenizer must carry a chat template.")
    parser.add_argument("--prompts", required=True,
                        help="JSONL of records with 'messages' (a final assistant message is the reference "
                             "answer and is dropped) or 'prompt' (string), optional 'chat_template_kwargs', "
                             "and a 'check' spec (e.g. from `smolforge data synth`); with --reward, the fields "
                             "the rewards read instead ('check' for smol_task, 'constraints' for ifeval, "
                             "'answer' for gsm8k; IFEval rows work as they are).")
    parser.add_argument("--reward", action="append", default=[], metavar="SPEC",
                        help="Score responses with this reward instead of the checkers; repeat to add rewards, "
                             "summed with their weights. SPEC is a reward name (smol_task, ifeval, gsm8k, "
                             "think_format, length, overlong, contains) or a YAML mapping / list as in "
                             "grpo.rewards, e.g. '{name: ifeval, weight: 1}' or "
                             "'{name: reward_model, path: runs/rm/final}' (loaded once, scores in batches). "
                             "Responses cut off at --max-new-tokens rank lowest whatever their score: never "
                             "chosen, and rejected whenever a prompt has one. Mode following is not checked "
                             "unless think_format is one of the rewards.")
    parser.add_argument("--min-margin", type=float, default=0.0,
                        help="With --reward: skip prompts whose best and worst complete responses differ by "
                             "less than this (ties are always skipped). Default: 0.")
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


def parse_reward_specs(values: Sequence[str]) -> list[dict[str, Any]]:
    """The reward specs of repeated `--reward` values: names, YAML mappings, or YAML lists of either."""
    import yaml

    specs: list[dict[str, Any]] = []
    for value in values:
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SmolforgeError(f"--reward {value!r}: not valid YAML ({str(exc).splitlines()[0]})") from None
        for item in parsed if isinstance(parsed, list) else [parsed]:
            where = f"--reward[{len(specs)}]"
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict):
                raise SmolforgeError(f"{where}: expected a reward name or a mapping {{name: ..., weight: ..., "
                                     f"options}}, got {item!r}")
            if not isinstance(item.get("name"), str):
                raise SmolforgeError(f"{where}.name: missing; every reward needs a name")
            specs.append(dict(item))
    return specs


def _read_prompts(path: Path, rewards: RewardSet | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.is_file():
        raise SmolforgeError(f"--prompts {path}: no such file")
    records, locations = [], []
    for location, record in iter_records(path):
        read_prompt(record, location, rewards)  # every record checked before the policy is loaded
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
    _check_margin(args.min_margin)
    if args.min_margin and not args.reward:
        raise SmolforgeError("--min-margin compares reward scores: it needs --reward")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards = None
    if args.reward:
        from smolforge.train.rewards import build_rewards

        # length/overlong default to the generation budget, a reward model to the policy's device
        rewards = build_rewards(parse_reward_specs(args.reward), section="--reward",
                                defaults={"max_len": args.max_new_tokens, "device": device})
    records, locations = _read_prompts(Path(args.prompts), rewards)
    model, tokenizer = load_model(args.checkpoint, device=device)
    if not tokenizer.chat_template:
        raise SmolforgeError(f"{args.checkpoint}: the tokenizer has no chat template; pairs are sampled "
                             "through it (train the checkpoint with `smolforge sft`, or use one that ships one)")
    template = load_template("tokenizer", tokenizer)
    model.eval()
    pairs, stats = make_pairs(Engine(model, tokenizer), template, records, args.n, params, args.seed,
                              batch_size=args.batch_size, locations=locations, rewards=rewards,
                              min_margin=args.min_margin)
    write_jsonl(pairs, out)
    print(stats.summary(out, args.n))
    return 0
