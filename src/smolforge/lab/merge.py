"""`smolforge merge`: average checkpoints of one model into a new one (linear, SLERP, TIES).

Merging fine-tuned checkpoints of the same base costs no training and often beats each input
(playbook ch. 07). Three methods, each a pure function on state dicts, computed in fp32 and cast
back to the first input's dtype:
- `linear`: weighted average, the "model soup" (Wortsman et al. 2022, arXiv:2203.05482);
- `slerp`: spherical interpolation of two checkpoints, tensor by tensor (Shoemake 1985, as
  popularised by mergekit): it keeps the norm of the weights where a plain average shrinks it;
- `ties`: TIES-Merging (Yadav et al. 2023, arXiv:2306.01708): task vectors against a base are
  trimmed, a sign is elected per weight and only the agreeing values are averaged, so that
  fine-tunes pulling a weight in opposite directions do not cancel into noise.

Example, SmolLM3's recipe (playbook ch. 07): a soup of the APO checkpoints, then 0.9 of that soup
plus 0.1 of the mid-training checkpoint, which recovered long-context (RULER) scores:

    smolforge merge --method linear runs/apo-a/final runs/apo-b/final runs/apo-c/final --out runs/apo-soup
    smolforge merge --method linear runs/apo-soup runs/mid/final --weights 0.9 0.1 --out runs/smol-merged

All inputs are held in memory at once (one copy each, in their stored dtype).
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smolforge.errors import SmolforgeError

State = dict[str, Tensor]
METHODS = ("linear", "slerp", "ties")
# Above this |cos| the angle is too small (or too close to pi) for sin(omega) to be divided by
# safely; the arc and the chord then coincide to within rounding, so lerp is used instead.
COLINEAR = 0.9995
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


# --- checks shared by the methods -----------------------------------------------------------------


def _names(names: Sequence[str] | None, count: int) -> list[str]:
    return list(names) if names is not None else [f"state {i}" for i in range(count)]


def _check_same_tensors(states: Sequence[State], names: Sequence[str]) -> None:
    """Same tensor names and shapes in every state; the error names the first tensor that differs."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        only_first = [k for k in first if k not in state]
        only_other = [k for k in state if k not in first]
        if only_first or only_other:
            key, holder = (only_first[0], names[0]) if only_first else (only_other[0], name)
            raise SmolforgeError(f"{names[0]} and {name} hold different tensors: {key} is only in {holder}; "
                                 f"only checkpoints of the same architecture can be merged")
        for key, tensor in first.items():
            if state[key].shape != tensor.shape:
                raise SmolforgeError(f"tensor {key} has shape {list(tensor.shape)} in {names[0]} but "
                                     f"{list(state[key].shape)} in {name}: only checkpoints of the same "
                                     f"model size can be merged")


def resolve_weights(weights: Sequence[float] | None, count: int, normalize: bool = True) -> list[float]:
    """The weights applied: equal ones when None, scaled to sum to 1 when `normalize`."""
    values = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(values) != count:
        raise SmolforgeError(f"got {len(values)} weights for {count} checkpoints: give one weight per "
                             f"checkpoint, in the same order")
    if not all(math.isfinite(w) for w in values):
        raise SmolforgeError(f"weights {values} must be finite numbers")
    total = sum(values)
    if normalize and total == 0:
        raise SmolforgeError(f"weights {values} sum to 0 and cannot be normalised to sum to 1")
    return [w / total for w in values] if normalize else values


def _check_range(flag: str, value: float, low: float, meaning: str) -> None:
    if not low <= value <= 1.0:
        raise SmolforgeError(f"{flag} {value}: must lie in {meaning}")


def _per_tensor(states: Sequence[State], names: Sequence[str], fn: Callable[[list[Tensor]], Tensor]) -> State:
    """Apply `fn` to the fp32 copies of each floating-point tensor; cast to the first state's dtype.

    fp32 because bf16 sums lose the small differences between fine-tunes that merging is about.
    Integer tensors (none in our models today) cannot be averaged: they must agree and are copied.
    """
    _check_same_tensors(states, names)
    merged: State = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            for state, name in zip(states[1:], names[1:]):
                if not torch.equal(state[key], ref):
                    raise SmolforgeError(f"integer tensor {key} differs between {names[0]} and {name} "
                                         f"and cannot be averaged")
            merged[key] = ref.clone()
            continue
        merged[key] = fn([s[key].detach().float() for s in states]).to(ref.dtype)
    return merged


# --- the methods ----------------------------------------------------------------------------------


