"""Translation with an encoder-decoder (its spec: cluster/task_specs/seq2seq.py).

The teacher picks the decoder's target (the reference translation, or its own beam-search output:
sequence-level distillation, Kim & Rush 2016) and, with soft_weight, ships its top-k at every target
position under teacher forcing (word-level distillation); the student's decoder learns along that
target (student/seq2seq.py builds it). Teacher and student translate the held-out sources and are
scored with chrF, BLEU beside it (student/translation_eval.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel

from polydistill.cluster.config import JobConfig
from polydistill.cluster.task_specs.seq2seq import SPEC
from polydistill.storage import wire
from polydistill.student.contract import ContractError, KnowledgeRequest
from polydistill.student.efficiency import TimedWork, count_parameters, disk_bytes, mean_tokens_per_language
from polydistill.student.lm_losses import masked_lm_ce, masked_lm_distillation_loss
from polydistill.student.losses import combine_losses
from polydistill.student.objectives import (
    Counts,
    Objective,
    StudentRunner,
    TaskHead,
    float_tensor,
    id_tensor,
    lm_loss_settings,
    missing_knowledge,
)
from polydistill.student.scoring import batch_of_sample, latency_sample
from polydistill.student.seq2seq import generated_targets, reference_targets
from polydistill.student.task_kinds.base import Costs, HeldOut, ModelUnderTest, TaskKind
from polydistill.student.teacher_pass import soft_labels_on_device
from polydistill.student.translation_eval import translate, translation_scores


@torch.inference_mode()
def translation_knowledge(model: PreTrainedModel, work: wire.WorkBatch, config: JobConfig, request: KnowledgeRequest,
                          *, teacher_id: str, autocast_bf16: bool) -> wire.Knowledge:
    """An encoder-decoder teacher on one batch: the decoder's target (distill.seq2seq_target: the reference
    translation, or the teacher's own beam-search output) and, with soft_weight, its top-k at every target
    position under teacher forcing. The contract's request has nothing to add: the config refuses features."""
    started = time.perf_counter()
    distill = config.distill
    device = next(model.parameters()).device
    input_ids = torch.from_numpy(work.input_ids.astype(np.int64)).to(device)
    attention_mask = torch.from_numpy(work.attention_mask.astype(np.int64)).to(device)
    model_config = model.config
    if distill.seq2seq_target == "teacher":
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=distill.num_beams,
                                   max_new_tokens=config.data.max_length, do_sample=False)
        labels = generated_targets(generated.cpu().numpy(), model_config.decoder_start_token_id,
                                   model_config.eos_token_id, model_config.pad_token_id)
    else:
        if work.pair_input_ids is None:
            raise wire.WireError("a seq2seq work batch carries the reference translation (pair_input_ids)")
        labels = reference_targets(work.pair_input_ids, work.pair_attention_mask, model_config.decoder_start_token_id)
    soft_labels = None
    if distill.soft_weight > 0:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       labels=torch.from_numpy(labels).to(device)).logits
        soft_labels = soft_labels_on_device(logits, distill.top_k)
    return wire.Knowledge(work=work, teacher_id=teacher_id, soft=soft_labels, target_ids=labels.astype(np.int32),
                          teacher_seconds=time.perf_counter() - started)


def target_token_labels(knowledge: wire.Knowledge, config: JobConfig) -> tuple[np.ndarray, Counts]:
    """The target the teacher chose (the reference or its beam output), to force the decoder along."""
    if knowledge.target_ids is None:
        raise ContractError(missing_knowledge(knowledge, "the decoder's target tokens", "task seq2seq"))
    return knowledge.target_ids, {}


def seq2seq_forward(run: StudentRunner, head: TaskHead, knowledge: wire.Knowledge, labels: np.ndarray) -> Tensor:
    """The decoder's logits under teacher forcing along the target tokens."""
    work = knowledge.work
    return run(head.model, work.input_ids, work.attention_mask, labels=id_tensor(labels, run.device)).logits


