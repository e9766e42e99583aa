"""Online RL data: prompts read from files, and rollouts the live policy writes for them.

Records (DESIGN.md "RL prompts"), one per line of .jsonl (or .json / .parquet):
  {"prompt": "..." | [messages]}  or  {"messages": [messages]}
  + optional "chat_template_kwargs", "answer" (GSM8K-style), "check" (a smol-task checker spec),
    "constraints" ([{id, kwargs}], IFEval instructions), and any other field a reward reads.
A `messages` list that ends with an assistant turn (an SFT record, e.g. from `smolforge data
synth`) has that turn dropped: it is the reference answer, and the policy writes its own. IFEval's
own rows (`instruction_id_list` + `kwargs`) are read as `constraints`. Bad records raise naming
the file, line and field; `data.skip_invalid` skips and counts them instead.

`RolloutLoader` is the data loader of `smolforge grpo`: the one training loop asks it for
micro-batches like any loader, and it makes them by rollouts (Shao et al. 2024, Alg. 1):
1. take the next `grpo.prompts_per_step` prompts (a seeded order, reshuffled every epoch);
2. sample `grpo.group_size` completions of each with the ONE engine on the live policy (eval mode
   while sampling, train mode after), stopping at the template's end-of-turn or EOS;
3. score them (`train.rewards.RewardSet`), turn rewards into group-normalised advantages
   (`train.grpo.group_advantages`), and record the old log-probs (when a rollout feeds more than
   one optimizer step) and the reference log-probs (with `train.beta` > 0);
4. serve the rollout as micro-batches, `grpo.num_iterations` times over, then start again at 1.
The loader's state (prompt position, rollout count, the rollout being trained on) goes into
checkpoints, and sampling seeds derive from the run seed and the rollout count, so a resumed run
continues with the rollouts the uninterrupted one would have made.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from smolforge.chat.reasoning import prompt_opens_think
from smolforge.chat.render import IGNORE_INDEX, end_of_turn_ids, render_messages
from smolforge.config import GRPOConfig, TrainConfig
from smolforge.data.sft import EpochLoader, resolve_template
from smolforge.data.sources import ReadStats, expand_paths, iter_records
from smolforge.errors import SmolforgeError
from smolforge.train.rewards import FIELD_CHECKS, Reply, RewardSet, build_rewards

# ---- records -> prompts ---------------------------------------------------------------------------


@dataclass
class RLPrompt:
    """One prompt: its messages, the record as rewards see it, and its rendered tokens."""

    messages: list[dict[str, Any]]
    sample: dict[str, Any]  # the record's fields; "messages" = the prompt, "chat_template_kwargs" as used
    location: str
    text: str = ""
    ids: list[int] = field(default_factory=list)


def _bad(location: str, name: str, problem: str) -> SmolforgeError:
    return SmolforgeError(f"{location} field '{name}': {problem}")


def _prompt_messages(record: dict[str, Any], location: str) -> list[dict[str, Any]]:
    key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if key is None:
        raise _bad(location, "prompt", f"missing (the record's keys: {', '.join(sorted(record)) or 'none'}); "
                                       f"expected 'prompt' (a string or a list of messages) or 'messages'")
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise _bad(location, key, "is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad(location, key, f"must be a non-empty string or list of messages, got "
                                  f"{type(value).__name__ if value != [] else 'an empty list'}")
    messages = list(value)
    if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]  # the reference answer: the policy writes its own
    if not messages:
        raise _bad(location, key, "holds only an assistant message: there is no prompt to answer")
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") not in ("user", "tool"):
        raise _bad(location, f"{key}[{len(messages) - 1}].role", f"the prompt must end with a user (or tool) "
                                                                 f"message for the policy to answer, got {last.get('role')!r}")
    return messages


def to_rl_prompt(record: Any, location: str, rewards: RewardSet | None = None) -> RLPrompt:
    """One record as an RLPrompt; bad fields raise naming the location and field."""
    if not isinstance(record, dict):
        raise SmolforgeError(f"{location}: expected a JSON object, got {type(record).__name__}")
    messages = _prompt_messages(record, location)
    kwargs = record.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise _bad(location, "chat_template_kwargs", f"must be an object, got {type(kwargs).__name__}")
    sample = {k: v for k, v in record.items() if k not in ("prompt",)}
    if "instruction_id_list" in record and "constraints" not in record:  # an IFEval row
        ids, args = record.get("instruction_id_list"), record.get("kwargs")
        if not isinstance(ids, list) or not isinstance(args, list) or len(ids) != len(args):
            raise _bad(location, "kwargs", "an IFEval row needs lists 'instruction_id_list' and 'kwargs' of the same length")
        sample["constraints"] = [{"id": i, "kwargs": {k: v for k, v in (a or {}).items() if v is not None}}
                                 for i, a in zip(ids, args)]
    for name, check in FIELD_CHECKS.items():
        if name in sample:
            check(sample[name], location)
    if rewards is not None:
        rewards.check_sample(sample, location)
    sample["messages"], sample["chat_template_kwargs"] = messages, kwargs
    return RLPrompt(messages, sample, location)


@dataclass
class PromptSource:
    name: str
    prompts: list[RLPrompt]
    read: ReadStats = field(default_factory=ReadStats)
    dropped: int = 0  # too long for seq_len - max_new_tokens (truncation: drop)
    truncated: int = 0  # kept with their last tokens (truncation: truncate)
    sha256: str = ""


def read_prompts(path: str | Path, rewards: RewardSet | None = None, skip_invalid: bool = False,
                 stats: ReadStats | None = None) -> list[RLPrompt]:
    """Every prompt of every file `path` expands to; a file without any is an error."""
    prompts = []
    for file in expand_paths([path]):
        before = len(prompts)
        for location, record in iter_records(file, stats, skip_invalid):
            try:
                prompts.append(to_rl_prompt(record, location, rewards))
            except SmolforgeError:
                if not skip_invalid:
                    raise
                if stats is not None:
                    stats.skipped += 1
        if len(prompts) == before and not skip_invalid:
            raise SmolforgeError(f"{file}: no RL prompts in the file (it is empty); expected one JSON object "
                                 f"per line with 'prompt' or 'messages'")
    return prompts


def render_prompts(prompts: list[RLPrompt], tokenizer: Any, template: str, kwargs: dict[str, Any],
                   max_prompt_tokens: int, truncation: str, source: PromptSource) -> list[RLPrompt]:
    """Render each prompt with the generation prompt appended; fit it into `max_prompt_tokens`."""
    kept = []
    for prompt in prompts:
        merged = {**kwargs, **prompt.sample["chat_template_kwargs"]}
        try:
            prompt.text = render_messages(template, prompt.messages, add_generation_prompt=True, **merged)
        except SmolforgeError as exc:
            raise SmolforgeError(f"{prompt.location} {exc}") from None
        prompt.sample["chat_template_kwargs"] = merged  # what think_format and reward models read
        prompt.ids = tokenizer.encode(prompt.text)
        if len(prompt.ids) > max_prompt_tokens:
            if truncation == "error":
                raise SmolforgeError(f"{prompt.location}: the prompt is {len(prompt.ids)} tokens, over data.seq_len - "
                                     f"grpo.max_new_tokens = {max_prompt_tokens}; raise data.seq_len, lower "
                                     f"grpo.max_new_tokens or set data.truncation")
            if truncation == "drop":
                source.dropped += 1
                continue
            prompt.ids = prompt.ids[-max_prompt_tokens:]  # keep the end: the question and the generation prompt
            source.truncated += 1
        kept.append(prompt)
    return kept


# ---- rollouts -> token batches ------------------------------------------------------------------------


def rollout_rows(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                 masked: Sequence[bool] | None = None) -> dict[str, Tensor]:
    """Right-padded prompt + completion rows with SHIFTED labels on the completion tokens only.

    `labels[t]` is the target of position t, so a row's labels start at its last prompt token
    (which predicts the first completion token) and end one before its last token; a `masked`
    row (a truncated completion under mask_truncated) has no label at all.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completions)]
    rows, width = len(lengths), max(lengths)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_ids, completions)):
        input_ids[b, : lengths[b]] = torch.tensor([*p, *c], dtype=torch.long)
        if c and not (masked is not None and masked[b]):
            labels[b, len(p) - 1 : lengths[b] - 1] = torch.tensor(list(c), dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels,
            "position_ids": torch.arange(width).expand(rows, width).clone(),
            "document_ids": torch.zeros(rows, width, dtype=torch.long),
            "real_tokens": torch.tensor(lengths, dtype=torch.long)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The LoRA model as its frozen base: every adapter's scale set to 0 for the block (the base
    doubles as the reference model, as in TRL's `disable_adapter`)."""
    from smolforge.train.lora import lora_modules

    modules = list(lora_modules(model).values())
    scales = [m.scaling for m in modules]
    for m in modules:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(modules, scales):
            m.scaling = s


@torch.no_grad()
def batch_log_probs(model: nn.Module, batch: dict[str, Tensor], temperature: float,
                    autocast: Callable[[], Any] = nullcontext) -> Tensor:
    """Per-token log-probs (B, T) of the batch's labels under `model`, on the CPU (0 where -100)."""
    from smolforge.train.grpo import token_log_probs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast():
            logits = model(batch["input_ids"].to(device)).logits
        return token_log_probs(logits, batch["labels"].to(device), temperature).cpu()
    finally:
        model.train(was_training)


class PromptOrder(EpochLoader):
    """`next_batch()` = the indices of the next prompts: EpochLoader's seeded, per-epoch order."""

    def __init__(self, n: int, per_rollout: int, seed: int) -> None:
        self.n = n
        super().__init__(per_rollout, seed, None)

    def __len__(self) -> int:
        return self.n

    def _batch(self, indices: Sequence[int]) -> list[int]:  # type: ignore[override]
        return list(indices)


class RolloutLoader:
    """Micro-batches of GRPO rollouts (module docstring); the one training loop's data for `grpo`."""

    def __init__(self, prompts: Sequence[RLPrompt], rewards: RewardSet, settings: GRPOConfig, train_cfg: TrainConfig,
                 tokenizer: Any, seq_len: int, seed: int = 0, manifest: list[dict[str, Any]] | None = None,
                 reference: nn.Module | None = None) -> None:
        if not prompts:
            raise SmolforgeError("no RL prompts to train on")
        self.prompts, self.rewards, self.settings, self.tokenizer = list(prompts), rewards, settings, tokenizer
        self.seed, self._manifest, self.reference = seed, manifest or [], reference
        self.batch_size, self.grad_accum = train_cfg.batch_size, train_cfg.grad_accum
        self.loss_type = getattr(train_cfg, "loss_type", "dapo")
        self.beta = getattr(train_cfg, "beta", 0.0)
        group = settings.group_size
        self.rows_per_rollout = settings.prompts_per_step * group
        if self.rows_per_rollout % (self.batch_size * self.grad_accum):
            raise SmolforgeError(f"grpo.prompts_per_step x grpo.group_size ({self.rows_per_rollout}) must be a multiple "
                                 f"of train.batch_size x train.grad_accum ({self.batch_size * self.grad_accum})")
        self.micro_per_rollout = self.rows_per_rollout // self.batch_size
        self.steps_per_rollout = self.micro_per_rollout // self.grad_accum * settings.num_iterations
        # One optimizer step per rollout: the sampling policy is the one being updated (ratio 1).
        self.needs_old_logps = self.steps_per_rollout > 1
        self.scale_rewards = (settings.scale_rewards == "group" if settings.scale_rewards != "auto"
                              else self.loss_type != "dr_grpo")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.tokens_per_batch = self.batch_size * seq_len  # an upper bound; real counts come per batch
        self.order = PromptOrder(len(self.prompts), settings.prompts_per_step, seed)
        self.rollouts_done = 0  # rollouts generated so far (seeds derive from it)
        self.served = 0  # micro-batches of the current rollout handed out
        self.rollout: list[dict[str, Tensor]] | None = None
        self.model: nn.Module | None = None
        self.engine: Any = None
        self.autocast: Callable[[], Any] = nullcontext
        self.uses_adapters = False
        self._window: list[dict[str, float]] = []
        self._last: dict[str, float] = {}
        self._times = {"generate": 0.0, "score": 0.0, "train": 0.0}
        self._window_batches = 0
        self._handed_out: float | None = None

    # -- the loop's hooks ------------------------------------------------------------------------

    def attach_policy(self, model: nn.Module, autocast: Callable[[], Any] = nullcontext) -> None:
        """The model being trained: rollouts sample from it. With LoRA adapters on it, the frozen
        base (adapters off) is the reference, and no reference model is kept."""
        from smolforge.engine import Engine
        from smolforge.train.lora import lora_modules

        self.model, self.autocast = model, autocast
        self.engine = Engine(model, self.tokenizer)
        self.uses_adapters = bool(lora_modules(model))
        if self.uses_adapters:
            self.reference = None
        elif self.reference is not None and self.reference.config.vocab_size != model.config.vocab_size:
            raise SmolforgeError(f"grpo.reference_model has a vocabulary of {self.reference.config.vocab_size}, "
                                 f"the policy {model.config.vocab_size}: the reference must share the tokenizer")
        if self.beta > 0 and self.reference is None and not self.uses_adapters:
            raise SmolforgeError("train.beta > 0 needs a reference model (grpo.reference_model or run.init_from), "
                                 "or LoRA, whose frozen base is the reference")

    def next_batch(self) -> dict[str, Tensor]:
        now = time.perf_counter()
        if self._handed_out is not None:  # time since the last batch went out: the trainer's
            self._times["train"] += now - self._handed_out
        if self.rollout is None or self.served == self.micro_per_rollout * self.settings.num_iterations:
            self._make_rollout()
        batch = dict(self.rollout[self.served % self.micro_per_rollout])  # the loop pops keys: a copy
        self.served += 1
        self._window_batches += 1
        if self.beta > 0 and self.settings.reference == "online":
            start = time.perf_counter()
            batch["ref_logps"] = self._reference_log_probs(batch)
            self._times["score"] += time.perf_counter() - start
        self._handed_out = time.perf_counter()
        return batch

    def window_metrics(self) -> dict[str, float]:
        """Rollout statistics since the last call (the latest rollout's when none was made since)
        and the step time split into generation, scoring and training, per optimizer step."""
        now = time.perf_counter()
        if self._handed_out is not None:  # the trainer's time since the last batch, up to this log
            self._times["train"] += now - self._handed_out
            self._handed_out = now
        stats = self._window or ([self._last] if self._last else [])
        record: dict[str, float] = {}
        for key in stats[0] if stats else ():
            values = [s[key] for s in stats]
            record[key] = max(values) if key.endswith("max_length") else sum(values) / len(values)
        steps = self._window_batches / self.grad_accum
        if steps:
            record.update({f"time/{k}_s": v / steps for k, v in self._times.items()})
        self._window, self._window_batches = [], 0
        self._times = dict.fromkeys(self._times, 0.0)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict(), "rollouts_done": self.rollouts_done, "served": self.served,
                "rollout": self.rollout, "last": self._last, "prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("prompts") != len(self.prompts):
            raise SmolforgeError(f"the saved rollout state is for {state.get('prompts')} prompts, the recipe's data "
                                 f"has {len(self.prompts)}: resume with the same data.train")
        self.order.load_state_dict(state["order"])
        self.rollouts_done, self.served = state["rollouts_done"], state["served"]
        self.rollout, self._last = state["rollout"], state.get("last", {})

    def manifest(self) -> list[dict[str, Any]]:
        return self._manifest

    def epochs_seen(self) -> dict[str, float]:
        return {"prompts": self.order.epochs_done()}

    def steps_per_epoch(self, grad_accum: int) -> float:
        return len(self.prompts) / self.settings.prompts_per_step * self.steps_per_rollout

    def iter_eval(self, max_batches: int | None = None) -> Iterator[dict[str, Tensor]]:
        return iter(())

    # -- rollouts --------------------------------------------------------------------------------

    def _generate(self, prompt_ids: list[list[int]]) -> list[Any]:
        from smolforge.engine import SamplingParams

        s = self.settings
        chunk = s.generation_batch_size or len(prompt_ids)
        completions = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompt_ids), chunk):
                # Seeds from (run seed, rollout, chunk): a resumed run samples what the whole run would.
                seed = int(np.random.SeedSequence([self.seed, self.rollouts_done, start]).generate_state(1)[0])
                params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                        top_k=s.top_k, stop_token_ids=self.stop_ids, seed=seed)
                completions += self.engine.generate(prompt_ids[start:start + chunk], params)
        finally:
            self.model.train(was_training)
        return completions

    def _make_rollout(self) -> None:
        from smolforge.train.grpo import group_advantages

        if self.model is None:
            raise SmolforgeError("RolloutLoader.attach_policy(model) must be called before the first batch")
        s, group = self.settings, self.settings.group_size
        picked = [self.prompts[i] for i in self.order.next_batch()]
        prompt_ids = [p.ids for p in picked for _ in range(group)]
        start = time.perf_counter()
        completions = self._generate(prompt_ids)
        generated = time.perf_counter()
        replies = [Reply(c.text or "", tuple(c.tokens), c.finish_reason == "length", prompt_opens_think(p.text))
                   for p, c in zip((p for p in picked for _ in range(group)), completions)]
        texts = [p.text for p in picked for _ in range(group)]
        samples = [p.sample for p in picked for _ in range(group)]
        totals, per_reward = self.rewards(texts, replies, samples)
        rewards = torch.tensor(totals, dtype=torch.float32)
        advantages = group_advantages(rewards, group, scale=self.scale_rewards)
        masked = [r.truncated and s.mask_truncated for r in replies]
        self.rollout = []
        for b in range(0, self.rows_per_rollout, self.batch_size):
            rows = range(b, b + self.batch_size)
            batch = rollout_rows([prompt_ids[i] for i in rows], [completions[i].tokens for i in rows], self.pad_id,
                                 [masked[i] for i in rows])
            batch["advantages"] = advantages[b:b + self.batch_size].clone()
            batch["temperature"] = torch.tensor(float(s.temperature))
            batch["max_completion_tokens"] = torch.tensor(float(s.max_new_tokens))
            if self.loss_type != "dapo":  # per-completion losses: micro-batches weigh by completions
                batch["step_weight"] = torch.tensor(float(self.batch_size))
            if self.needs_old_logps:
                batch["old_logps"] = batch_log_probs(self.model, batch, s.temperature, self.autocast)
            if self.beta > 0 and s.reference == "cached":
                batch["ref_logps"] = self._reference_log_probs(batch)
            self.rollout.append(batch)
        scored = time.perf_counter()
        self._times["generate"] += generated - start
        self._times["score"] += scored - generated
        self.rollouts_done += 1
        self.served = 0
        self._last = self._rollout_stats(rewards, per_reward, replies, generated - start)
        self._window.append(self._last)

    def _reference_log_probs(self, batch: dict[str, Tensor]) -> Tensor:
        temperature = self.settings.temperature
        if self.uses_adapters:
            with adapters_disabled(self.model):
                return batch_log_probs(self.model, batch, temperature, self.autocast)
        assert self.reference is not None
        return batch_log_probs(self.reference, batch, temperature, self.autocast)

    def _rollout_stats(self, rewards: Tensor, per_reward: dict[str, list[float]], replies: list[Reply],
                       generate_seconds: float) -> dict[str, float]:
        group = self.settings.group_size
        lengths = [r.num_tokens for r in replies]
        stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0}
        for label, values in per_reward.items():
            t = torch.tensor(values)
            stats[f"rewards/{label}"] = float(t.mean())
            stats[f"rewards/{label}_std"] = float(t.std()) if len(t) > 1 else 0.0
        flat = (rewards.view(-1, group).std(dim=1) == 0).float().mean()
        stats.update({"completion/mean_length": sum(lengths) / len(lengths),
                      "completion/max_length": float(max(lengths)),
                      "completion/truncated": sum(r.truncated for r in replies) / len(replies),
                      # groups whose completions all scored the same: zero advantage, nothing learned
                      "rollout/flat_groups": float(flat),
                      "rollout/tokens_per_s": sum(lengths) / max(generate_seconds, 1e-9)})
        return stats


