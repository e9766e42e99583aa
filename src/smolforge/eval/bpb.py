"""Bits per byte: a tokenizer-independent validation metric.

Loss per token cannot be compared across tokenizers (a bigger vocabulary packs more text into
each token). Dividing the summed negative log-likelihood (in bits) by the number of UTF-8 bytes
the predicted tokens stand for can. Special tokens (EOS between documents) stand for no text:
like nanochat's `evaluate_bpb`, they are left out of both sums.

The `bpb` eval task (`run`) scores a text file the same way the training loop scores its
validation shards: the text is tokenized, documents joined by EOS, and cut into windows of the
model's context length that do not overlap, so every token is predicted exactly once, with
attention kept inside each document. Without a data file it reads the last 10% of the bundled
tinyshakespeare, the validation split of `smolforge quickstart`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import pre_tokenizers

from smolforge.data.loader import model_inputs, positions_and_documents
from smolforge.errors import SmolforgeError
from smolforge.train.objectives import IGNORE_INDEX, token_cross_entropy

if TYPE_CHECKING:
    from smolforge.eval.core import EvalContext, TaskResult

BUNDLED_VALIDATION = "bundled tinyshakespeare, last 10% (the quickstart's validation split)"


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


# --- the `bpb` eval task --------------------------------------------------------------------------


def text_windows(tokens: list[int], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), each (rows, seq_len): consecutive windows that predict every token but
    the first exactly once. The last window is padded, its padding labelled IGNORE_INDEX."""
    if len(tokens) < 2:
        raise ValueError("need at least two tokens")
    predicted = len(tokens) - 1
    rows = -(-predicted // seq_len)
    inputs = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    ids = torch.tensor(tokens, dtype=torch.long)
    for row in range(rows):
        start = row * seq_len
        n = min(seq_len, predicted - start)
        inputs[row, :n] = ids[start : start + n]
        labels[row, :n] = ids[start + 1 : start + 1 + n]
    return inputs, labels


def window_batches(inputs: torch.Tensor, labels: torch.Tensor, eos_id: int,
                   batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in the layout `model_inputs` reads (positions and documents restart after EOS)."""
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        positions, documents = positions_and_documents(x.numpy(), eos_id)
        yield {"input_ids": x, "labels": y, "position_ids": torch.from_numpy(positions),
               "document_ids": torch.from_numpy(documents)}


def _documents(ctx: EvalContext) -> tuple[list[str], str]:
    from smolforge.data.sources import iter_documents

    if not ctx.option("data"):
        from smolforge.quickstart import bundled_text

        text = bundled_text()
        return [text[int(len(text) * 0.9):]], BUNDLED_VALIDATION
    path = ctx.data_path()
    documents = [d for d in iter_documents(path, text_field=ctx.option("text_field", "text")) if d]
    if not documents:
        raise SmolforgeError(f"{path}: no text to score (the file is empty)")
    return documents, str(path)


def run(ctx: EvalContext) -> TaskResult:
    """Bits per byte, perplexity and mean token loss of the model on a text file."""
    from smolforge.eval.core import TaskResult

    documents, source = _documents(ctx)
    tokenizer, model = ctx.tokenizer, ctx.model
    eos = tokenizer.eos_id
    tokens: list[int] = []
    for ids in tokenizer.encode_batch(documents):
        tokens += ids + [eos]
    tokens.pop()  # nothing follows the last document
    if len(tokens) < 2:
        raise SmolforgeError(f"{source}: the text is a single token; nothing to predict")
    seq_len = int(ctx.option("seq_len", model.config.max_seq_len))
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise SmolforgeError(f"bpb: seq_len {seq_len} must be in [1, {model.config.max_seq_len}] "
                             "(the model's context length)")
    inputs, labels = text_windows(tokens, seq_len, pad_id=eos)
    inputs, labels = inputs[: ctx.limit], labels[: ctx.limit]
    start = time.perf_counter()
    metrics = evaluate_loss_and_bpb(model, window_batches(inputs, labels, eos, ctx.batch_size),
                                    token_byte_lengths(tokenizer), ctx.engine.device)
    seconds = time.perf_counter() - start
    scored = int((labels != IGNORE_INDEX).sum())
    notes = [f"{scored} tokens in {len(inputs)} windows of {seq_len}", f"data: {source}"]
    return TaskResult(task=ctx.task, n=len(inputs), seconds=seconds, notes=notes,
                      metrics={"bpb": metrics["val_bpb"], "perplexity": metrics["val_ppl"],
                               "loss": metrics["val_loss"]})