def seq2seq_loss(logits: Tensor, knowledge: wire.Knowledge, labels: np.ndarray,
                 head: TaskHead) -> tuple[Tensor, dict[str, float]]:
    """An encoder-decoder along the target tokens ``labels``: the teacher's top-k per target token
    (distill.lm_loss, soft_weight) and cross-entropy on the target's tokens (hard_weight; sequence-level
    distillation when the target is the teacher's own translation)."""
    distill, device = head.config.distill, logits.device
    targets = id_tensor(labels, device)
    terms: dict[str, Tensor] = {}
    if distill.soft_weight > 0:
        soft = knowledge.soft
        if soft is None or not soft.per_token or soft.kind != wire.SOFT_TOPK:
            raise ContractError(missing_knowledge(knowledge, "top-k soft labels per target token",
                                                  "distill.soft_weight"))
        terms["soft"] = masked_lm_distillation_loss(
            logits, float_tensor(soft.topk_values, device), id_tensor(soft.topk_indices, device),
            float_tensor(soft.topk_logsumexp, device), targets, **lm_loss_settings(distill))
    if distill.hard_weight > 0:
        terms["hard"] = masked_lm_ce(logits, targets)
    return combine_losses(terms, {"soft": distill.soft_weight, "hard": distill.hard_weight})


def evaluate_translations(held_out: HeldOut, tested: ModelUnderTest, reference: dict | None,
                          with_costs: bool) -> tuple[dict, Costs | None]:
    """The model translates the held-out sources; BLEU and chrF per language against the references
    (sacrebleu, on its 0-100 scale). With the costs, its size and the time to translate one sentence and 32."""
    config, model, tokenizer = held_out.config, tested.model, tested.tokenizer
    columns = held_out.split.dataset.with_format(None)
    sources, references, languages = columns["text"][:], columns["pair"][:], columns["language"][:]
    settings = {"num_beams": config.evaluation.num_beams, "max_new_tokens": config.data.max_length,
                "max_length": config.data.max_length}
    started = time.perf_counter()
    hypotheses = translate(model, tokenizer, sources, **settings)
    seconds = time.perf_counter() - started
    scores = translation_scores(hypotheses, references, languages)
    quality = {"overall": {**scores["overall"], "sentences_per_s": round(len(sources) / seconds, 2)},
               "per_language": scores["per_language"],
               "examples": [{"language": languages[i], "source": sources[i], "reference": references[i],
                             "translation": hypotheses[i]} for i in range(min(3, len(sources)))]}
    if not with_costs:
        return quality, None
    sample = latency_sample(languages)

    singles = [[sources[i]] for i in sample]
    batch = [sources[i] for i in batch_of_sample(sample)]

    def translate_each(groups: list[list[str]]) -> None:
        for texts in groups:
            translate(model, tokenizer, texts, **settings)

    encoded = tokenizer(sources, truncation=True, max_length=config.data.max_length)["input_ids"]
    source_lengths = [len(ids) for ids in encoded]
    sizes = {
        **count_parameters(model),
        "disk_bytes": disk_bytes(tested.directory),
        "latency_sample_mean_tokens": round(float(np.mean([source_lengths[i] for i in sample])), 2),
        "mean_tokens_per_row": mean_tokens_per_language(source_lengths, languages),
    }
    # Batch 1: each sampled sentence translated alone, a unit each; batch 32: the sample (cycled to 32
    # when shorter) in one call. Both include the tokenizing and decoding `translate` does.
    return quality, Costs(sizes, {"latency_ms_batch1": TimedWork(lambda: translate_each(singles), len(singles)),
                                  "latency_ms_batch32": TimedWork(lambda: translate_each([batch]))})


KIND = TaskKind(
    spec=SPEC,
    objective=Objective(labels=target_token_labels, forward=seq2seq_forward, loss=seq2seq_loss),
    evaluate=evaluate_translations,
    metric="chrF",  # BLEU beside it
    primary_score="chrf",
    teacher_knowledge=translation_knowledge,
)
