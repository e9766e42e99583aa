"""Preference losses (smolforge.train.preference): by hand, against TRL 1.16, and end to end.

Tier 1 (units against a reference): each pure loss against its formula written out with `math`
on Python floats, and against TRL's own code run on the same log-probs:
- DPO family ("sigmoid", "robust", "ipo", "hinge", "apo_zero", "apo_down"):
  `trl.DPOTrainer._compute_loss`, called unbound with a stub `self` and a stub model whose
  per-token log-probs sum to the given sequence log-probs (reference log-probs precomputed).
  TRL 1.16's "sigmoid" ignores label_smoothing; cDPO (label_smoothing > 0) is checked against
  TRL's "aot" loss on one pair at a time, which on a batch of one is exactly cDPO (its sort is
  then the identity).
- SimPO: `trl.experimental.cpo.CPOTrainer.cpo_loss` (loss_type "simpo").
- ORPO: `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` (the odds-ratio term; our SFT term
  is the per-sequence mean NLL, see the module docstring).
- KTO: `trl.KTOTrainer._compute_loss` with a stub, including its KL estimate from mismatched
  pairs, so the clamp of z0 is checked too.
Tier 3 (behaviour): the registered objectives on a tiny `debug` Transformer.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from smolforge.config import TrainConfig
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train import preference as P
from smolforge.train.objectives import IGNORE_INDEX, get_objective

# Four pairs of summed log-probs, chosen to cover Δ > 0, Δ < 0 and a hinge past its margin.
CH = [-12.0, -3.5, -20.25, -7.0]
RJ = [-14.0, -6.0, -18.5, -9.5]
REF_CH = [-12.5, -4.0, -19.0, -7.2]
REF_RJ = [-10.0, -5.5, -19.5, -9.0]
N_CH = [6, 2, 9, 4]
N_RJ = [5, 3, 11, 4]


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def nls(x: float) -> float:
    """-log sigmoid(x), written independently of torch."""
    return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def deltas() -> list[tuple[float, float]]:
    """(chosen log-ratio, rejected log-ratio) per pair."""
    return [(c - rc, r - rr) for c, r, rc, rr in zip(CH, RJ, REF_CH, REF_RJ)]


def close(actual: torch.Tensor, expected: list[float] | torch.Tensor, atol: float = 1e-5) -> None:
    expected = t(expected) if isinstance(expected, list) else expected.float()
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=1e-6)


ARGS = (t(CH), t(RJ), t(REF_CH), t(REF_RJ))

# --- by hand ----------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_sigmoid_by_hand(eps: float) -> None:
    beta = 0.1
    expected = [(1 - eps) * nls(beta * (c - r)) + eps * nls(-beta * (c - r)) for c, r in deltas()]
    close(P.dpo_sigmoid(*ARGS, beta, eps), expected)


def test_robust_dpo_by_hand() -> None:
    beta, eps = 0.3, 0.25
    expected = [((1 - eps) * nls(beta * (c - r)) - eps * nls(-beta * (c - r))) / (1 - 2 * eps)
                for c, r in deltas()]
    close(P.robust_dpo(*ARGS, beta, eps), expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        P.robust_dpo(*ARGS, beta, 0.5)


def test_ipo_by_hand() -> None:
    beta = 0.1
    expected = [((c / nc) - (r / nr) - 1 / (2 * beta)) ** 2
                for (c, r), nc, nr in zip(deltas(), N_CH, N_RJ)]
    close(P.ipo(*ARGS, torch.tensor(N_CH), torch.tensor(N_RJ), beta), expected, atol=1e-4)


def test_hinge_by_hand() -> None:
    beta = 0.5
    expected = [max(0.0, 1 - beta * (c - r)) for c, r in deltas()]
    assert expected[0] == 0.0 and expected[1] > 0  # both sides of the hinge are exercised
    close(P.hinge(*ARGS, beta), expected)


def test_apo_by_hand() -> None:
    beta = 0.2
    zero = [(1 - sig(beta * c)) + sig(beta * r) for c, r in deltas()]
    down = [sig(beta * c) + (1 - sig(beta * (c - r))) for c, r in deltas()]
    close(P.apo_zero(*ARGS, beta), zero)
    close(P.apo_down(*ARGS, beta), down)


def test_simpo_by_hand() -> None:
    beta, gamma = 2.0, 0.5
    expected = [nls(beta * (c / nc - r / nr) - gamma) for c, r, nc, nr in zip(CH, RJ, N_CH, N_RJ)]
    close(P.simpo(t(CH) / t(N_CH), t(RJ) / t(N_RJ), beta, gamma), expected)


def test_orpo_by_hand() -> None:
    lam = 0.1
    avg_c = [c / n for c, n in zip(CH, N_CH)]
    avg_r = [r / n for r, n in zip(RJ, N_RJ)]
    # odds(p) = p / (1 - p) with p the length-averaged probability exp(mean log-prob)
    log_odds = [math.log(math.exp(a) / (1 - math.exp(a))) - math.log(math.exp(b) / (1 - math.exp(b)))
                for a, b in zip(avg_c, avg_r)]
    expected = [-a + lam * nls(lo) for a, lo in zip(avg_c, log_odds)]
    losses, got_log_odds = P.orpo(t(avg_c), t(avg_r), lam)
    close(losses, expected)
    close(got_log_odds, log_odds)


@pytest.mark.parametrize("kl", [0.0, 1.5, -2.0])
def test_kto_by_hand(kl: float) -> None:
    beta, wd, wu = 0.1, 1.0, 1.33
    logps, ref = CH + RJ, REF_CH + REF_RJ
    desirable = [True, False, True, True, False, False, True, False]
    z0 = max(kl, 0.0)
    expected = [wd * (1 - sig(beta * ((x - y) - z0))) if d else wu * (1 - sig(beta * (z0 - (x - y))))
                for x, y, d in zip(logps, ref, desirable)]
    close(P.kto(t(logps), t(ref), torch.tensor(desirable), beta, torch.tensor(kl), wd, wu), expected)


def test_sequence_logps_against_naive_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    expected, counts = [], []
    for b in range(3):
        total, n = 0.0, 0
        for pos in range(7):
            if labels[b, pos] != IGNORE_INDEX:
                total += torch.log_softmax(logits[b, pos].double(), -1)[labels[b, pos]].item()
                n += 1
        expected.append(total)
        counts.append(n)
    logps, n_tokens = P.sequence_logps(logits, labels)
    close(logps, expected)
    assert n_tokens.tolist() == counts == [4, 5, 0]
    # bf16 logits (autocast) still give fp32 sums
    assert P.sequence_logps(logits.bfloat16(), labels)[0].dtype == torch.float32


# --- against TRL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_mod() -> SimpleNamespace:
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        from trl import DPOTrainer, KTOTrainer
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
        from trl.experimental.orpo.orpo_trainer import log1mexp
    return SimpleNamespace(DPOTrainer=DPOTrainer, KTOTrainer=KTOTrainer, CPOTrainer=CPOTrainer,
                           ORPOTrainer=ORPOTrainer, log1mexp=log1mexp)


def _accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _fake_lm(per_row_logps: torch.Tensor, width: int) -> SimpleNamespace:
    """What TRL's fused-LM-head forward returns, with per-token log-probs summing to the given
    sequence log-probs (all of it in the first slot)."""
    rows = per_row_logps.shape[0]
    log_probs = torch.zeros(rows, width)
    log_probs[:, 0] = per_row_logps
    return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(rows, width),
                           mean_logits=torch.zeros(rows, width),
                           is_top1=torch.zeros(rows, width, dtype=torch.bool))


def _completion_mask(n_tokens: torch.Tensor, T: int) -> torch.Tensor:
    pos = torch.arange(T)[None]
    return ((pos >= 1) & (pos < 1 + n_tokens[:, None])).long()  # n tokens after a 1-token prompt


def trl_dpo(trl_mod: SimpleNamespace, loss_type: str, chosen: torch.Tensor, rejected: torch.Tensor,
            ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
            n_chosen: torch.Tensor | None = None,
            n_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's DPOTrainer._compute_loss on these log-probs: (mean loss, its logged metrics)."""
    B = chosen.shape[0]
    n_tokens = torch.cat([n_chosen if n_chosen is not None else torch.ones(B, dtype=torch.long),
                          n_rejected if n_rejected is not None else torch.ones(B, dtype=torch.long)])
    T = int(n_tokens.max()) + 2
    out = _fake_lm(torch.cat([chosen, rejected]), T - 1)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": _completion_mask(n_tokens, T),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl_mod.DPOTrainer._compute_loss(stub, lambda **_: out, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def trl_dpo_per_pair(trl_mod: SimpleNamespace, loss_type: str, beta: float, eps: float = 0.0) -> torch.Tensor:
    """Per-pair TRL losses: one batch of one pair at a time."""
    n_ch, n_rj = torch.tensor(N_CH), torch.tensor(N_RJ)
    return torch.stack([
        trl_dpo(trl_mod, loss_type, *(x[i : i + 1] for x in ARGS), beta, eps, n_ch[i : i + 1], n_rj[i : i + 1])[0]
        for i in range(len(CH))])


