"""train.attention (sdpa / flex / flash) and train.liger: the fused kernels against the reference paths.

On the CPU: cu_seqlens construction, FlexAttention (torch's eager reference implementation)
against SDPA's dense-mask path, the fallbacks, the model's hidden-state output and every refusal.
CUDA-only (skipped without a GPU, or without the optional package): the compiled FlexAttention
kernel, flash-attn's varlen kernel and Liger's fused linear cross-entropy against the plain path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import smolforge.model as modeling
from smolforge.config import load_recipe
from smolforge.data.loader import positions_and_documents
from smolforge.errors import SmolforgeError
from smolforge.kernels import (
    check_liger,
    flash_available,
    flex_available,
    liger_available,
    resolve_attention,
    varlen_cu_seqlens,
)
from smolforge.model import Transformer, debug
from smolforge.train.loop import train
from smolforge.train.objectives import lm

VOCAB = 128
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_flex = pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")


def model_pair(**changes) -> tuple[Transformer, Transformer]:
    """Two copies of one debug model: the SDPA reference and the one under test."""
    cfg = debug().model_copy(update={"vocab_size": VOCAB, **changes})
    ref = Transformer(cfg)
    other = Transformer(cfg)
    other.load_state_dict(ref.state_dict())
    return ref, other


def packed_batch(B: int, T: int, seed: int = 0, eos: int = 1) -> dict[str, torch.Tensor]:
    """Rows of several documents of random lengths (EOS-separated, as the pretraining loader
    makes them), with position ids restarting at each document; the last row is one document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, size=(B, T))
    for row in range(B - 1):
        for cut in rng.choice(np.arange(1, T - 1), size=3, replace=False):
            tokens[row, cut] = eos
    positions, documents = positions_and_documents(tokens, eos)
    return {"input_ids": torch.from_numpy(tokens), "position_ids": torch.from_numpy(positions),
            "document_ids": torch.from_numpy(documents)}


def brute_force_cu_seqlens(document_ids: torch.Tensor) -> list[int]:
    starts, offset = [], 0
    for row in document_ids.tolist():
        for t, doc in enumerate(row):
            if t == 0 or doc != row[t - 1]:
                starts.append(offset + t)
        offset += len(row)
    return starts + [offset]


# --- flash-attn varlen: the pure part ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_varlen_cu_seqlens_matches_a_brute_force_count(seed):
    rng = np.random.default_rng(seed)
    B, T = int(rng.integers(1, 5)), int(rng.integers(1, 40))
    # Document ids as the packers write them: non-decreasing runs from 0 in each row.
    docs = torch.from_numpy(np.cumsum(rng.random((B, T)) < 0.2, axis=1))
    cu, longest = varlen_cu_seqlens(docs)
    want = brute_force_cu_seqlens(docs)
    assert cu.dtype == torch.int32
    assert cu.tolist() == want
    assert longest == max(b - a for a, b in zip(want, want[1:]))


def test_varlen_cu_seqlens_splits_rows_and_single_tokens():
    # Row 1 continues document 0's id from row 0: still a new sequence. Row 2: one-token documents.
    docs = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 2, 3]])
    cu, longest = varlen_cu_seqlens(docs)
    assert cu.tolist() == [0, 2, 4, 8, 9, 10, 11, 12]
    assert longest == 4


# --- FlexAttention on the CPU: torch's eager reference implementation ---------------------------


# Eager flex_attention warns that it is unfused (the reason it is compiled on CUDA).
quiet_flex = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@needs_flex
@quiet_flex
@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4, "qk_norm": True},
                                     {"nope_interval": 2}])
def test_flex_logits_equal_the_sdpa_masked_path(changes):
    torch.manual_seed(0)
    ref, flex = model_pair(**changes)
    flex.attention_backend = "flex"
    batch = packed_batch(3, 50)  # 50: not a multiple of flex's 128-token blocks
    kwargs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]}
    with torch.no_grad():
        want = ref.eval()(batch["input_ids"], **kwargs).logits
        got = flex.eval()(batch["input_ids"], **kwargs).logits
        # The mask matters on this batch: without it the logits differ.
        leaky = ref(batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky, want, atol=1e-3)


