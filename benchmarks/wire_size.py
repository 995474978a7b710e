"""Wire size per token of each kind of knowledge, and how faithful top-k soft labels are.

Sizes are measured, not computed: a knowledge message with and without the part in question is
encoded with ``wire.encode`` and the difference divided by the tokens it covers, so the framing is
included. Version 1 (float32 values, int32 ids) and version 2's packed forms (``distill.value_bits``
8 and 16, ``distill.feature_bits`` 8) side by side; the packed top-k sizes depend on the values, so
they are measured on the peaked (Zipf) logits below, in a message of ``PACKED_TOKENS`` tokens (a
batch of 8 × 128) so that the per-message framing weighs what it weighs in a real job.

Fidelity is KL(full teacher ‖ teacher rebuilt from top-k) per token, with the rebuild that
``student.losses.soft_label_kl_topk`` assumes: the k sent classes exact, the rest of the mass
(known from ``topk_logsumexp``) spread evenly over the other classes. The packed forms' own loss is
KL(the k + 1 buckets a version-1 message gives ‖ those version 2 gives), per token.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from benchmarks.summary import median, ratio
from polydistill.storage import wire
from polydistill.storage.knowledge_codec import bucket_kl

VOCAB = 250_002  # XLM-R / multilingual-e5 vocabulary, the "250k vocabulary" of the issue
TOKENS = 16
KS = (8, 32, 128)
HIDDEN_WIDTHS = (384, 768)  # multilingual-e5-small, XLM-R base
TEMPERATURES = (1.0, 2.0)


def _work(tokens: int) -> wire.WorkBatch:
    return wire.WorkBatch(
        job_id="bench-wire", epoch=0, batch_id=0, sample_ids=np.zeros(1, dtype=np.int64), languages=("eng_Latn",),
        input_ids=np.arange(tokens, dtype=np.int32)[None, :], attention_mask=np.ones((1, tokens), dtype=np.uint8),
    )


def _bytes_per_token(tokens: int, codec: wire.WireCodec | None = None, **parts) -> float:
    work = _work(tokens)
    bare = len(wire.encode(wire.Knowledge(work=work, teacher_id="t"), codec))
    full = len(wire.encode(wire.Knowledge(work=work, teacher_id="t", **parts), codec))
    return (full - bare) / tokens


def sizes(tokens: int = TOKENS, vocab: int = VOCAB) -> dict:
    rng = np.random.default_rng(0)
    logits32 = rng.normal(size=(1, tokens, vocab)).astype(np.float32)
    per_token: dict[str, float] = {
        "full_fp16_logits": _bytes_per_token(tokens, soft=wire.SoftLabels.full(logits32.astype(np.float16))),
        "full_fp32_logits": _bytes_per_token(tokens, soft=wire.SoftLabels.full(logits32)),
    }
    for k in KS:
        top = wire.topk_soft_labels(logits32, k)  # fp32 values: what TeacherReplica sends today
        per_token[f"top{k}_fp32_values"] = _bytes_per_token(tokens, soft=top)
        half = wire.SoftLabels(topk_values=top.topk_values.astype(np.float16), topk_indices=top.topk_indices,
                               topk_logsumexp=top.topk_logsumexp)
        per_token[f"top{k}_fp16_values"] = _bytes_per_token(tokens, soft=half)
    for width in HIDDEN_WIDTHS:
        hidden = rng.normal(size=(1, tokens, width)).astype(np.float16)
        per_token[f"hidden{width}_fp16_per_layer"] = _bytes_per_token(tokens, hidden_states={0: hidden})
        per_token[f"hidden{width}_int8_per_layer"] = _bytes_per_token(tokens, wire.WireCodec(feature_bits=8),
                                                                      hidden_states={0: hidden})
    full = per_token["full_fp16_logits"]
    return {
        "vocab": vocab,
        "tokens_per_message": tokens,
        "bytes_per_token": per_token,
        "full_fp16_over": {name: ratio(full, size) for name, size in per_token.items() if name != "full_fp16_logits"},
        "note": "version 1 (encode without a codec) except int8 hidden states, which version 2 carries "
                "(distill.feature_bits 8); packed top-k sizes are under packed_topk",
    }


PACKED_TOKENS = 1024
PACKED_BITS = (8, 16)


def packed_topk(logits: torch.Tensor, ks: tuple[int, ...] = KS) -> dict:
    """Bytes per token of top-k soft labels in version 1 and packed in version 2 (8 and 16 value bits), and
    KL(v1 buckets ‖ v2 buckets) per token; the rows are repeated to a message of ``PACKED_TOKENS`` tokens."""
    exact = wire.topk_soft_labels(logits.numpy(), max(ks))
    repeats = -(-PACKED_TOKENS // exact.n_samples)
    out: dict = {}
    for k in ks:
        rows = wire.SoftLabels(topk_values=exact.topk_values[:, :k], topk_indices=exact.topk_indices[:, :k],
                               topk_logsumexp=exact.topk_logsumexp)
        tiled = wire.SoftLabels(**{name: np.tile(getattr(rows, name), (repeats,) + (1,) * (getattr(rows, name).ndim - 1))
                                   [None, :PACKED_TOKENS] for name in ("topk_values", "topk_indices", "topk_logsumexp")})
        entry = {"v1_fp32_values": _bytes_per_token(PACKED_TOKENS, None, soft=tiled)}
        for bits in PACKED_BITS:
            entry[f"v2_{bits}bit"] = _bytes_per_token(PACKED_TOKENS, wire.WireCodec(value_bits=bits), soft=tiled)
            message = wire.Knowledge(work=_work(rows.n_samples), teacher_id="t",
                                     soft=wire.SoftLabels(**{name: getattr(rows, name)[None] for name in
                                                             ("topk_values", "topk_indices", "topk_logsumexp")}))
            rebuilt = wire.decode(bytes(wire.encode(message, wire.WireCodec(value_bits=bits)))).soft
            kl = bucket_kl(rows.topk_values, rows.topk_logsumexp, rebuilt.topk_values[0], rebuilt.topk_logsumexp[0])
            entry[f"kl_v1_vs_v2_{bits}bit_nats_per_token"] = {"median": median(kl.tolist()), "mean": float(kl.mean()),
                                                             "max": float(kl.max())}
        out[f"top{k}"] = entry
    return out



# --------------------------------------------------------------------------- fidelity


def rebuild_kl(logits: torch.Tensor, ks: tuple[int, ...] = KS, temperatures: tuple[float, ...] = TEMPERATURES,
               *, chunk: int = 16) -> dict[tuple[int, float, str], torch.Tensor]:
    """Per-row KL(p_T ‖ q_T) for each (k, T, value dtype): p from the full logits, q rebuilt from
    ``wire.topk_soft_labels`` output the way ``soft_label_kl_topk`` rebuilds it.

    One top-k call with the largest k serves every k: its values are sorted, so the first k of
    them are the top k, and the logsumexp does not depend on k.
    """
    out: dict[tuple[int, float, str], list[torch.Tensor]] = {}
    for start in range(0, logits.shape[0], chunk):
        rows = logits[start:start + chunk].float()
        top = wire.topk_soft_labels(rows.numpy(), max(ks))
        lse = torch.from_numpy(top.topk_logsumexp.astype(np.float64))
        indices_all = torch.from_numpy(top.topk_indices.astype(np.int64))
        for temperature in temperatures:
            log_p = torch.log_softmax(rows.double() / temperature, dim=-1)
            p = log_p.exp()
            negentropy = (p * log_p).sum(-1)
            for k in ks:
                for precision in ("fp32", "fp16"):
                    values = top.topk_values[..., :k]
                    if precision == "fp16":
                        values = values.astype(np.float16)
                    kl = _kl_rows(p, negentropy, torch.from_numpy(values.astype(np.float64)), indices_all[..., :k],
                                  lse, temperature)
                    out.setdefault((k, temperature, precision), []).append(kl)
    return {key: torch.cat(parts) for key, parts in out.items()}


def _kl_rows(p: torch.Tensor, negentropy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
             lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ p log p − Σ_top p log q_top − p_tail · log q_each_tail, for the uniform-tail rebuild."""
    classes, k = p.shape[-1], values.shape[-1]
    p_top = p.gather(-1, indices)
    tail = classes - k
    if tail == 0:
        return negentropy - (p_top * torch.log_softmax(values / temperature, dim=-1)).sum(-1)
    # The rebuild of student.losses.soft_label_kl_topk: uniform tail holding the known T=1 mass.
    kept = torch.logsumexp(values, dim=-1) - lse
    tail_log_mass = torch.log(-torch.expm1(kept.clamp_max(-1e-12)))
    uniform_tail_logit = lse + tail_log_mass - math.log(tail)
    buckets = torch.cat([values / temperature, (math.log(tail) + uniform_tail_logit / temperature)[:, None]], -1)
    log_q = torch.log_softmax(buckets, dim=-1)
    log_q_top, log_q_each_tail = log_q[:, :k], log_q[:, k] - math.log(tail)
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)
    return negentropy - (p_top * log_q_top).sum(-1) - p_tail * log_q_each_tail