REFERENCE_LOSSES = {  # TRL loss_type -> ours, with the same (beta, label_smoothing) arguments
    "sigmoid": lambda b, e: P.dpo_sigmoid(*ARGS, b, e),
    "robust": lambda b, e: P.robust_dpo(*ARGS, b, e),
    "ipo": lambda b, e: P.ipo(*ARGS, torch.tensor(N_CH), torch.tensor(N_RJ), b),
    "hinge": lambda b, e: P.hinge(*ARGS, b),
    "apo_zero": lambda b, e: P.apo_zero(*ARGS, b),
    "apo_down": lambda b, e: P.apo_down(*ARGS, b),
}


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", sorted(REFERENCE_LOSSES))
def test_reference_losses_match_trl(trl_mod: SimpleNamespace, loss_type: str, beta: float) -> None:
    eps = 0.2 if loss_type == "robust" else 0.0
    ours = REFERENCE_LOSSES[loss_type](beta, eps)
    close(ours, trl_dpo_per_pair(trl_mod, loss_type, beta, eps), atol=1e-5)
    # The batch mean and the logged metrics, on the whole batch at once.
    loss, trl_metrics = trl_dpo(trl_mod, loss_type, *ARGS, beta, eps, torch.tensor(N_CH), torch.tensor(N_RJ))
    close(ours.mean(), loss)
    metrics = P.reward_metrics(beta * (t(CH) - t(REF_CH)), beta * (t(RJ) - t(REF_RJ)), t(CH), t(RJ))
    for key, value in metrics.items():
        assert value.item() == pytest.approx(trl_metrics[key], abs=1e-5), key