@needs_flex
@quiet_flex
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flex_gradients_equal_the_sdpa_masked_path(checkpointing, monkeypatch):
    """torch 2.13 refuses a CPU backward through flex_attention in a front-end guard, but its
    eager path (a dense reference, with a dense reference backward) is device-agnostic. Lifting
    the guard checks what smolforge owns, on the CPU: the BlockMask from document_ids, GQA and
    the activation-checkpointing recomputation. The fused kernels themselves are checked by the
    CUDA test below."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    torch.manual_seed(0)
    ref, flex = model_pair(n_experts=4, moe_intermediate_size=32)  # GQA 4/2 and an aux loss
    flex.attention_backend = "flex"
    ref.activation_checkpointing = flex.activation_checkpointing = checkpointing
    batch = packed_batch(2, 40, seed=1)
    kwargs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]}
    labels = torch.roll(batch["input_ids"], -1, dims=1)
    losses = []
    for model in (ref, flex):
        out = model.train()(batch["input_ids"], **kwargs)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten()) + out.aux_loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    for (name, a), (_, b) in zip(ref.named_parameters(), flex.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)


@needs_flex
@quiet_flex
def test_flex_traces_into_one_graph_under_train_compile():
    """train.compile + flex: dynamo traces the BlockMask construction and flex_attention inside
    the model's graph (no break, no nested compile); forward only on the CPU."""
    torch.manual_seed(0)
    ref, flex = model_pair()
    flex.attention_backend = "flex"
    batch = packed_batch(2, 64, seed=2)
    kwargs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]}
    compiled = torch.compile(flex.eval(), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch["input_ids"], **kwargs).logits,
                                   ref.eval()(batch["input_ids"], **kwargs).logits, atol=1e-5, rtol=1e-4)


def test_kernels_are_only_used_for_document_masked_full_sequences(monkeypatch):
    """No document_ids, a key mask or a KV cache: SDPA, whatever the backend switch says."""
    def refuse(backend, document_ids):
        raise AssertionError(f"{backend} kernel used")

    monkeypatch.setattr(modeling, "document_attention", refuse)
    torch.manual_seed(0)
    ref, model = model_pair()
    model.attention_backend = "flex"
    batch = packed_batch(2, 12)
    x, docs = batch["input_ids"], batch["document_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=0, rtol=0)
        key_mask = torch.ones(2, 12, dtype=torch.bool)
        key_mask[0, :3] = False
        torch.testing.assert_close(model(x, document_ids=docs, key_mask=key_mask).logits,
                                   ref(x, document_ids=docs, key_mask=key_mask).logits, atol=0, rtol=0)
        model(x, document_ids=docs, cache=model.new_cache(2, 16))
        with pytest.raises(AssertionError, match="flex kernel used"):  # the switch is live otherwise
            model(x, document_ids=docs)


# --- train.liger: the model's side (the fused loss itself needs CUDA) ---------------------------


def test_return_hidden_gives_the_lm_head_input_in_training_only():
    torch.manual_seed(0)
    ref, model = model_pair(tie_embeddings=False)
    model.return_hidden = True
    batch = packed_batch(2, 16)
    out = model.train()(batch["input_ids"], document_ids=batch["document_ids"])
    assert out.logits is None and out.head_weight is model.lm_head.weight
    want = ref.train()(batch["input_ids"], document_ids=batch["document_ids"]).logits
    torch.testing.assert_close(out.hidden @ out.head_weight.T, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # evaluation and generation still get logits
        assert model.eval()(batch["input_ids"]).logits is not None


# --- refusals ----------------------------------------------------------------------------------


def test_resolve_attention(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, True, False) == "sdpa"  # SDPA is the CPU default
    assert resolve_attention("sdpa", cuda, True, True) == "sdpa"
    assert resolve_attention("auto", cuda, False, True) == "sdpa"  # nothing to mask
    assert resolve_attention("auto", cuda, True, True) == ("flex" if flex_available() else "sdpa")
    for name in ("flex", "flash"):
        with pytest.raises(SmolforgeError, match=f"train.attention: {name} needs a CUDA device"):
            resolve_attention(name, cpu, True, False)
    monkeypatch.setattr("smolforge.kernels.flash_available", lambda: False)
    with pytest.raises(SmolforgeError, match=r"pip install 'smolforge\[flash\]'"):
        resolve_attention("flash", cuda, True, True)
    monkeypatch.setattr("smolforge.kernels.flash_available", lambda: True)
    assert resolve_attention("flash", cuda, True, True) == "flash"
    with pytest.raises(SmolforgeError, match="bf16/fp16 only"):
        resolve_attention("flash", cuda, True, False)
    monkeypatch.setattr("smolforge.kernels.flex_available", lambda: False)
    with pytest.raises(SmolforgeError, match="FlexAttention"):
        resolve_attention("flex", cuda, True, True)
    assert resolve_attention("auto", cuda, True, True) == "sdpa"


def test_liger_refusals(monkeypatch):
    with pytest.raises(SmolforgeError, match="train.liger needs a CUDA device"):
        check_liger(torch.device("cpu"))
    monkeypatch.setattr("smolforge.kernels.liger_available", lambda: False)
    with pytest.raises(SmolforgeError, match=r"pip install 'smolforge\[liger\]'"):
        check_liger(torch.device("cuda"))
    with pytest.raises((ValidationError, SmolforgeError), match="needs the logits"):
        load_recipe(None, {"train.liger": True, "train.objective": "dpo"})
    with pytest.raises((ValidationError, SmolforgeError), match="fsdp2"):
        load_recipe(None, {"train.liger": True, "train.parallel": "fsdp2"})


def recipe_for(prepared, run_dir, **train_overrides):
    overrides = {"run.dir": str(run_dir), "run.name": "tiny", "model.preset": "debug",
                 "data.tokenizer": str(prepared / "tok"), "data.train": [{"path": str(prepared / "train")}],
                 "data.val": [{"path": str(prepared / "val")}], "data.seq_len": 64,
                 "train.batch_size": 4, "train.max_steps": 3, "train.lr": 3e-3, "train.warmup_steps": 1,
                 "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0, "train.threads": 1}
    overrides.update({f"train.{k}": v for k, v in train_overrides.items()})
    return load_recipe(None, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
@pytest.mark.parametrize(("option", "message"), [({"attention": "flex"}, "train.attention: flex needs a CUDA"),
                                                 ({"attention": "flash"}, "train.attention: flash needs a CUDA"),
                                                 ({"liger": True}, "train.liger needs a CUDA")])
def test_training_refuses_cuda_kernels_on_the_cpu_before_any_step(prepared, tmp_path, option, message):
    with pytest.raises(SmolforgeError, match=message):
        train(recipe_for(prepared, tmp_path, **option))
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


# --- CUDA: the real kernels ---------------------------------------------------------------------


def grads_after(model: Transformer, batch: dict[str, torch.Tensor], dtype: torch.dtype | None) -> tuple:
    """(logits, loss, {name: grad}) of one forward + backward on the GPU, under autocast if dtype."""
    kwargs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]}
    labels = torch.roll(batch["input_ids"], -1, dims=1)
    with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model.train()(batch["input_ids"], **kwargs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    return logits.detach().float(), loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


def cuda_batch(B: int, T: int) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in packed_batch(B, T, seed=3).items()}


@cuda_only
@needs_flex
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_flex_on_cuda_equals_sdpa(checkpointing):
    torch.manual_seed(0)
    ref, flex = (m.cuda() for m in model_pair(n_kv_heads=1))
    flex.attention_backend = "flex"
    ref.activation_checkpointing = flex.activation_checkpointing = checkpointing
    batch = cuda_batch(4, 256)
    want, got = grads_after(ref, batch, None), grads_after(flex, batch, None)
    torch.testing.assert_close(got[0], want[0], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=1e-4, rtol=1e-2, msg=name)


@cuda_only
@pytest.mark.skipif(not flash_available(), reason="flash-attn is not installed")
def test_flash_varlen_on_cuda_equals_sdpa():
    torch.manual_seed(0)
    ref, flash = (m.cuda() for m in model_pair(n_kv_heads=2))
    flash.attention_backend = "flash"
    batch = cuda_batch(4, 256)
    want, got = grads_after(ref, batch, torch.bfloat16), grads_after(flash, batch, torch.bfloat16)
    torch.testing.assert_close(got[0], want[0], atol=3e-2, rtol=3e-2)  # two bf16 kernels
    torch.testing.assert_close(got[1], want[1], atol=1e-3, rtol=1e-3)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], atol=2e-3, rtol=5e-2, msg=name)


