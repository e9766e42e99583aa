"""Bits per byte: a tokenizer-independent validation metric.

Loss per token cannot be compared across tokenizers (a bigger vocabulary packs more text into
each token). Dividing the summed negative log-likelihood (in bits) by the number of UTF-8 bytes
the predicted tokens stand for can. Special tokens (EOS between documents) stand for no text:
like nanochat's `evaluate_bpb`, they are left out of both sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from tokenizers import pre_tokenizers

from smolforge.data.loader import model_inputs
from smolforge.train.objectives import IGNORE_INDEX, token_cross_entropy


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 byte length of every token id; 0 for special tokens."""
    backend = tokenizer.backend
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    for token, idx in backend.get_vocab(with_added_tokens=True).items():
        if idx >= len(lengths) or token in special:
            continue
        if all(c in byte_chars for c in token):
            lengths[idx] = len(token)  # byte-level BPE: one character per byte
        else:
            lengths[idx] = len(backend.decode([idx], skip_special_tokens=False).encode("utf-8"))
    return torch.from_numpy(lengths)


@torch.no_grad()
def evaluate_loss_and_bpb(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    byte_lengths: torch.Tensor,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    document_masking: bool = True,
) -> dict[str, float]:
    """Mean token loss, perplexity and bits per byte over the batches."""
    was_training = model.training
    model.eval()
    byte_lengths = byte_lengths.to(device)
    nll_sum = tokens = 0.0
    bpb_nll = bpb_bytes = 0.0
    for batch in batches:
        batch, kwargs = model_inputs(batch, device, document_masking)
        with autocast():
            logits = model(batch["input_ids"], **kwargs).logits
        labels = batch["labels"]
        nll = token_cross_entropy(logits, labels)
        valid = labels != IGNORE_INDEX
        nll_sum += nll[valid].sum().item()
        tokens += valid.sum().item()
        nbytes = byte_lengths[labels.clamp(min=0)] * valid
        bpb_nll += (nll * (nbytes > 0)).sum().item()
        bpb_bytes += nbytes.sum().item()
    model.train(was_training)
    if tokens == 0:
        return {}
    loss = nll_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": bpb_nll / math.log(2) / max(bpb_bytes, 1.0)}
