"""Distillation losses as pure tensor functions.

Every function takes tensors and keyword options and returns a scalar tensor; nothing here
reads config, holds state (except the learned `HiddenProjection`) or moves data between
devices. Padding is handled in one place: every input first goes through `select_valid`,
which replaces the positions a mask leaves out before any arithmetic (so NaN or inf there
reaches neither the loss nor a gradient), and per-position values reduce through
`masked_mean`, which gives 0 rather than NaN when nothing counts.

Shape conventions: ``n`` samples, ``L`` tokens, ``C`` classes (or vocabulary), ``d`` width,
``H`` heads. Logit losses accept ``[n, C]`` (sequence classification) or ``[n, L, C]``
(token level); a mask, when given, has the leading shape (``[n]`` or ``[n, L]``), and any
non-zero / True entry means "count this position".

Logit losses compute in float32 (or wider, if given wider) because bf16/fp16 log-softmax
over a large vocabulary loses the small probabilities that carry the "dark knowledge".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DistanceKind = Literal["mse", "cosine"]


# --------------------------------------------------------------------------- helpers


def _positions_kept(mask: Tensor, values: Tensor) -> Tensor:
    """`mask` as booleans expanded to the shape of `values`.

    A mask with as many dimensions as `values` broadcasts as usual (``[n, L, 1]`` against
    ``[n, L, d]``); one with fewer names the leading dimensions (``[n, L]`` against
    ``[n, L, C]``), the shape every loss here receives.
    """
    keep = mask.to(torch.bool)
    if keep.dim() < values.dim() and keep.shape == values.shape[: keep.dim()]:
        keep = keep.reshape(keep.shape + (1,) * (values.dim() - keep.dim()))
    try:
        return keep.expand_as(values)
    except RuntimeError as error:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to values of shape "
            f"{tuple(values.shape)}"
        ) from error


def select_valid(values: Tensor, mask: Tensor | None, *, fill: float = 0.0) -> Tensor:
    """`values` with every position that `mask` leaves out replaced by `fill`.

    Every loss passes its inputs through here before any arithmetic. Padding may hold
    anything (fp16 overflow, uninitialised memory on the wire, a student's inf at a position
    that does not count), and multiplying by the mask does not contain it: the backward pass
    still multiplies a zero gradient by derivatives taken at the garbage, and 0 · NaN or
    0 · inf is NaN. Selecting first means no later operation ever reads the garbage, and the
    gradient flowing back into a left-out position is exactly 0. `fill` is a stand-in chosen
    by each loss so that its value and derivatives there are finite; the reduction
    (`masked_mean`) then drops those positions.
    """
    if mask is None:
        return values
    stand_in = torch.full((), fill, dtype=values.dtype, device=values.device)
    return torch.where(_positions_kept(mask, values), values, stand_in)


def masked_mean(values: Tensor, mask: Tensor | None = None, *, dim: int | None = None) -> Tensor:
    """Mean of `values` over the positions where `mask` is non-zero.

    `mask` follows `select_valid`'s shape rule (e.g. ``[n, L, 1]`` against ``[n, L, d]``).
    With ``dim=None`` the result is a scalar; otherwise the mean is taken along `dim` only.
    A reduction with no unmasked position (or over an empty tensor) returns 0 with a zero
    gradient rather than NaN, so a batch made only of padding contributes nothing instead of
    poisoning the optimiser.
    """
    if mask is None:
        if values.numel() == 0:
            return values.sum() if dim is None else values.sum(dim=dim)
        return values.mean() if dim is None else values.mean(dim=dim)
    kept = select_valid(values, mask)
    count = _positions_kept(mask, values)
    if dim is None:
        return kept.sum() / count.sum().clamp_min(1)
    return kept.sum(dim=dim) / count.sum(dim=dim).clamp_min(1)


def _wide_float(x: Tensor) -> Tensor:
    """Upcast half-precision inputs to float32; leave float32/float64 alone."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _kl_per_position(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(teacher || student) summed over the last dimension, from log-probabilities.

    Classes where the teacher has zero probability contribute exactly 0 (the 0·log 0 = 0
    convention), even if the student also gives them -inf; without the guard this is NaN.
    """
    teacher_probs = teacher_log_probs.exp()
    finite_teacher = torch.where(
        teacher_probs > 0, teacher_log_probs, torch.zeros_like(teacher_log_probs)
    )
    terms = teacher_probs * (finite_teacher - student_log_probs)
    return torch.where(teacher_probs > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler, 2012)."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )


# --------------------------------------------------------------------------- logit losses


def soft_label_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """KL(teacher_T || student_T) · T², averaged over samples or unmasked tokens.

    The T² factor (Hinton et al., 2015) keeps the gradient magnitude roughly independent of
    T, so the weight between this term and the hard-label term need not be retuned per T.
    """
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_logits, "soft_label_kl logits")
    # Left-out positions become all-zero logits on both sides: a uniform pair, KL 0.
    student = _wide_float(select_valid(student_logits, mask))
    teacher = _wide_float(select_valid(teacher_logits, mask))
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    kl = _kl_per_position(teacher_log_probs, student_log_probs)
    return masked_mean(kl, mask) * temperature**2


def ensemble_log_probs(
    teacher_logits: Sequence[Tensor],
    served: Sequence[Tensor],
    weights: Sequence[float],
    *,
    temperature: float,
) -> Tensor:
    """Log of the weighted mixture of several teachers' distributions at temperature T, per row.

    ``teacher_logits[i]`` is [n, C], ``served[i]`` [n] (1 where teacher i labelled the row). Each row
    mixes only the teachers that served it, their weights renormalised to sum to 1:
    p = sum_i w_i s_i softmax(z_i / T) / sum_i w_i s_i. Mixing probabilities (not logits) keeps each
    teacher's uncertainty; passing ``T * log p`` as teacher logits to ``soft_label_kl`` at the same T
    distils exactly towards p. A row no teacher served is an error: its target would be undefined.
    """
    _check_temperature(temperature)
    if not teacher_logits or not len(teacher_logits) == len(served) == len(weights):
        raise ValueError(f"ensemble: {len(teacher_logits)} logits, {len(served)} masks, {len(weights)} weights")
    # A teacher's logits for rows it did not serve are padding: never read them.
    log_probs = torch.stack([
        F.log_softmax(_wide_float(select_valid(z, s)) / temperature, dim=-1)
        for z, s in zip(teacher_logits, served)
    ])
    share = torch.stack([s.to(log_probs.dtype) * float(w) for s, w in zip(served, weights)])  # [t, n]
    total = share.sum(0)
    if bool((total <= 0).any()):
        rows = torch.nonzero(total <= 0).flatten().tolist()
        raise ValueError(f"ensemble: rows {rows[:10]} were served by no teacher")
    log_share = torch.log(share / total).unsqueeze(-1)  # -inf where a teacher did not serve the row
    return torch.logsumexp(log_share + log_probs, dim=0)


def _select_valid_topk(
    topk_values: Tensor,
    topk_indices: Tensor,
    topk_logsumexp: Tensor,
    mask: Tensor | None,
    *,
    num_classes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """A teacher's top-k message through `select_valid`.

    Left-out positions become a uniform teacher over `num_classes` (logits 0, log-sum-exp
    log C) whose k ids all name class 0: valid ids for a gather however garbled the padding
    was, and a tail mass 1 - k/C that keeps every log finite.
    """
    return (
        select_valid(topk_values, mask),
        select_valid(topk_indices, mask, fill=0),
        select_valid(topk_logsumexp, mask, fill=math.log(num_classes)),
    )


def _bucket_logits(
    topk_logits: Tensor, tail_log_sum: Tensor, tail_size: int, temperature: float
) -> Tensor:
    """Log-weights at temperature T of k classes and one tail bucket, ``[..., k + 1]``.

    The tail is taken as `tail_size` equal logits whose exp sums to ``exp(tail_log_sum)`` at
    T = 1, so its weight at T is ``tail_size · exp(mean_logit / T)``.
    """
    mean_tail_logit = tail_log_sum - math.log(tail_size)
    tail = math.log(tail_size) + mean_tail_logit / temperature
    return torch.cat([topk_logits / temperature, tail.unsqueeze(-1)], dim=-1)


def soft_label_kl_topk(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    topk_logsumexp: Tensor,
    *,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft-label KL when the teacher sent only its top-k logits and the full logsumexp.

    Inputs: ``topk_values``/``topk_indices`` ``[..., k]`` are the teacher's k largest raw
    logits (T = 1) and their class ids; ``topk_logsumexp`` ``[...]`` is logsumexp of the
    teacher's *full* logits at T = 1. Leading shapes match ``student_logits[..., 0]``.

    The KL is taken over k + 1 buckets, on both sides: the teacher's k top classes plus one
    "tail" bucket for the other C - k. At T = 1 the teacher's buckets are exact (its top-k
    log-probabilities are ``topk_values - topk_logsumexp``, its tail holds the rest,
    ``m = 1 - exp(logsumexp(topk_values) - topk_logsumexp)``), the student's are read from
    its own logits, and by the data-processing inequality the bucketed KL is <= the full KL.

    At T != 1 the teacher's tail bucket would need ``Σ_tail exp(z / T)``, which its T = 1
    sum does not determine (tail logits {0, 0} and {ln 1.5, ln 0.5} share it at T = 1 but
    not at T = 2), and the wire carries nothing else about the tail. So both sides are
    softened by the same rule: each side's tail counts as C - k equal logits carrying that
    side's exact T = 1 tail mass, and the k + 1 buckets are then softmaxed at T. This equals
    `soft_label_kl` at T between student and teacher after each has had its tail logits
    replaced by their log-mean-exp. The rule being the same on both sides, the loss is 0,
    with a zero gradient, exactly when the student's T = 1 buckets match the teacher's (in
    particular when the student equals the teacher), and the student's tail is held to its
    total mass only: as far as the data goes, no further.

    Alternatives rejected: comparing the teacher's tail softened this way with the student's
    *true* tail mass at T is biased (a student equal to the teacher is pushed towards a flatter
    tail); dropping the tail (renormalised top-k vs student) pushes the student to put all its
    mass on k classes; spreading the tail per class materialises a ``[..., C]`` teacher and
    trains the student towards a flat tail the teacher never had.

    Exact, i.e. equal to `soft_label_kl` on full logits, when k == C (no tail) and whenever
    C - k == 1 (a one-class tail is its own mean). The tail mass is only as good as
    ``topk_logsumexp``: compute it in float32 from the same logits the top-k came from,
    before any quantisation for the wire.
    """
    _check_temperature(temperature)
    num_classes = student_logits.shape[-1]
    k = topk_values.shape[-1]
    leading = student_logits.shape[:-1]
    if topk_values.shape != topk_indices.shape:
        raise ValueError(
            f"topk_values shape {tuple(topk_values.shape)} != "
            f"topk_indices shape {tuple(topk_indices.shape)}"
        )
    if topk_values.shape[:-1] != leading or topk_logsumexp.shape != leading:
        raise ValueError(
            f"teacher top-k leading shape {tuple(topk_values.shape[:-1])} and logsumexp shape "
            f"{tuple(topk_logsumexp.shape)} must both equal the student's {tuple(leading)}"
        )
    if not 0 < k <= num_classes:
        raise ValueError(f"top-k size k={k} must be in 1..{num_classes} (the student's classes)")

    student = _wide_float(select_valid(student_logits, mask))
    values, indices, full_lse = _select_valid_topk(
        topk_values, topk_indices, topk_logsumexp, mask, num_classes=num_classes
    )
    values, full_lse, indices = _wide_float(values), _wide_float(full_lse), indices.long()
    student_topk = student.gather(-1, indices)

    tail_size = num_classes - k
    if tail_size == 0:
        teacher_buckets, student_buckets = values / temperature, student_topk / temperature
    else:
        # log Σ_tail exp(z) at T = 1 on each side; -inf for a teacher whose tail mass is 0.
        teacher_tail = full_lse + _log1mexp(torch.logsumexp(values, dim=-1) - full_lse)
        student_tail = torch.logsumexp(student.scatter(-1, indices, float("-inf")), dim=-1)
        teacher_buckets = _bucket_logits(values, teacher_tail, tail_size, temperature)
        student_buckets = _bucket_logits(student_topk, student_tail, tail_size, temperature)
    kl = _kl_per_position(
        F.log_softmax(teacher_buckets, dim=-1), F.log_softmax(student_buckets, dim=-1)
    )
    return masked_mean(kl, mask) * temperature**2