# ---- building -------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    for file in expand_paths([path]):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def load_rl_prompts(data: Any, tokenizer: Any, rewards: RewardSet, max_new_tokens: int
                    ) -> tuple[list[RLPrompt], list[dict[str, Any]]]:
    """Every usable prompt of `data.train` (an RLDataConfig), rendered with the data's template so
    that `max_new_tokens` still fit in data.seq_len, and the data manifest of checkpoints. Shared
    by `smolforge grpo` and `smolforge ppo`; prints one line per source."""
    if not data.train:
        raise SmolforgeError("data.train is empty: list at least one file of RL prompts")
    template = resolve_template(data.template, tokenizer)
    tokenizer.chat_template = template  # checkpoints carry the template the policy was trained with
    max_prompt = data.seq_len - max_new_tokens
    sources, prompts = [], []
    for source in data.train:
        src = PromptSource(name=source.name or Path(source.path).stem, prompts=[])
        read = read_prompts(source.path, rewards, data.skip_invalid, src.read)
        src.prompts = render_prompts(read, tokenizer, template, {**data.chat_template_kwargs, **source.chat_template_kwargs},
                                     max_prompt, data.truncation, src)
        if not src.prompts:
            raise SmolforgeError(f"{source.path}: no usable prompt ({src.read.skipped} invalid, {src.dropped} longer "
                                 f"than data.seq_len - max_new_tokens = {max_prompt} tokens)")
        src.sha256 = _sha256(source.path)
        sources.append(src)
        prompts += src.prompts
        extra = [f"{n} {what}" for n, what in ((src.read.skipped, "invalid skipped"), (src.dropped, "dropped as too long"),
                                               (src.truncated, "truncated")) if n]
        print(f"  {src.name}: {len(src.prompts):,} prompts" + (f" [{', '.join(extra)}]" if extra else ""))
    manifest = [{"name": s.name, "path": c.path, "sha256": s.sha256, "prompts": len(s.prompts)}
                for s, c in zip(sources, data.train)]
    return prompts, manifest


