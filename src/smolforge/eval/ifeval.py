"""IFEval: does the model follow verifiable formatting instructions? (Zhou et al. 2023,
arXiv:2311.07911; the playbook's instruction-following eval for post-trained models.)

Each of the 541 prompts carries one to three instructions a program can check ("answer in
fewer than 40 words", "wrap the whole response in double quotes", ...); the checkers live in
`ifeval_checks`. Four scores, as in the paper (sec. 2.2) and lm-evaluation-harness:

- prompt-level: the share of prompts whose every instruction is followed;
- instruction-level: the share of all instructions followed;
- strict: the response as generated; loose: the response also passes when one of its loose
  variants does (first and/or last line removed, `*` markup removed), which forgives a
  "Sure, here it is:" preamble a strict reading would fail on.

`prompt_level_strict_acc` is the headline. Responses are greedy decodes of the prompt as a user
turn under the checkpoint's chat template (plain text without one), scored with the `<think>`
block removed. Prompts that do not fit the context with the generation budget keep their last
tokens, as lm-eval truncates them; a note counts them. The prompts ship with the package
(Apache-2.0, google-research/instruction_following_eval), so `--tasks ifeval` needs no `--data`;
`--data ifeval=FILE` reads any file of the same rows (JSONL, JSON or Parquet, such as the
Hugging Face copy whose unused kwargs are null).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolforge.chat.reasoning import prompt_opens_think, split_reasoning
from smolforge.chat.render import end_of_turn_ids
from smolforge.engine import SamplingParams
from smolforge.errors import SmolforgeError, where
from smolforge.eval.core import EvalContext, TaskResult, field_of, generate_fitted, read_examples
from smolforge.eval.ifeval_checks import (
    CHECKERS,
    InvalidArgument,
    check_arguments,
    follows,
    follows_loosely,
)

BUNDLED_DATA = Path(__file__).parent / "data" / "ifeval_input_data.jsonl"
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
           "inst_level_loose_acc")


@dataclass(frozen=True)
class IFEvalPrompt:
    key: Any  # an int in the official data; the row's position when absent
    prompt: str
    instruction_ids: tuple[str, ...]
    arguments: tuple[dict[str, Any], ...]  # checked kwargs, one dict per instruction


def parse_prompt(record: dict[str, Any], location: str, index: int) -> IFEvalPrompt:
    """One row of the data file; errors name the file, line and field."""
    prompt = field_of(record, location, "prompt", str)
    if not prompt.strip():
        raise SmolforgeError(f"{where(location, field='prompt')}: empty")
    ids = field_of(record, location, "instruction_id_list", list)
    kwargs = field_of(record, location, "kwargs", list)
    if not ids:
        raise SmolforgeError(f"{where(location, field='instruction_id_list')}: empty (a prompt needs at "
                             "least one instruction to check)")
    if len(ids) != len(kwargs):
        raise SmolforgeError(f"{where(location, field='kwargs')}: {len(kwargs)} entries for {len(ids)} "
                             "instructions (one dict per entry of instruction_id_list)")
    arguments = []
    for i, (instruction_id, given) in enumerate(zip(ids, kwargs)):
        if instruction_id not in CHECKERS:
            raise SmolforgeError(f"{where(location, field=f'instruction_id_list[{i}]')}: unknown "
                                 f"instruction {instruction_id!r}; known: {', '.join(CHECKERS)}")
        if not isinstance(given, dict):
            raise SmolforgeError(f"{where(location, field=f'kwargs[{i}]')}: expected an object, "
                                 f"got {type(given).__name__}")
        try:
            arguments.append(check_arguments(instruction_id, given))
        except InvalidArgument as exc:
            raise SmolforgeError(f"{where(location, field=f'kwargs[{i}].{exc.name}')}: {exc}") from None
    return IFEvalPrompt(record.get("key", index), prompt, tuple(ids), tuple(arguments))


def load_prompts(path: Path) -> list[IFEvalPrompt]:
    """Every row of an IFEval data file, checked before any generation starts."""
    return [parse_prompt(record, location, i) for i, (location, record) in enumerate(read_examples(path))]


def judge(prompt: IFEvalPrompt, response: str) -> dict[str, Any]:
    """The per-instruction strict and loose verdicts on one response, and the prompt-level ones."""
    pairs = list(zip(prompt.instruction_ids, prompt.arguments))
    strict = [follows(i, args, response) for i, args in pairs]
    loose = [follows_loosely(i, args, response) for i, args in pairs]
    return {"strict": strict, "loose": loose, "prompt_strict": all(strict), "prompt_loose": all(loose)}


def ifeval_metrics(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The four accuracies over judged samples (lm-eval's mean and flattened `agg_inst_level_acc`)."""
    if not samples:
        raise ValueError("no samples to score")
    strict = [v for s in samples for v in s["strict"]]
    loose = [v for s in samples for v in s["loose"]]
    return {
        "prompt_level_strict_acc": sum(s["prompt_strict"] for s in samples) / len(samples),
        "inst_level_strict_acc": sum(strict) / len(strict),
        "prompt_level_loose_acc": sum(s["prompt_loose"] for s in samples) / len(samples),
        "inst_level_loose_acc": sum(loose) / len(loose),
    }


