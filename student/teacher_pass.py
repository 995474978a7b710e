"""A teacher's forward pass over a work batch, keeping only what the knowledge contract asks for.

Every task kind whose teacher reads the batch once (classifiers, taggers, sentence encoders,
language models) ships this; a translation teacher decodes first (student/task_kinds/seq2seq.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import PreTrainedModel

from polydistill.storage import wire
from polydistill.student.contract import KnowledgeRequest
from polydistill.student.losses import mean_pool


@torch.inference_mode()
def compute_knowledge(
    model: PreTrainedModel,
    work: wire.WorkBatch,
    request: KnowledgeRequest,
    *,
    teacher_id: str,
    top_k: int | None = None,
    autocast_bf16: bool = False,
) -> wire.Knowledge:
    """One forward pass of the teacher over a work batch, keeping only what ``request`` asks for.

    Features leave the device as float16 (the wire's feature dtype), which also halves the copy.
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(work.input_ids.astype(np.int64)).to(device)
    attention_mask = torch.from_numpy(work.attention_mask.astype(np.int64)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=request.needs_hidden_states,
            output_attentions=request.needs_attentions,
        )
    soft = soft_labels_on_device(outputs.logits, top_k) if request.soft else None
    hidden = {layer: _half(outputs.hidden_states[layer]) for layer in request.hidden_layers}
    attentions = {layer: _half(outputs.attentions[layer - 1]) for layer in request.attention_layers}
    embeddings = None
    if request.embeddings:
        embeddings = _half(mean_pool(outputs.hidden_states[-1].float(), attention_mask))
    return wire.Knowledge(
        work=work,
        teacher_id=teacher_id,
        soft=soft,
        hidden_states=hidden,
        attentions=attentions,
        embeddings=embeddings,
        teacher_seconds=time.perf_counter() - started,
    )


def soft_labels_on_device(logits: torch.Tensor, top_k: int | None) -> wire.SoftLabels:
    """Top-k and log-sum-exp where the logits are, so only k values per row cross to the host.

    For a 250k-piece vocabulary this turns a copy of 1 MB per token into 256 bytes per token; the
    log-sum-exp lets the student renormalise at any temperature. Computed in float32: bf16 logits
    lose the small differences between the top entries.
    """
    logits = logits.float()
    if top_k is None or top_k >= logits.shape[-1]:
        return wire.SoftLabels.full(logits.cpu().numpy())
    values, indices = torch.topk(logits, top_k, dim=-1, largest=True, sorted=True)
    return wire.SoftLabels(
        topk_values=values.cpu().numpy(),
        topk_indices=indices.to(torch.int32).cpu().numpy(),
        topk_logsumexp=torch.logsumexp(logits, dim=-1).cpu().numpy(),
    )


def _half(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float16).cpu().numpy()