def test_cdpo_label_smoothing_matches_trl_aot_on_single_pairs(trl_mod: SimpleNamespace) -> None:
    beta, eps = 0.3, 0.15
    close(P.dpo_sigmoid(*ARGS, beta, eps), trl_dpo_per_pair(trl_mod, "aot", beta, eps))
    # ...and TRL 1.16's "sigmoid" is our eps = 0 whatever label_smoothing it is given.
    close(P.dpo_sigmoid(*ARGS, beta, 0.0), trl_dpo_per_pair(trl_mod, "sigmoid", beta, eps))


@pytest.mark.parametrize("beta,gamma", [(0.1, 0.5), (2.0, 1.0)])
def test_simpo_matches_trl_cpo(trl_mod: SimpleNamespace, beta: float, gamma: float) -> None:
    chosen, rejected = t(CH) / t(N_CH), t(RJ) / t(N_RJ)
    stub = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0,
                           loss_type="simpo", accelerator=_accelerator())
    losses, chosen_rewards, rejected_rewards = trl_mod.CPOTrainer.cpo_loss(stub, chosen, rejected)
    close(P.simpo(chosen, rejected, beta, gamma), losses)
    close(beta * chosen, chosen_rewards)  # the rewards simpo_objective logs
    close(beta * rejected, rejected_rewards)


