"""A teacher replica's throughput and model FLOPs utilisation on one GPU.

Measures an XLM-R-base-sized encoder (random weights from its config: 12 layers, 768 wide,
12 heads, FFN 3072, 250,002 pieces) at sequence length 128 in bfloat16:

- ``forward``: the model's forward pass alone, for several batch sizes, eager and under
  ``torch.compile``;
- ``replica``: ``student.teacher_pass.compute_knowledge`` as a replica runs it (token ids from host
  arrays to the device, forward, soft labels back to the host as numpy);
- ``mlm_topk``: a masked-LM teacher over the full vocabulary, its top-32 per token taken on the
  device, against copying the full logits to the host.

MFU counts the encoder's matrix FLOPs (projections, FFN, attention scores and values; not the
embedding lookup, layer norms or softmax) against the card's dense bf16 peak.

    python benchmarks/gpu_teacher.py --out benchmarks/results/gpu_teacher.json
    python benchmarks/gpu_teacher.py --tiny           # a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, XLMRobertaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polydistill.student.teacher_pass import compute_knowledge  # noqa: E402
from polydistill.storage import wire  # noqa: E402
from polydistill.student.contract import KnowledgeRequest  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, SXM parts.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
SEQ_LEN = 128


def encoder_flops_per_sequence(config: XLMRobertaConfig, seq_len: int) -> float:
    """Matrix FLOPs of one forward pass over one sequence (2 per multiply-add)."""
    h, ffn, t = config.hidden_size, config.intermediate_size, seq_len
    projections = 2 * t * h * h * 4  # Q, K, V, output
    feed_forward = 2 * t * h * ffn * 2
    attention = 2 * t * t * h * 2  # scores and weighted values, all heads together
    return float(config.num_hidden_layers * (projections + feed_forward + attention))


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def timed(step, device: torch.device, min_seconds: float, warmup: int = 3) -> tuple[float, int]:
    """Median seconds per call over at least ``min_seconds`` of calls, after warm-up."""
    for _ in range(warmup):
        step()
    sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
    return float(np.median(times)), len(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def work_batch(batch: int, vocab: int, seed: int) -> wire.WorkBatch:
    rng = np.random.default_rng(seed)
    return wire.WorkBatch(
        job_id="gpu-bench", epoch=0, batch_id=seed, sample_ids=np.arange(batch, dtype=np.int64),
        languages=("xx",) * batch, input_ids=rng.integers(5, vocab, (batch, SEQ_LEN), dtype=np.int32),
        attention_mask=np.ones((batch, SEQ_LEN), np.uint8),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model and short timings (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512, 1024])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--autotune", action="store_true",
                        help="also try torch.compile(mode='max-autotune-no-cudagraphs') at the largest batch (slow to compile)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    # XLM-R base as published (the config class's own defaults carry BERT's 30,522-piece vocabulary).
    config = XLMRobertaConfig(num_labels=7, vocab_size=250_002, max_position_embeddings=514, type_vocab_size=1)
    if args.tiny:
        config = XLMRobertaConfig(num_labels=7, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, vocab_size=5000)
        args.batches, args.seconds = [4, 8], min(args.seconds, 0.3)
    name, peak = peak_flops(device)
    flops = encoder_flops_per_sequence(config, SEQ_LEN)
    results: dict = {
        "device": name, "torch": torch.__version__, "peak_bf16_flops": peak, "seq_len": SEQ_LEN,
        "model": {"hidden": config.hidden_size, "layers": config.num_hidden_layers,
                  "heads": config.num_attention_heads, "ffn": config.intermediate_size, "vocab": config.vocab_size},
        "encoder_gflops_per_sequence": flops / 1e9, "forward": [], "replica": [], "mlm_topk": None,
    }

    def record(section: str, row: dict) -> None:
        seq_s = row["sequences_per_s"]
        row["tflops"] = seq_s * flops / 1e12
        row["mfu"] = seq_s * flops / peak if peak else None
        results[section].append(row)
        print(f"{section:8s} {json.dumps(row)}", flush=True)
        save(results, args.out)

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    request = KnowledgeRequest(soft=True)
    for batch in args.batches:
        work = work_batch(batch, config.vocab_size, batch)
        ids = torch.from_numpy(work.input_ids.astype(np.int64)).to(device)
        mask = torch.from_numpy(work.attention_mask.astype(np.int64)).to(device)
        with torch.inference_mode():
            seconds, n = timed(lambda: model(input_ids=ids, attention_mask=mask), device, args.seconds)
        record("forward", {"variant": "eager", "batch": batch, "sequences_per_s": batch / seconds, "repeats": n})
        seconds, n = timed(lambda: compute_knowledge(model, work, request, teacher_id="bench"), device, args.seconds)
        record("replica", {"variant": "eager", "batch": batch, "sequences_per_s": batch / seconds, "repeats": n})

    if not args.no_compile:
        compiled = torch.compile(model, dynamic=False)
        best = max(results["forward"], key=lambda row: row["sequences_per_s"])["batch"]
        for batch in sorted({best, args.batches[-1]}):
            work = work_batch(batch, config.vocab_size, batch)
            started = time.perf_counter()
            with torch.inference_mode():
                ids = torch.from_numpy(work.input_ids.astype(np.int64)).to(device)
                mask = torch.from_numpy(work.attention_mask.astype(np.int64)).to(device)
                compiled(input_ids=ids, attention_mask=mask)
                compile_s = time.perf_counter() - started
                seconds, n = timed(lambda: compiled(input_ids=ids, attention_mask=mask), device, args.seconds)
            record("forward", {"variant": "compiled", "batch": batch, "sequences_per_s": batch / seconds,
                               "repeats": n, "compile_s": compile_s})
            seconds, n = timed(lambda: compute_knowledge(compiled, work, request, teacher_id="bench"),
                               device, args.seconds)
            record("replica", {"variant": "compiled", "batch": batch, "sequences_per_s": batch / seconds,
                               "repeats": n})
        del compiled

    # The masked-LM row before the slow autotuned compile, so that a time limit cuts the latter.
    model.cpu()
    results["mlm_topk"] = measure_mlm_topk(config, device, args)
    print(f"mlm_topk {json.dumps(results['mlm_topk'])}", flush=True)
    save(results, args.out)
    model.to(device)

    if args.autotune:
        tuned = torch.compile(model, dynamic=False, mode="max-autotune-no-cudagraphs")
        batch = args.batches[-1]
        work = work_batch(batch, config.vocab_size, batch)
        started = time.perf_counter()
        seconds, n = timed(lambda: compute_knowledge(tuned, work, request, teacher_id="bench"), device, args.seconds)
        record("replica", {"variant": "compiled-autotune", "batch": batch, "sequences_per_s": batch / seconds,
                           "repeats": n, "compile_s": time.perf_counter() - started - n * seconds})
    return 0


def measure_mlm_topk(config: XLMRobertaConfig, device: torch.device, args) -> dict:
    """Per-token soft labels over the whole vocabulary: top-32 on the device vs full logits to the host."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = AutoModelForMaskedLM.from_config(config).to(device=device, dtype=torch.bfloat16).eval()
    batch = 4 if args.tiny else 32
    work = work_batch(batch, config.vocab_size, 7)
    request = KnowledgeRequest(soft=True)
    topk_s, _ = timed(lambda: compute_knowledge(model, work, request, teacher_id="bench", top_k=32),
                      device, args.seconds)
    full_s, _ = timed(lambda: compute_knowledge(model, work, request, teacher_id="bench", top_k=None),
                      device, args.seconds, warmup=1)
    knowledge = compute_knowledge(model, work, request, teacher_id="bench", top_k=32)
    topk_bytes = len(wire.encode(knowledge))
    full_bytes = batch * SEQ_LEN * config.vocab_size * 4  # float32 logits, as the full path ships them
    return {"batch": batch, "top_k": 32, "topk_sequences_per_s": batch / topk_s,
            "full_logits_sequences_per_s": batch / full_s, "speedup": full_s / topk_s,
            "topk_message_bytes": topk_bytes, "full_logits_bytes": full_bytes,
            "bytes_ratio": full_bytes / topk_bytes}


def save(results: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