def accuracy_by_instruction(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{instruction id: {"strict", "loose", "n"}}: where a model fails, type by type."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for sample in samples:
        for instruction_id, strict, loose in zip(sample["instruction_id_list"], sample["strict"], sample["loose"]):
            counts[instruction_id][0] += strict
            counts[instruction_id][1] += loose
            counts[instruction_id][2] += 1
    return {i: {"strict": s / n, "loose": lo / n, "n": n} for i, (s, lo, n) in sorted(counts.items())}


# ---- generation ----------------------------------------------------------------------------------


def _prompt_text(ctx: EvalContext, prompt: str) -> str:
    """The prompt as a user turn with the generation prompt, or as is for a base model."""
    template = getattr(ctx.tokenizer, "chat_template", None)
    if not template:
        return prompt
    from smolforge.chat.render import render_messages

    variables = ctx.option("chat_template_kwargs") or {}
    if not isinstance(variables, dict):
        raise SmolforgeError(f"ifeval option 'chat_template_kwargs': expected a mapping of template variables "
                             f"(e.g. {{enable_thinking: false}}), got {variables!r}")
    return render_messages(template, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                           **variables)


def generate_responses(ctx: EvalContext, prompts: Sequence[str], draw: int = 0) -> list[dict[str, Any]]:
    """{"output", "response", "truncated"} per prompt: the raw generation, the part scored (no
    `<think>` block), and whether the prompt lost its first tokens to fit the context."""
    texts = [_prompt_text(ctx, p) for p in prompts]
    room = ctx.model.config.max_seq_len - ctx.max_new_tokens
    if room < 1:
        raise SmolforgeError(f"max_new_tokens ({ctx.max_new_tokens}) leaves no room for the prompt in the "
                             f"model's context of {ctx.model.config.max_seq_len} tokens: lower --max-new-tokens")
    ids = [ctx.tokenizer.encode(t) for t in texts]
    truncated = [len(x) > room for x in ids]
    ids = [x[-room:] for x in ids]  # lm-eval keeps the end of a long prompt, where the instructions are
    stop = end_of_turn_ids(ctx.tokenizer)
    sampled = ctx.samples > 1
    params = SamplingParams(max_new_tokens=ctx.max_new_tokens, temperature=ctx.temperature if sampled else 0.0,
                            stop_token_ids=stop, seed=ctx.seed + draw if sampled else None)
    outputs = [c.text or "" if c is not None else "" for c in generate_fitted(ctx.engine, ids, params, ctx.batch_size)]
    return [{"output": out, "response": split_reasoning(out, in_think=prompt_opens_think(text))[1],
             "truncated": cut} for out, text, cut in zip(outputs, texts, truncated)]


def run(ctx: EvalContext) -> TaskResult:
    """Generate a response to every prompt (`ctx.samples` times), judge it, and score."""
    start = time.perf_counter()
    path = ctx.data_path(default=BUNDLED_DATA)
    prompts = ctx.take(load_prompts(path))
    samples = []
    for draw in range(ctx.samples):
        for prompt, generated in zip(prompts, generate_responses(ctx, [p.prompt for p in prompts], draw)):
            samples.append({"key": prompt.key, "draw": draw, "prompt": prompt.prompt,
                            "instruction_id_list": list(prompt.instruction_ids),
                            "kwargs": list(prompt.arguments), **generated, **judge(prompt, generated["response"])})
    notes = [f"avg@{ctx.samples}"] if ctx.samples > 1 else []
    cut = sum(s["truncated"] for s in samples if s["draw"] == 0)
    if cut:
        notes.append(f"{cut} prompt(s) longer than the context minus max_new_tokens: their first tokens "
                     "were cut (see 'truncated' in the samples)")
    weakest = sorted(accuracy_by_instruction(samples).items(), key=lambda item: item[1]["strict"])[:3]
    notes.append("weakest instructions (strict acc): " + ", ".join(
        f"{i} {a['strict']:.2f} (n={a['n']})" for i, a in weakest))
    return TaskResult(ctx.task, ifeval_metrics(samples), n=len(prompts), seconds=time.perf_counter() - start,
                      samples=samples, notes=notes)