def hard_label_ce(student_logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Cross-entropy with the gold labels; positions labelled `ignore_index` are skipped.

    Returns 0 (not NaN) when every label is ignored.
    """
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the class "
            f"dimension {tuple(student_logits.shape[:-1])}"
        )
    counted = labels != ignore_index
    logits = _wide_float(select_valid(student_logits, counted))
    per_position = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1).long(),
        ignore_index=ignore_index,
        reduction="none",
    ).reshape(labels.shape)
    return masked_mean(per_position, counted)


# --------------------------------------------------------------------------- feature losses


class HiddenProjection(nn.Module):
    """Learned linear map from student width to teacher width (TinyBERT's W_h).

    Trained jointly with the student and discarded after distillation.
    """

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.linear = nn.Linear(student_width, teacher_width)

    def forward(self, student_hidden: Tensor) -> Tensor:
        return self.linear(student_hidden)


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Pairs ``(student_index, teacher_index)`` into HF ``hidden_states`` tuples.

    Convention: ``hidden_states[0]`` is the embedding output and ``hidden_states[i]`` the
    output of transformer layer i, so a model with N layers has N + 1 entries. Index 0 maps
    to 0 (embeddings to embeddings, as in TinyBERT) and student layer i maps to teacher layer
    ``floor(i · n_teacher / n_student)``: every k-th teacher layer when the depths divide
    (TinyBERT's g(m) = m·N/M; DistilBERT's every-other-layer), and the last layer always to
    the last. Drop the first pair to skip the embedding loss.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"layer counts must be >= 1, got student={n_student}, teacher={n_teacher}")
    if n_student > n_teacher:
        raise ValueError(
            f"student has {n_student} layers but the teacher only {n_teacher}; a uniform "
            "layer map needs a student no deeper than its teacher"
        )
    return [(i, i * n_teacher // n_student) for i in range(n_student + 1)]


def validate_layer_map(
    layer_map: list[tuple[int, int]], *, n_student: int, n_teacher: int, setting: str = "layer_map"
) -> None:
    """Raise a ValueError naming the bad pair if any index is outside its hidden_states tuple.

    `setting` is the config path to quote in the message, so the user knows what to edit.
    """
    for student_index, teacher_index in layer_map:
        if not 0 <= student_index <= n_student:
            raise ValueError(
                f"student layer {student_index} maps to teacher layer {teacher_index}, but the "
                f"student has {n_student} layers (valid 0..{n_student}, 0 = embeddings) ({setting})"
            )
        if not 0 <= teacher_index <= n_teacher:
            raise ValueError(
                f"student layer {student_index} maps to teacher layer {teacher_index}, but the "
                f"teacher has {n_teacher} layers (valid 0..{n_teacher}, 0 = embeddings) ({setting})"
            )


def _vector_distance(student: Tensor, teacher: Tensor, kind: DistanceKind) -> Tensor:
    """Per-vector distance over the last dimension: mean squared error or 1 - cosine."""
    if kind == "mse":
        return (student - teacher).pow(2).mean(dim=-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    raise ValueError(f"distance kind must be 'mse' or 'cosine', got {kind!r}")


def _project_to_teacher(
    student: Tensor, teacher: Tensor, projection: nn.Module | None, what: str
) -> Tensor:
    projected = student if projection is None else projection(student)
    if projected.shape != teacher.shape:
        hint = (
            f"; pass projection=HiddenProjection({student.shape[-1]}, {teacher.shape[-1]})"
            if projection is None and student.shape[:-1] == teacher.shape[:-1]
            else ""
        )
        raise ValueError(
            f"{what}: student shape {tuple(projected.shape)} (after projection) != teacher "
            f"shape {tuple(teacher.shape)}{hint}"
        )
    return projected


def hidden_state_loss(
    student_h: Tensor,
    teacher_h: Tensor,
    *,
    mask: Tensor | None,
    kind: DistanceKind = "mse",
    projection: nn.Module | None = None,
) -> Tensor:
    """Distance between one student and one teacher hidden-state layer, ``[n, L, d]``.

    The distance is taken per token (MSE averaged over the width, or 1 - cosine) and then
    averaged over unmasked tokens. Different widths need a `projection`.
    """
    # Select before projecting: garbage in a padded student state would reach the projection's
    # weight gradient through the matrix product even with a zero gradient flowing back.
    student = _project_to_teacher(
        select_valid(student_h, mask), teacher_h, projection, "hidden_state_loss"
    )
    per_token = _vector_distance(student, select_valid(teacher_h, mask), kind)
    return masked_mean(per_token, mask)


def embedding_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    *,
    kind: DistanceKind = "mse",
    projection: nn.Module | None = None,
) -> Tensor:
    """Distance between pooled sentence embeddings ``[n, d]``, averaged over samples."""
    student = _project_to_teacher(student_emb, teacher_emb, projection, "embedding_loss")
    return masked_mean(_vector_distance(student, teacher_emb, kind))


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Average ``[n, L, d]`` token states over unmasked tokens, giving ``[n, d]``."""
    return masked_mean(hidden, mask.unsqueeze(-1), dim=-2)


# --------------------------------------------------------------------------- attention losses


def attention_kl(student_attn: Tensor, teacher_attn: Tensor, *, mask: Tensor | None) -> Tensor:
    """KL(teacher || student) between attention distributions over keys.

    Inputs are post-softmax probabilities ``[n, H, L, L]`` (HF ``output_attentions``).
    The KL is averaged over heads and unmasked query positions (`mask` is ``[n, L]``); the
    rows of padded queries are never read. Keys are taken as given: padded keys carry zero
    probability in a model's own maps.
    """
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError(
            "attention_kl expects [batch, heads, queries, keys] tensors, got student "
            f"{tuple(student_attn.shape)} and teacher {tuple(teacher_attn.shape)}"
        )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"attention_kl needs equal head counts, but the student has {student_attn.shape[1]} "
            f"heads and the teacher {teacher_attn.shape[1]}; use minilm_relation_loss to "
            "transfer attention across different head counts"
        )
    _check_same_shape(student_attn, teacher_attn, "attention_kl")
    query_rows = None if mask is None else mask[:, None, :, None]  # [n, 1, queries, 1]
    teacher = _wide_float(select_valid(teacher_attn, query_rows))
    student = _wide_float(select_valid(student_attn, query_rows))
    # Clamp the student only: a student probability that underflows to 0 where the teacher
    # attends would make the loss inf; the teacher's zeros are handled by the 0·log 0 rule.
    student_log = student.clamp_min(torch.finfo(student.dtype).tiny).log()
    kl = _kl_per_position(teacher.log(), student_log)  # [n, H, L]
    query_mask = None if mask is None else mask.unsqueeze(1)
    return masked_mean(kl, query_mask)


def _relation_log_probs(
    x: Tensor, key_mask: Tensor | None, num_relation_heads: int, temperature: float, who: str
) -> Tensor:
    """Log of softmax(x_r x_r^T / sqrt(d_r) / T) per relation head r: ``[n, R, L, L]``."""
    n, length, width = x.shape
    if width % num_relation_heads:
        raise ValueError(
            f"{who} width {width} is not divisible by num_relation_heads={num_relation_heads}"
        )
    head_width = width // num_relation_heads
    # Padded vectors become 0 before the products: a garbage key would otherwise reach every
    # real query's gradient through the matrix product, masked score or not.
    heads = _wide_float(select_valid(x, key_mask)).view(n, length, num_relation_heads, head_width).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / (math.sqrt(head_width) * temperature)
    if key_mask is not None:
        # finfo.min, not -inf: a fully padded row then stays finite (uniform) instead of NaN,
        # and masked_mean drops it anyway.
        padded_key = ~key_mask.to(torch.bool)[:, None, None, :]
        scores = scores.masked_fill(padded_key, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def minilm_relation_loss(
    student_x: Tensor,
    teacher_x: Tensor,
    *,
    mask: Tensor | None,
    num_relation_heads: int,
    temperature: float = 1.0,
) -> Tensor:
    """MiniLM(v2) self-attention relation transfer for one kind of vector (q, k or v).

    `student_x` ``[n, L, d_s]`` and `teacher_x` ``[n, L, d_t]`` are the concatenated
    per-head query (or key, or value) vectors of one layer. Each is split into
    `num_relation_heads` equal chunks (its own width / R), relations are the scaled
    dot-product softmax over keys, and the loss is KL(teacher || student) averaged over
    relation heads and unmasked queries. Because both sides are re-split into the same R
    heads, the two models may have different head counts and widths. Call once per vector
    kind (MiniLMv2 sums the q-q, k-k and v-v terms). `temperature` divides the scores; the
    loss is not rescaled by T².
    """
    _check_temperature(temperature)
    if num_relation_heads < 1:
        raise ValueError(f"num_relation_heads must be >= 1, got {num_relation_heads}")
    if student_x.dim() != 3 or teacher_x.dim() != 3 or student_x.shape[:2] != teacher_x.shape[:2]:
        raise ValueError(
            "minilm_relation_loss expects [batch, tokens, width] tensors with equal batch and "
            f"tokens, got student {tuple(student_x.shape)} and teacher {tuple(teacher_x.shape)}"
        )
    student_log_probs = _relation_log_probs(
        student_x, mask, num_relation_heads, temperature, "student"
    )
    teacher_log_probs = _relation_log_probs(
        teacher_x, mask, num_relation_heads, temperature, "teacher"
    )
    kl = _kl_per_position(teacher_log_probs, student_log_probs)  # [n, R, L]
    query_mask = None if mask is None else mask.unsqueeze(1)
    return masked_mean(kl, query_mask)


# --------------------------------------------------------------------------- combination


def combine_losses(
    terms: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of loss terms, plus each term's unweighted value for logging.

    Every term needs a weight (a term with none is almost certainly a config typo, so it is
    an error rather than silently dropped). Weights whose term is absent are ignored: the
    training loop computes only what a batch supports. Zero-weight terms are neither added
    nor logged, so a disabled term costs nothing downstream. The log has a ``"total"`` key.
    """
    if not terms:
        raise ValueError("no loss terms were computed for this batch; nothing to train")
    unweighted = sorted(set(terms) - set(weights))
    if unweighted:
        raise ValueError(
            f"loss terms {unweighted} have no weight; weights given: {sorted(weights)}"
        )
    if "total" in terms:
        raise ValueError("'total' is reserved for the combined loss; rename that term")
    active = {name: value for name, value in terms.items() if weights[name] != 0}
    if not active:
        raise ValueError(f"every loss term has weight 0 (terms: {sorted(terms)}); nothing to train")
    total = sum(weights[name] * value for name, value in active.items())
    logged = {name: float(value.detach()) for name, value in active.items()}
    logged["total"] = float(total.detach())
    return total, logged
