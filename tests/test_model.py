"""Tier 1: the model's parts against naive reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smolforge.model import (
    PRESETS,
    ModelConfig,
    MoE,
    Transformer,
    apply_rope,
    build_attention_mask,
    count_parameters,
    debug,
    rope_cos_sin,
    training_flops_per_token,
)

VOCAB = 97


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**debug().model_dump(), "vocab_size": VOCAB, **changes})


def naive_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D), one element at a time."""
    B, H, T, D = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(D // 2):
            angle = positions[0, t].item() * theta ** (-2 * i / D)
            a, b = x[..., t, i], x[..., t, i + D // 2]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + D // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def naive_attention(q, k, v, allowed):
    """Softmax attention with K/V heads repeated for GQA; `allowed` (B, T, S) bool."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def test_rope_matches_naive_rotation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 8)
    positions = torch.tensor([[0, 1, 2, 7, 3]])
    cos, sin = rope_cos_sin(positions, 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), naive_rope(x, positions, 10000.0))


def test_rope_preserves_relative_scores():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), 16, 500.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), 16, 500.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_attention_layer_matches_naive_gqa_with_document_mask(n_kv_heads):
    torch.manual_seed(0)
    cfg = tiny(n_kv_heads=n_kv_heads)
    attn = Transformer(cfg).model.layers[0].self_attn
    x = torch.randn(2, 6, cfg.hidden_size)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    cos, sin = rope_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta)
    mask = build_attention_mask(6, docs, None)
    got = attn(x, cos, sin, mask, None)

    B, T, D, H = 2, 6, cfg.resolved_head_dim, cfg.n_heads
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, n_kv_heads, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, n_kv_heads, D).transpose(1, 2)
    q, k = (torch.cat([naive_rope(t[r : r + 1], positions[r : r + 1], cfg.rope_theta) for r in range(B)])
            for t in (q, k))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal & (docs[:, :, None] == docs[:, None, :])
    want = attn.o_proj(naive_attention(q, k, v, allowed).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_packed_documents_equal_separate_runs():
    """Intra-document masking + restarted positions: a packed document sees nothing else."""
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    a, b = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 7))
    packed = torch.cat([a, b], dim=1)
    docs = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        together = model(packed, position_ids=positions, document_ids=docs).logits
        torch.testing.assert_close(together[:, :5], model(a).logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together[:, 5:], model(b).logits, atol=1e-5, rtol=1e-4)
        # Without the mask the second document attends to the first: the logits differ.
        leaky = model(packed).logits
        assert not torch.allclose(leaky[:, 5:], model(b).logits, atol=1e-3)


@pytest.mark.parametrize("changes", [{}, {"qk_norm": True}, {"nope_interval": 2},
                                     {"n_experts": 4, "experts_per_token": 2}])
def test_kv_cache_decoding_equals_full_forward(changes):
    torch.manual_seed(0)
    model = Transformer(tiny(**changes)).eval()
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, 16)
        steps = [model(x[:, :6], cache=cache).logits]
        for t in range(6, 10):
            steps.append(model(x[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_static_slot_decoding_equals_dynamic_decoding():
    """The CUDA-graph path (device-side slot, full masked buffer) gives the same logits."""
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        dynamic, static = model.new_cache(2, 16), model.new_cache(2, 16)
        want = [model(x[:, :5], cache=dynamic).logits[:, -1]]
        model(x[:, :5], cache=static)
        static.start_static_decoding()
        got = [want[0]]
        for t in range(5, 9):
            want.append(model(x[:, t : t + 1], cache=dynamic).logits[:, -1])
            got.append(model(x[:, t : t + 1], position_ids=torch.full((2, 1), t), cache=static).logits[:, -1])
            static.slot += 1
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=1e-4)


def test_left_padding_with_key_mask_equals_unpadded():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    x = torch.randint(0, VOCAB, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    key_mask = torch.tensor([[False] * 3 + [True] * 5])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        cache = model.new_cache(1, 12)
        got = model(padded, position_ids=positions, key_mask=key_mask, cache=cache).logits[:, 3:]
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, model(x).logits, atol=1e-5, rtol=1e-4)


def test_nope_layers_follow_smollm3_interval():
    cfg = tiny(n_layers=8, nope_interval=4)
    assert [i for i in range(8) if not cfg.uses_rope(i)] == [3, 7]
    assert all(tiny().uses_rope(i) for i in range(2))


def test_moe_matches_per_token_reference_and_aux_loss():
    torch.manual_seed(0)
    cfg = tiny(n_experts=4, experts_per_token=2, n_shared_experts=1)
    moe = MoE(cfg)
    x = torch.randn(3, 5, cfg.hidden_size)
    out, aux = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    probs = F.softmax(moe.gate(flat), dim=-1)
    want = torch.zeros_like(flat)
    counts = torch.zeros(4)
    for n in range(flat.shape[0]):
        top_p, top_e = probs[n].topk(2)
        top_p = top_p / top_p.sum()
        for p, e in zip(top_p, top_e):
            want[n] += p * moe.experts[int(e)](flat[n])
            counts[int(e)] += 1
        want[n] += moe.shared_experts(flat[n])
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), want, atol=1e-5, rtol=1e-4)
    fraction = counts / counts.sum()
    torch.testing.assert_close(aux, 4 * (fraction * probs.mean(0)).sum())


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": False}, {"qk_norm": True, "attention_bias": True},
                                     {"n_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 32},
                                     {"head_dim": 32}])
def test_parameter_count_matches_modules(changes):
    cfg = tiny(**changes)
    model = Transformer(cfg)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand():
    cfg = tiny()
    h, L, T = 64, 2, 16
    per_layer = 2 * h * 16 * 4 + 2 * h * 16 * 2 + 3 * h * 128  # q, o (4 heads x 16) + k, v (2 heads) + SwiGLU
    want = 6 * (L * per_layer + VOCAB * h) + 12 * L * 4 * 16 * T
    assert training_flops_per_token(cfg, T) == want


def test_presets_are_valid_and_sized_as_named():
    sizes = {name: count_parameters(fn().model_copy(update={"vocab_size": fn().vocab_size or 8192}))["total"]
             for name, fn in PRESETS.items()}
    assert 130e6 < sizes["smollm2-135m"] < 140e6
    assert 355e6 < sizes["smollm2-360m"] < 370e6
    assert 1.6e9 < sizes["smollm2-1.7b"] < 1.8e9
    assert 3.0e9 < sizes["smollm3-3b"] < 3.2e9
    assert 5e6 < sizes["smol-10m"] < 12e6
    assert 2e6 < count_parameters(PRESETS["smol-3m"]().model_copy(update={"vocab_size": 2048}))["total"] < 4e6


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": 60, "n_heads": 8}, "must divide model.hidden_size"),
    ({"n_heads": 4, "n_kv_heads": 3}, "must divide model.n_heads"),
    ({"n_experts": 2, "experts_per_token": 3}, "exceeds"),
])
def test_impossible_shapes_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_training_step_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(tiny())
    x = torch.randint(0, VOCAB, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    cfg = debug().model_copy(update={"vocab_size": 128, "n_experts": 4, "moe_intermediate_size": 32,
                                     "qk_norm": True})
    plain, checkpointed = Transformer(cfg), Transformer(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing = True
    x = torch.randint(0, 128, (2, 16))
    docs = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    losses, calls = [], []
    for model in (plain, checkpointed):
        block, count = model.model.layers[0], [0]

        def counted(*args, forward=block.forward, count=count):
            count[0] += 1  # (forward hooks are silenced during recomputation, so wrap forward)
            return forward(*args)

        block.forward = counted
        out = model(x, document_ids=docs)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        del block.forward
        losses.append(loss.detach())
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed layer ran again in the backward pass
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # inference and the KV cache take the plain path
        torch.testing.assert_close(checkpointed.eval()(x).logits, plain.eval()(x).logits, atol=0, rtol=0)