def build_rl_loaders(recipe: Any, tokenizer: Any, device: torch.device,
                     run_dir: Path | None = None) -> tuple[RolloutLoader, None]:
    """The rollout loader of a GRPO recipe (no validation loader: the reward is measured on-policy)."""
    data, settings, tcfg = recipe.data, recipe.grpo, recipe.train
    if not data.train:
        raise SmolforgeError("data.train is empty: list at least one file of RL prompts")
    rewards = build_rewards(settings.rewards, defaults={"max_len": settings.max_new_tokens})
    prompts, manifest = load_rl_prompts(data, tokenizer, rewards, settings.max_new_tokens)
    print(f"  rewards: {' + '.join(f'{b.weight:g} x {b.label}' for b in rewards.rewards)}; "
          f"{settings.prompts_per_step} prompts x {settings.group_size} completions per rollout")
    reference = None
    if tcfg.beta > 0 and recipe.lora.r == 0:
        from smolforge.train.checkpoint import load_model

        path = settings.reference_model or recipe.run.init_from
        if not path:
            raise SmolforgeError("train.beta > 0 needs a reference model: set run.init_from (the starting checkpoint "
                                 "is the reference by default) or grpo.reference_model, or set train.beta to 0")
        ref_device = device if settings.reference_device == "auto" else torch.device(settings.reference_device)
        reference, _ = load_model(path, device=ref_device)
        reference.eval().requires_grad_(False)
        print(f"  reference model: {path} on {ref_device} (log-probs {settings.reference})")
    loader = RolloutLoader(prompts, rewards, settings, tcfg, tokenizer, data.seq_len, recipe.run.seed, manifest,
                           reference)
    print(f"  {len(prompts):,} prompts: {loader.steps_per_epoch(tcfg.grad_accum):.1f} optimizer steps per epoch")
    return loader, None