def test_orpo_matches_trl(trl_mod: SimpleNamespace) -> None:
    lam = 0.25
    chosen, rejected = t(CH) / t(N_CH), t(RJ) / t(N_RJ)
    stub = SimpleNamespace(beta=lam, accelerator=_accelerator())
    trl_losses, _, _, log_odds_ratio, log_odds_chosen = trl_mod.ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)
    losses, log_odds = P.orpo(chosen, rejected, lam)
    # TRL's total is nll - mean(trl_losses); with the per-sequence NLL -chosen it matches per pair.
    close(losses, -chosen - trl_losses)
    close(log_odds.mean(), log_odds_chosen)
    close(F.logsigmoid(log_odds).mean(), log_odds_ratio)
    x = torch.tensor([-1e-6, -0.1, -0.69, -0.7, -5.0, -40.0])
    close(P.log1mexp(x), trl_mod.log1mexp(x))


def trl_kto(trl_mod: SimpleNamespace, logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor,
            kl_logps: torch.Tensor | None, ref_kl_logps: torch.Tensor | None, beta: float, wd: float,
            wu: float) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's KTOTrainer._compute_loss on these log-probs (KL term from mismatched-pair log-probs)."""
    N, T = logps.shape[0], 3
    main, kl_out = _fake_lm(logps, T - 1), None
    kl_ids = torch.ones(N, T, dtype=torch.long)
    if kl_logps is not None:
        kl_out = _fake_lm(kl_logps, T - 1)

    def model(**kwargs: torch.Tensor) -> SimpleNamespace:
        return kl_out if kwargs["input_ids"] is kl_ids else main

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), precompute_ref_logps=True,
        calculate_KL=kl_logps is not None, loss_type="kto", beta=beta, desirable_weight=wd,
        undesirable_weight=wu, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = lambda m, b: trl_mod.KTOTrainer._compute_kl_logps(stub, m, b)
    batch = {"input_ids": torch.zeros(N, T, dtype=torch.long), "attention_mask": torch.ones(N, T, dtype=torch.long),
             "completion_mask": torch.tensor([[0, 1, 0]] * N), "label": desirable, "ref_logps": ref}
    if kl_logps is not None:
        batch.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones(N, T, dtype=torch.long),
                     KL_completion_mask=torch.tensor([[0, 1, 0]] * N), ref_KL_logps=ref_kl_logps)
    loss = trl_mod.KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("kl_shift", [None, 3.0, -3.0])  # no KL term, z0 > 0, z0 clamped to 0
def test_kto_matches_trl(trl_mod: SimpleNamespace, kl_shift: float | None) -> None:
    beta, wd, wu = 0.1, 1.0, 1.5
    logps, ref = t(CH + RJ), t(REF_CH + REF_RJ)
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    kl_logps = ref_kl = None
    kl = torch.tensor(0.0)
    if kl_shift is not None:
        kl_logps = logps.flip(0) + kl_shift
        ref_kl = ref.flip(0) - torch.linspace(-1, 1, 8)
        kl = (kl_logps - ref_kl).mean()
    ours = P.kto(logps, ref, desirable, beta, kl, wd, wu)
    for i in range(8):  # one row at a time gives TRL's per-example losses (same KL batch)
        loss, _ = trl_kto(trl_mod, logps[i : i + 1], ref[i : i + 1], desirable[i : i + 1],
                          kl_logps, ref_kl, beta, wd, wu)
        close(ours[i], loss)
    loss, trl_metrics = trl_kto(trl_mod, logps, ref, desirable, kl_logps, ref_kl, beta, wd, wu)
    close(ours.mean(), loss)
    assert trl_metrics["kl"] == pytest.approx(max(float(kl), 0.0), abs=1e-6)