def zipf_logits(rows: int, exponent: float, vocab: int = VOCAB, noise: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Random-but-peaked logits: Zipf rank decay (p ∝ rank^-exponent) plus noise, random order per row."""
    generator = torch.Generator().manual_seed(seed)
    base = -exponent * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    out = torch.empty(rows, vocab)
    for i in range(rows):
        noisy = base + noise * torch.randn(vocab, generator=generator)
        out[i] = noisy[torch.randperm(vocab, generator=generator)]
    return out


def _describe(logits: torch.Tensor) -> dict:
    log_p = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    top_mass = {f"top{k}_mass": median(log_p.topk(k, dim=-1).values.exp().sum(-1).tolist()) for k in KS}
    return {"tokens": logits.shape[0], "median_entropy_nats": median(entropy.tolist()),
            "median_top1_prob": median(log_p.max(-1).values.exp().tolist()), **top_mass}


def fidelity(logits: torch.Tensor, source: str) -> dict:
    kl = {f"top{k}_T{t:g}_{precision}values": {"median": median(v.tolist()), "mean": float(v.mean())}
          for (k, t, precision), v in rebuild_kl(logits).items()}
    return {"source": source, "teacher_at_T1": _describe(logits), "kl_full_vs_topk_nats_per_token": kl,
            "packed_topk": packed_topk(logits)}


# Zipf exponents: 1.1 is heavy-tailed (top-32 holds about half the mass), 1.5 is peaked like a
# trained LM on an easy token. Neither is a real model: the e5 teacher has no LM head (see docs/tasks.md).
ZIPF_EXPONENTS = (1.1, 1.5)


def measure(rows: int, log=print) -> dict:
    log("  wire sizes ...")
    result: dict = {"sizes": sizes()}
    log("  top-k fidelity on random-but-peaked logits ...")
    result["fidelity"] = {
        f"zipf_{exponent:g}": fidelity(
            zipf_logits(rows, exponent),
            f"synthetic: logits -{exponent:g}·log(rank) + N(0, 0.3²), {VOCAB:,} classes, {rows} tokens")
        for exponent in ZIPF_EXPONENTS
    }
    result["fidelity_source"] = (
        "random-but-peaked (Zipf) logits: the real teacher available offline, multilingual-e5-small, has no "
        "language-model head, and projecting its last hidden state onto its tied input embeddings gives a "
        "near-uniform distribution (entropy 12.3 nats of a possible 12.43), not a realistic one")
    result["student_accuracy_topk_vs_full"] = {
        "value": None,
        "reason": "not measured: the teachers that run in minutes on 2 cores are 7-class classifiers "
                  "(top-k of 7 classes is nearly the full distribution) or random-weight LMs, whose accuracy says nothing",
    }
    per_token = result["sizes"]["bytes_per_token"]
    result["topk32_wire_ratio"] = ratio(per_token["full_fp16_logits"], per_token["top32_fp32_values"])
    result["topk32_fp16_wire_ratio"] = ratio(per_token["full_fp16_logits"], per_token["top32_fp16_values"])
    # The headline figures of the packed form: its size on the peaked logits, and the worst of the two
    # logit shapes' mean KL against version 1.
    packed = {name: entry["packed_topk"]["top128"] for name, entry in result["fidelity"].items()}
    result["topk128_bytes_per_token"] = max(entry["v2_8bit"] for entry in packed.values())
    result["topk128_v1_bytes_per_token"] = max(entry["v1_fp32_values"] for entry in packed.values())
    result["topk128_kl_v1_vs_v2_8bit"] = max(entry["kl_v1_vs_v2_8bit_nats_per_token"]["mean"]
                                             for entry in packed.values())
    result["topk128_kl_v1_vs_v2_16bit"] = max(entry["kl_v1_vs_v2_16bit_nats_per_token"]["mean"]
                                              for entry in packed.values())
    return result
