"""Reward models: the Transformer body with a scalar `score` head, trained on preference pairs.

The reward of a sequence is the head applied to the final hidden state of its LAST real token
(Ouyang et al. 2022, arXiv:2203.02155, sec. 3.5): what transformers' `*ForSequenceClassification`
computes with `num_labels=1`, so a saved reward model loads there (Llama, Qwen2, Qwen3).
The last real token comes from `lengths=` (real tokens per row: the loaders' `real_tokens`), else
`key_mask` (rightmost True), else `pad_id` (rightmost token != pad_id: transformers' rule, which
mis-reads a row whose text ends with the pad token). Objective "reward": see `reward_objective`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smolforge import model as modeling
from smolforge.chat.render import render_messages
from smolforge.config import TrainConfig
from smolforge.data.preference import _messages
from smolforge.errors import SmolforgeError, where
from smolforge.interop import hf
from smolforge.model import Backbone, KVCache, ModelConfig, ModelOutput, Transformer
from smolforge.tokenizer import Tokenizer
from smolforge.train import checkpoint as ckpt
from smolforge.train.objectives import register
from smolforge.train.preference import _with_aux

# Causal architecture (hf.architecture_for) -> its transformers sequence-classification class.
SEQUENCE_CLASSIFIERS = {f"{n}ForCausalLM": f"{n}ForSequenceClassification" for n in ("Llama", "Qwen2", "Qwen3")}
CAUSAL_OF = {v: k for k, v in SEQUENCE_CLASSIFIERS.items()}
SCORE_WEIGHT = "score.weight"


class RewardModel(nn.Module):
    """A decoder body (`model.`: embed_tokens, layers, norm) and `score`: Linear(hidden, 1), no LM head."""

    # Under LoRA (smolforge.train.lora) the body takes the adapters and the new head trains in full,
    # saved whole with them: peft's modules_to_save for sequence classification (task_type SEQ_CLS).
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    peft_modules_to_save: ClassVar[tuple[str, ...]] = ("score",)

    def __init__(self, cfg: ModelConfig, pad_id: int | None = None, body: Backbone | None = None) -> None:
        super().__init__()
        self.config, self.pad_id = cfg, pad_id
        # A fresh body takes Transformer's initialisation (playbook N(0, std)); its LM head is dropped.
        self.model = body if body is not None else Transformer(cfg).model
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=cfg.init_std)  # as transformers' _init_weights

    @classmethod
    def from_causal(cls, model: Transformer, pad_id: int | None = None) -> RewardModel:
        """A reward model on `model`'s body (shared, not copied: deepcopy first to keep the LM)."""
        return cls(model.config, pad_id, body=model.model)

    def body(self, input_ids: Tensor, position_ids: Tensor | None = None, document_ids: Tensor | None = None,
             key_mask: Tensor | None = None, cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """Final-norm hidden states (B, T, hidden) and the MoE aux loss: `Transformer.forward` step
        for step minus the LM head. No KV cache: a reward is read once the sequence is whole."""
        if cache is not None:
            raise ValueError("reward models score whole sequences: no KV cache")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = modeling.build_attention_mask(T, document_ids, key_mask)
        cos, sin = modeling.rope_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta)
        x, aux_total = self.model.embed_tokens(input_ids), None
        for block in self.model.layers:
            x, aux = block(x, cos, sin, mask, cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if aux_total is not None:
            aux_total = aux_total * self.config.router_aux_loss_coef / self.config.n_layers
        return self.model.norm(x), aux_total

    def last_token_index(self, input_ids: Tensor, lengths: Tensor | None = None,
                         key_mask: Tensor | None = None) -> Tensor:
        """Position (B,) of each row's last real token in `input_ids` (see the module docstring)."""
        B, T = input_ids.shape
        if lengths is not None:
            lengths = lengths.to(input_ids.device, torch.long)
            if lengths.shape != (B,) or bool(((lengths < 1) | (lengths > T)).any()):
                raise ValueError(f"lengths must be ({B},) values in 1..{T}, got {lengths.tolist()}")
            return lengths - 1
        if key_mask is not None:
            real = key_mask.bool()
        elif self.pad_id is not None:
            real = input_ids != self.pad_id
        elif B == 1:
            return torch.full((1,), T - 1, device=input_ids.device)
        else:
            raise ValueError("cannot tell padding from text: pass lengths= or key_mask=, or set pad_id")
        # Rightmost real position (transformers' rule: right and left padding both work).
        return (torch.arange(T, device=input_ids.device) * real).argmax(-1)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, document_ids: Tensor | None = None,
                key_mask: Tensor | None = None, cache: KVCache | None = None,
                lengths: Tensor | None = None) -> ModelOutput:
        """`logits` = rewards (B,) in fp32 (preference losses live on small differences)."""
        hidden, aux = self.body(input_ids, position_ids, document_ids, key_mask, cache)
        last = hidden[torch.arange(len(hidden), device=hidden.device), self.last_token_index(input_ids, lengths, key_mask)]
        with torch.autocast(last.device.type, enabled=False):  # an fp32 head even under bf16 autocast
            rewards = F.linear(last.float(), self.score.weight.float()).squeeze(-1)
        return ModelOutput(logits=rewards, aux_loss=aux)