# --- registered objectives on a tiny Transformer ----------------------------------------------

VOCAB = 64
REFERENCE_NAMES = ["dpo", "robust", "ipo", "hinge", "apo_zero", "apo_down"]
PAIR_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"}


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB}))


def pair_batch(pairs: int = 2, T: int = 14, seed: int = 0) -> dict[str, torch.Tensor]:
    """[chosen; rejected] rows sharing a prompt per pair, responses of different lengths, padded."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(2 * pairs, T, dtype=torch.long)
    labels = torch.full((2 * pairs, T), IGNORE_INDEX)
    for i in range(pairs):
        prompt = torch.randint(1, VOCAB, (3 + i,), generator=g)
        for row, n in ((i, 4 + 2 * i), (pairs + i, 6 - i)):
            seq = torch.cat([prompt, torch.randint(1, VOCAB, (n,), generator=g)])
            input_ids[row, : len(seq)] = seq
            labels[row, len(prompt) - 1 : len(seq) - 1] = seq[len(prompt):]  # shifted: target of logits[t]
    return {"input_ids": input_ids, "labels": labels}


def own_logps(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return P.reference_logps(model, batch["input_ids"], batch["labels"])


def naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.float(), -1)
    mask = labels != IGNORE_INDEX
    tok = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    return tok.sum(-1), mask.sum(-1)


@pytest.mark.parametrize("name,expected", [
    ("dpo", math.log(2)), ("robust", math.log(2)), ("ipo", 1 / (4 * 0.1**2)), ("hinge", 1.0),
    ("apo_zero", 1.0), ("apo_down", 1.0)])
def test_reference_objectives_at_init(model: Transformer, name: str, expected: float) -> None:
    """With the policy as its own reference every log-ratio is 0: the loss is a known constant."""
    cfg = TrainConfig(beta=0.1, label_smoothing=0.2 if name == "robust" else 0.0)
    batch = pair_batch()
    batch["ref_logps"] = own_logps(model, batch)
    model.zero_grad(set_to_none=True)
    loss, metrics = get_objective(name)(model(batch["input_ids"]), batch, cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert PAIR_KEYS <= metrics.keys()
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())
    assert metrics["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-5)
    assert metrics["rewards/accuracies"].item() == 0.0


@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_reference_objectives_split_chosen_then_rejected(model: Transformer, name: str) -> None:
    """Off the init point, the objective equals the pure loss on rows [0, B) vs [B, 2B)."""
    cfg = TrainConfig(beta=0.5)
    batch = pair_batch(pairs=3, seed=1)
    batch["ref_logps"] = own_logps(model, batch) + torch.tensor([0.3, -0.2, 0.1, -0.4, 0.5, 0.0])
    with torch.no_grad():
        output = model(batch["input_ids"])
        loss, metrics = get_objective(name)(output, batch, cfg)
    logps, n = naive_logps(output.logits, batch["labels"])
    (c, r), (rc, rr), (nc, nr) = logps.chunk(2), batch["ref_logps"].chunk(2), n.chunk(2)
    expected = P.dpo_sigmoid(c, r, rc, rr, 0.5) if name == "dpo" else P.ipo(c, r, rc, rr, nc, nr, 0.5)
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-5)
    assert metrics["logps/chosen"].item() == pytest.approx(c.mean().item(), abs=1e-4)
    assert metrics["rewards/margins"].item() == pytest.approx((0.5 * ((c - rc) - (r - rr))).mean().item(), abs=1e-5)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_objectives(model: Transformer, name: str) -> None:
    cfg = TrainConfig(beta=2.0, simpo_gamma=0.5, orpo_lambda=0.1)
    batch = pair_batch(seed=2)
    model.zero_grad(set_to_none=True)
    output = model(batch["input_ids"])
    loss, metrics = get_objective(name)(output, batch, cfg)  # no ref_logps needed
    logps, n = naive_logps(output.logits.detach(), batch["labels"])
    avg_c, avg_r = (logps / n).chunk(2)
    if name == "simpo":
        expected = P.simpo(avg_c, avg_r, 2.0, 0.5).mean()
    else:
        expected = P.orpo(avg_c, avg_r, 0.1)[0].mean()
        assert {"nll", "log_odds_ratio", "log_odds_chosen"} <= metrics.keys()
        # nll: mean over chosen rows of each response's mean token cross-entropy
        B = batch["labels"].shape[0] // 2
        ce = [F.cross_entropy(output.logits[i].detach(), batch["labels"][i], ignore_index=IGNORE_INDEX)
              for i in range(B)]
        assert metrics["nll"].item() == pytest.approx(torch.stack(ce).mean().item(), abs=1e-5)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert PAIR_KEYS <= metrics.keys()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_kto_objective(model: Transformer) -> None:
    cfg = TrainConfig(beta=0.1, kto_undesirable_weight=2.0)
    batch = pair_batch(seed=3)  # used as 4 unpaired rows
    batch["ref_logps"] = own_logps(model, batch)
    batch["kto_desirable"] = torch.tensor([True, False, True, False])
    model.zero_grad(set_to_none=True)
    loss, metrics = get_objective("kto")(model(batch["input_ids"]), batch, cfg)
    assert loss.item() == pytest.approx((2 * 0.5 + 2 * 2.0 * 0.5) / 4, abs=1e-6)  # all ratios 0, z0 = 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= metrics.keys()
    with torch.no_grad():
        batch["kto_kl"] = torch.tensor(0.4)
        loss, metrics = get_objective("kto")(model(batch["input_ids"]), batch, cfg)
        expected = (2 * (1 - sig(-0.04)) + 2 * 2.0 * (1 - sig(0.04))) / 4
        assert loss.item() == pytest.approx(expected, abs=1e-6)
        assert metrics["kl"].item() == pytest.approx(0.4)
        batch["kto_kl"] = torch.tensor(-0.4)  # clamped: z0 = 0
        assert get_objective("kto")(model(batch["input_ids"]), batch, cfg)[0].item() == pytest.approx(0.75, abs=1e-6)
        batch["kto_desirable"] = torch.ones(4, dtype=torch.bool)  # one side only: no rejected metrics
        metrics = get_objective("kto")(model(batch["input_ids"]), batch, cfg)[1]
        assert "rewards/chosen" in metrics and "rewards/rejected" not in metrics


@pytest.mark.parametrize("name", [*REFERENCE_NAMES, "kto"])
def test_missing_ref_logps_is_a_clear_error(model: Transformer, name: str) -> None:
    batch = pair_batch()
    batch["kto_desirable"] = torch.tensor([True, False, True, False])
    with torch.no_grad():
        output = model(batch["input_ids"])
    with pytest.raises(SmolforgeError, match=rf"'{name}'.*ref_logps"):
        get_objective(name)(output, batch, TrainConfig())
    batch["ref_logps"] = torch.zeros(3)
    with pytest.raises(SmolforgeError, match=r"shape \(3,\), expected \(4,\)"):
        get_objective(name)(output, batch, TrainConfig())


def test_malformed_batches_are_clear_errors(model: Transformer) -> None:
    batch = pair_batch()
    with torch.no_grad():
        output = model(batch["input_ids"][:3])
    odd = {"input_ids": batch["input_ids"][:3], "labels": batch["labels"][:3]}
    with pytest.raises(SmolforgeError, match="even number of rows"):
        get_objective("simpo")(output, odd, TrainConfig())
    odd["ref_logps"] = torch.zeros(3)
    with pytest.raises(SmolforgeError, match="kto_desirable"):
        get_objective("kto")(output, odd, TrainConfig())