@cuda_only
@pytest.mark.skipif(not liger_available(), reason="liger-kernel is not installed")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_liger_fused_loss_equals_the_plain_lm_objective(dtype):
    torch.manual_seed(0)
    ref, fused = (m.cuda() for m in model_pair(tie_embeddings=True))
    fused.return_hidden = True
    batch = cuda_batch(4, 128)
    batch["labels"] = torch.roll(batch["input_ids"], -1, dims=1)
    batch["labels"][:, :10] = -100  # unlabelled tokens (a prompt) are ignored by both
    cfg = load_recipe(None, {"train.z_loss": 1e-4}).train
    results = []
    for model in (ref, fused):
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model.train()(batch["input_ids"], document_ids=batch["document_ids"],
                                position_ids=batch["position_ids"])
        loss, metrics = lm(out, batch, cfg)
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.float() for n, p in model.named_parameters()}))
    (want, want_m, want_g), (got, got_m, got_g) = results
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype is None else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_m["ce"], want_m["ce"], **tol)
    torch.testing.assert_close(got_m["z_loss"].float(), want_m["z_loss"], **tol)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], atol=1e-4 if dtype is None else 5e-3,
                                   rtol=1e-3 if dtype is None else 5e-2, msg=name)


@cuda_only
@needs_flex
@pytest.mark.skipif(not liger_available(), reason="liger-kernel is not installed")
def test_training_with_flex_and_liger_on_cuda_follows_the_plain_loop(prepared, tmp_path):
    import json

    losses = []
    for name, options in (("plain", {"attention": "sdpa"}), ("fast", {"attention": "flex", "liger": True})):
        result = train(recipe_for(prepared, tmp_path / name, device="cuda", **options))
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if "loss" in r])
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