# --- the objective ----------------------------------------------------------------------------


def bradley_terry(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Per-pair −log σ(r_c − r_r − m): the Bradley–Terry (1952) likelihood of the preference as a
    reward-model loss (Ouyang et al. 2022, eq. 1); the margin m is Llama 2's (Touvron et al. 2023,
    arXiv:2307.09288, eq. 2), larger for more clearly preferred pairs."""
    return -F.logsigmoid(chosen - rejected if margin is None else chosen - rejected - margin)


def reward_centering(chosen: Tensor, rejected: Tensor) -> Tensor:
    """mean((r_c + r_r)²): keeps rewards centred on zero, since BT fixes them only up to a shift
    (Eisenstein et al. 2023, "Helping or Herding?", arXiv:2312.09244; TRL's center_rewards_coefficient)."""
    return ((chosen + rejected) ** 2).mean()


@register("reward")
def reward_objective(output: ModelOutput, batch: dict[str, Tensor], cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley–Terry on a [chosen; rejected] batch of rewards: TRL RewardTrainer's loss and metrics.
    Optional: batch `margin` (B,), `cfg.center_rewards_coefficient` (absent = 0)."""
    rewards = output.logits
    if rewards.dim() != 1 or rewards.shape[0] % 2:
        raise SmolforgeError(f"train.objective 'reward' needs one reward per row of a [chosen; rejected] batch "
                             f"(an even (2B,) vector: train a RewardModel); got shape {tuple(rewards.shape)}")
    chosen, rejected = rewards.float().chunk(2)
    margin = batch.get("margin")
    if margin is not None and margin.shape != chosen.shape:
        raise SmolforgeError(f"batch 'margin' has shape {tuple(margin.shape)}, expected ({len(chosen)},)")
    loss = bradley_terry(chosen, rejected, None if margin is None else margin.float()).mean()
    if coefficient := getattr(cfg, "center_rewards_coefficient", 0.0) or 0.0:
        loss = loss + coefficient * reward_centering(chosen, rejected)
    c, r = chosen.detach(), rejected.detach()
    metrics = {"accuracy": (c > r).float().mean(), "margin": (c - r).mean(),
               "rewards/chosen": c.mean(), "rewards/rejected": r.mean()}
    return _with_aux(loss, metrics, output)


# --- saving and loading -----------------------------------------------------------------------


def save_reward_model(directory: str | Path, reward_model: RewardModel, tokenizer: Tokenizer | None = None,
                      meta: dict[str, Any] | None = None, *, trainer_state: dict[str, Any] | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write an HF `*ForSequenceClassification` directory (+ smolforge.json, stage "reward"),
    atomically like `checkpoint.save_checkpoint`; refuse before writing if no class expresses it."""
    directory, cfg = Path(directory), reward_model.config
    causal = hf.architecture_for(cfg)
    if causal not in SEQUENCE_CLASSIFIERS:
        raise SmolforgeError(f"cannot export this reward model: {causal} has no sequence-classification class "
                             f"smolforge writes (supported: {', '.join(SEQUENCE_CLASSIFIERS.values())})")
    ids = hf.token_ids(tokenizer)
    if reward_model.pad_id is not None:
        ids["pad_token_id"] = reward_model.pad_id  # what transformers reads rewards by
    if ids["pad_token_id"] is None or ids["pad_token_id"] == ids["eos_token_id"]:
        warnings.warn(f"{directory}: pad_token_id {ids['pad_token_id']} (eos {ids['eos_token_id']}): transformers "
                      "reads rewards at the last token != pad_token_id; padded batches will be mis-read", stacklevel=2)
    # The tied key map never lists lm_head: a reward model has none, tied or not.
    key_map = hf.ADAPTERS[causal].key_map(cfg.model_copy(update={"tie_embeddings": True}))
    sd = reward_model.state_dict()
    state = {name: sd[key].detach().to(dtype if dtype and sd[key].is_floating_point() else sd[key].dtype).cpu()
             .contiguous() for key, name in {**key_map, SCORE_WEIGHT: SCORE_WEIGHT}.items()}
    dtype_name = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config = {**hf.hf_config(cfg, ids, dtype=dtype_name), "architectures": [SEQUENCE_CLASSIFIERS[causal]],
              "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    directory.parent.mkdir(parents=True, exist_ok=True)
    ckpt._tidy_temporaries(directory)  # below: save_checkpoint's steps, with our config and tensors
    if directory.exists() and not (directory / ckpt.META_FILE).is_file() and any(directory.iterdir()):
        raise SmolforgeError(f"{directory} exists and is not a smolforge checkpoint (no {ckpt.META_FILE}); "
                             f"refusing to replace it: choose another path or remove it")
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    tmp.mkdir()
    old = tmp.with_name(tmp.name + ".old")
    try:
        ckpt._write_weights(tmp, state, None)
        ckpt._write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:  # periodic checkpoints of a reward run resume like any other
            torch.save(trainer_state, tmp / ckpt.STATE_FILE)
        files = {p.name: {"size": p.stat().st_size, "sha256": ckpt._sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {**ckpt.META_DEFAULTS, "stage": "reward", **(meta or {}),
                  "architecture": config["architectures"][0], "model": cfg.model_dump(),
                  "reward_model": {"pad_id": ids["pad_token_id"]}, "files": files}
        ckpt._write_json(tmp / ckpt.META_FILE, record)
        ckpt._fsync_tree(tmp)
        # Same placement as save_checkpoint: a crash leaves the old or the new directory.
        if not directory.exists():
            os.replace(tmp, directory)
        elif ckpt._exchange(tmp, directory):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        ckpt._fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            os.replace(old, directory)
        raise
    return directory


def load_reward_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      verify: bool = True) -> tuple[RewardModel, Tokenizer]:
    """(reward model, tokenizer) from a directory written by `save_reward_model` or transformers."""
    from smolforge.interop.hub import resolve_model_path

    path = resolve_model_path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SmolforgeError(f"{path} is not a model directory (no config.json)")
    if verify and (path / ckpt.META_FILE).is_file():
        ckpt.verify_checkpoint(path)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SmolforgeError(f"{config_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    arch = (config.get("architectures") or [None])[0]
    if arch not in CAUSAL_OF:
        hint = " (a language model: train one into a reward model first)" if arch in hf.ADAPTERS else ""
        raise SmolforgeError(f"{where(config_file, field='architectures')}: {arch!r} is not a reward model"
                             f"{hint}; expected one of {', '.join(CAUSAL_OF)}")
    if len(config.get("id2label") or {"0": ""}) != 1:
        raise SmolforgeError(f"{where(config_file, field='id2label')}: a reward model has exactly one label")
    causal = CAUSAL_OF[arch]  # the body is that causal model's, read by its adapter
    cfg = ckpt._recorded_config(path, hf.model_config_from_hf({**config, "architectures": [causal]}, str(config_file)))
    tensors, _ = ckpt._read_weights(path, "expected model.safetensors")
    if (score := tensors.pop(SCORE_WEIGHT, None)) is None:
        raise SmolforgeError(f"{path}: the weights have no {SCORE_WEIGHT} (the reward head)")
    tied = cfg.model_copy(update={"tie_embeddings": True})  # no lm_head on disk, whatever cfg says
    state = hf.from_hf(tensors, tied, str(path), architecture=causal)
    state.pop("lm_head.weight")
    with torch.device("meta"):
        model = RewardModel(cfg, pad_id=config.get("pad_token_id"))
    try:
        model.load_state_dict({**state, SCORE_WEIGHT: score}, strict=True, assign=True)
    except RuntimeError as exc:
        raise SmolforgeError(f"{path}: the weights do not fit {config_file}: {exc}") from None
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), Tokenizer.load(path)


def reward_model_from(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      pad_id: int | None = None) -> tuple[RewardModel, Tokenizer]:
    """What a reward run starts from: a reward model as saved, or a causal LM checkpoint's body with
    a new `score` head (its init drawn from torch's RNG) reading rewards by `pad_id` (default: the
    checkpoint tokenizer's pad token, else its EOS)."""
    from smolforge.interop.hub import resolve_model_path

    config_file = resolve_model_path(path) / "config.json"
    try:
        arch = (json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or [None])[0]
    except (OSError, json.JSONDecodeError):
        arch = None  # not readable here: load_model names the problem
    if arch in CAUSAL_OF:
        return load_reward_model(path, device=device, dtype=dtype)
    causal, tokenizer = ckpt.load_model(path, device=device, dtype=dtype)
    if pad_id is None:
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return RewardModel.from_causal(causal, pad_id=pad_id).to(device), tokenizer


# --- scoring records: `smolforge score` -------------------------------------------------------


def _conversation(record: Any, location: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prompt + response messages of a `{"prompt" | "messages", "response" | "completion"}` record."""
    if not isinstance(record, dict):
        raise SmolforgeError(f"{location}: expected a JSON object, got {type(record).__name__}")
    keys = []
    for name, other in (("prompt", "messages"), ("response", "completion")):
        if name not in record and other not in record:
            raise SmolforgeError(f"{where(location, field=name)}: missing (or '{other}'); the record's keys: "
                                 f"{', '.join(sorted(record)) or 'none'}")
        keys.append(name if name in record else other)
    prompt = _messages(record[keys[0]], "user", location, keys[0])
    response = _messages(record[keys[1]], "assistant", location, keys[1])
    if response[: len(prompt)] == prompt and len(response) > len(prompt):
        response = response[len(prompt):]  # stored as the whole conversation: keep the response
    if any(m.get("role") != "assistant" for m in response):
        raise SmolforgeError(f"{where(location, field=keys[1])}: must hold assistant messages only")
    kwargs = record.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SmolforgeError(f"{where(location, field='chat_template_kwargs')}: must be an object")
    return prompt + response, kwargs


@torch.no_grad()
def score_records(reward_model: RewardModel, tokenizer: Tokenizer, template: str,
                  records: Iterable[Mapping[str, Any] | tuple[str, Any]], batch_size: int = 8) -> list[float]:
    """The reward of each record, in order. `records`: dicts, or (location, record) pairs as
    `data.sources.iter_records` yields them, so that errors name file:line and field."""
    # render_for_training's template variables, so that a row is scored exactly as it was trained.
    special = {f"{n}_token": getattr(tokenizer, f"{n}_token") for n in ("bos", "eos", "pad")}
    variables = {**{k: v for k, v in special.items() if v}, "keep_all_reasoning": True}
    rows = []
    for i, item in enumerate(records):
        location, record = item if isinstance(item, tuple) else (f"record {i}", item)
        messages, kwargs = _conversation(record, location)
        try:
            ids = tokenizer.encode(render_messages(template, messages, **{**variables, **kwargs}))
        except SmolforgeError as exc:
            raise SmolforgeError(f"{location} {exc}") from None
        if not 0 < len(ids) <= reward_model.config.max_seq_len:
            raise SmolforgeError(f"{location}: {len(ids)} tokens, over the model's context of "
                                 f"{reward_model.config.max_seq_len} (the reward is read at the last one)")
        rows.append(ids)
    device, was_training = next(reward_model.parameters()).device, reward_model.training
    reward_model.eval()
    scores = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        lengths = torch.tensor([len(rows[k]) for k in chunk], device=device)
        # Right-padded with 0s, which causal attention hides and `lengths` skips.
        ids = nn.utils.rnn.pad_sequence([torch.tensor(rows[k]) for k in chunk], batch_first=True).to(device)
        for k, value in zip(chunk, reward_model(ids, lengths=lengths).logits.tolist()):
            scores[k] = value
    reward_model.train(was_training)
    return scores


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("score", help="Score prompt/response records with a reward model.", description=(
        "Add a 'reward' field to every {prompt|messages, response|completion} record."))
    parser.add_argument("reward_model", metavar="RM_DIR", help="A reward model directory (smolforge or HF).")
    parser.add_argument("--data", required=True, help="Records to score: .jsonl, .json or .parquet.")
    parser.add_argument("--out", required=True, help="JSONL file to write the scored records to.")
    parser.add_argument("--template", default="auto", help="auto (tokenizer's, else smollm3), chatml, smollm3, a .jinja")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per forward pass.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.set_defaults(func=score_command)


def score_command(args: argparse.Namespace) -> int:
    from smolforge.data.sft import resolve_template
    from smolforge.data.sources import expand_paths, iter_records
    from smolforge.train.loop import resolve_device

    if args.batch_size < 1:
        raise SmolforgeError(f"--batch-size must be at least 1, got {args.batch_size}")
    model, tokenizer = load_reward_model(args.reward_model, device=resolve_device(args.device))
    template = resolve_template(args.template, tokenizer)
    records = [item for file in expand_paths([args.data]) for item in iter_records(file)]
    if not records:
        raise SmolforgeError(f"{args.data}: no records to score")
    scores = score_records(model, tokenizer, template, records, batch_size=args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")  # a failed write never leaves half a file
    with open(tmp, "w", encoding="utf-8") as f:
        for (_, record), score in zip(records, scores):
            f.write(json.dumps({**record, "reward": score}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(f"scored {len(scores)} records -> {out} (reward mean {sum(scores) / len(scores):.4f}, "
          f"min {min(scores):.4f}, max {max(scores):.4f})")
    return 0