def merge_linear(states: Sequence[State], weights: Sequence[float] | None = None, *, normalize: bool = True,
                 names: Sequence[str] | None = None) -> State:
    """sum_i w_i * state_i; `weights` (default equal) are scaled to sum to 1 unless `normalize=False`."""
    if not states:
        raise SmolforgeError("linear merge needs at least one state")
    w = resolve_weights(weights, len(states), normalize)
    return _per_tensor(states, _names(names, len(states)),
                       lambda ts: sum((wi * t for wi, t in zip(w[1:], ts[1:])), w[0] * ts[0]))


def _slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    norm = a.norm() * b.norm()
    if norm == 0:
        return torch.lerp(a, b, t)  # no direction to rotate along
    cos = float((a.flatten() @ b.flatten()) / norm)
    if abs(cos) > COLINEAR:
        return torch.lerp(a, b, t)
    omega = math.acos(max(-1.0, min(1.0, cos)))
    # Shoemake's formula on the unnormalised tensors, so that the norms are interpolated too.
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def merge_slerp(a: State, b: State, t: float, *, names: Sequence[str] | None = None) -> State:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) of each flattened tensor."""
    _check_range("--t", t, 0.0, "[0, 1]: 0 is the first checkpoint, 1 the second")
    return _per_tensor([a, b], _names(names, 2), lambda ts: _slerp(ts[0], ts[1], t))


def _ties(base: Tensor, others: list[Tensor], weights: Tensor, density: float) -> Tensor:
    deltas = torch.stack([o - base for o in others]).flatten(1)  # task vectors, one per row
    # Trim: keep the `density` fraction of largest magnitudes in each task vector (rounded, >= 1):
    # most of a fine-tune's change is small noise that only adds interference.
    keep = max(1, round(density * deltas.shape[1]))
    mask = torch.zeros_like(deltas, dtype=torch.bool)
    mask.scatter_(1, deltas.abs().topk(keep, dim=1).indices, True)
    trimmed = deltas * mask
    w = weights[:, None]
    # Elect: the sign of the (weighted) sum, i.e. the direction with the most total mass.
    elected = torch.sign((w * trimmed).sum(0))
    # Disjoint mean: average only the kept values that agree with the elected sign.
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = (w * agree).sum(0)
    mean = torch.where(total > 0, (w * trimmed * agree).sum(0) / total.clamp_min(1e-30), 0.0)
    return base + mean.view_as(base)


def merge_ties(base: State, states: Sequence[State], weights: Sequence[float] | None = None,
               density: float = 0.5, *, names: Sequence[str] | None = None) -> State:
    """TIES-Merging of `states` against `base`; `names` name [base, *states] in errors.

    `weights` (default equal, must be positive) weight both the sign election and the mean.
    """
    if not states:
        raise SmolforgeError("ties merge needs at least one checkpoint besides the base")
    _check_range("--density", density, 1e-12, "(0, 1]: the fraction of each task vector kept")
    w = resolve_weights(weights, len(states), normalize=False)
    if any(x <= 0 for x in w):
        raise SmolforgeError(f"ties weights {w} must all be positive")
    w_tensor = torch.tensor(w)
    return _per_tensor([base, *states], _names(names, len(states) + 1),
                       lambda ts: _ties(ts[0], ts[1:], w_tensor, density))


# --- checkpoints ----------------------------------------------------------------------------------


def _check_configs(configs: Sequence[Any], names: Sequence[str]) -> None:
    first = configs[0].model_dump()
    for cfg, name in zip(configs[1:], names[1:]):
        for field, value in cfg.model_dump().items():
            if value != first.get(field):
                raise SmolforgeError(f"{name} has model.{field}={value!r} but {names[0]} has "
                                     f"{first.get(field)!r}: only checkpoints of one architecture and "
                                     f"size can be merged")


def merge_checkpoints(paths: Sequence[str | Path], method: str, weights: Sequence[float] | None,
                      out: str | Path, base: str | Path | None = None, t: float = 0.5,
                      density: float = 0.5) -> Path:
    """Merge the checkpoints at `paths` with `method` and save the result (tokenizer of the first) at `out`."""
    from smolforge.train.checkpoint import load_model, save_checkpoint

    if method not in METHODS:
        raise SmolforgeError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "slerp" and len(paths) != 2:
        raise SmolforgeError(f"slerp interpolates exactly 2 checkpoints ({len(paths)} given)")
    if method == "slerp" and weights is not None:
        raise SmolforgeError("slerp takes --t (the position between the two checkpoints), not --weights")
    if method == "ties" and base is None:
        raise SmolforgeError("ties needs --base: the checkpoint the inputs were fine-tuned from")
    if method != "ties" and base is not None:
        raise SmolforgeError(f"--base is used by ties only, not by {method}")
    if method == "linear" and len(paths) < 2:
        raise SmolforgeError(f"a linear merge needs at least two checkpoints ({len(paths)} given)")
    if method == "slerp":  # bad arguments fail here, not after minutes of loading
        _check_range("--t", t, 0.0, "[0, 1]: 0 is the first checkpoint, 1 the second")
    else:
        resolve_weights(weights, len(paths), normalize=method == "linear")
    if method == "ties":
        _check_range("--density", density, 1e-12, "(0, 1]: the fraction of each task vector kept")
    sources = [*([base] if base is not None else []), *paths]
    if any(Path(out).resolve() == Path(p).resolve() for p in sources):
        raise SmolforgeError(f"--out {out} is one of the inputs: choose a new directory")

    names = [str(p) for p in sources]
    loaded = [load_model(p) for p in sources]
    models = [m for m, _ in loaded]
    _check_configs([m.config for m in models], names)
    index = 1 if method == "ties" else 0  # the first checkpoint of `paths` gives tokenizer and model
    tokenizers = [tok for _, tok in loaded]
    for tok, name in zip(tokenizers, names):
        if tok.fingerprint != tokenizers[index].fingerprint:
            warnings.warn(f"{name} has a different tokenizer from {paths[0]}: token ids may mean different "
                          f"things in them; the merge uses the tokenizer of {paths[0]}", stacklevel=2)
    tied = models[0].config.tie_embeddings
    # A tied lm_head is the embedding itself: merge it once, as the embedding, and re-tie below.
    states = [{k: v for k, v in m.state_dict().items() if not (tied and k == LM_HEAD)} for m in models]

    record: dict[str, Any] = {"method": method, "inputs": [str(p) for p in paths]}
    if method == "linear":
        record["weights"] = resolve_weights(weights, len(paths))
        merged = merge_linear(states, record["weights"], names=names)
    elif method == "slerp":
        record.update(weights=None, t=t)
        merged = merge_slerp(states[0], states[1], t, names=names)
    else:
        record.update(weights=resolve_weights(weights, len(paths), normalize=False), base=str(base),
                      density=density)
        merged = merge_ties(states[0], states[1:], record["weights"], density, names=names)

    model, tokenizer = models[index], tokenizers[index]
    if tied:
        merged[LM_HEAD] = merged[EMBED]
    model.load_state_dict(merged, strict=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return save_checkpoint(out, model, tokenizer,
                           meta={"stage": "merge", "parent": str(paths[0]), "merge": record})


# --- command line ---------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="Merge checkpoints of one model: linear soup, SLERP or TIES.",
        description="Average fine-tuned checkpoints of the same model into a new checkpoint "
                    "(SmolLM3: a soup of APO checkpoints, then --weights 0.9 0.1 with the "
                    "mid-training checkpoint).",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="Checkpoint directories, Hugging Face model directories or Hub ids to merge.")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="linear: weighted average (model soup); slerp: spherical interpolation of "
                             "two checkpoints; ties: TIES-Merging of task vectors against --base.")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="One weight per checkpoint (default equal); linear normalises them to sum "
                             "to 1; ties weights sign election and mean; not for slerp.")
    parser.add_argument("--t", type=float, default=None,
                        help="slerp only: position between the two checkpoints, 0 = first, 1 = second "
                             "(default 0.5).")
    parser.add_argument("--base", default=None,
                        help="ties only (required): the checkpoint the inputs were fine-tuned from.")
    parser.add_argument("--density", type=float, default=None,
                        help="ties only: fraction of each task vector kept, largest magnitudes first "
                             "(default 0.5).")
    parser.add_argument("--out", required=True, help="Directory to write the merged checkpoint to.")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.t is not None and args.method != "slerp":
        raise SmolforgeError(f"--t is used by slerp only, not by {args.method}")
    if args.density is not None and args.method != "ties":
        raise SmolforgeError(f"--density is used by ties only, not by {args.method}")
    t = 0.5 if args.t is None else args.t
    density = 0.5 if args.density is None else args.density
    path = merge_checkpoints(args.checkpoints, args.method, args.weights, args.out, base=args.base,
                             t=t, density=density)
    from smolforge.train.checkpoint import read_meta

    record = read_meta(path)["merge"]
    if args.method == "slerp":
        detail = [f"  {p}" for p in record["inputs"]] + [f"  t={t}"]
    else:
        detail = [f"  {w:.4g} x {p}" for w, p in zip(record["weights"], record["inputs"])]
        if args.method == "ties":
            detail.append(f"  base {args.base}, density {density}")
    print("\n".join([f"merged {len(record['inputs'])} checkpoints ({args.method}) -> {path}", *detail]))
    return 0
