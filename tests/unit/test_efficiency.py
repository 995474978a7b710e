"""Parameter counts against hand sums of a tiny BERT's shapes; latency timed in shared rounds; the rows latency is
measured on, spread over every language."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.efficiency import (
    TimedWork,
    count_parameters,
    disk_bytes,
    forward_work,
    interleaved_latency_ms,
    mean_tokens_per_language,
    spread_over_languages,
)

VOCAB, WIDTH, LAYERS, FFN, POSITIONS, TOKEN_TYPES, LABELS = 99, 16, 2, 32, 64, 2, 3


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=FFN, max_position_embeddings=POSITIONS, type_vocab_size=TOKEN_TYPES,
        num_labels=LABELS,
    )
    return BertForSequenceClassification(config)


def test_count_parameters_matches_hand_sums(tiny_bert):
    embedding_tables = VOCAB * WIDTH + POSITIONS * WIDTH + TOKEN_TYPES * WIDTH  # 1584 + 1024 + 32
    embedding_layer_norm = 2 * WIDTH
    per_layer = (
        4 * (WIDTH * WIDTH + WIDTH)  # query, key, value, attention output
        + 2 * WIDTH  # attention LayerNorm
        + (WIDTH * FFN + FFN)  # intermediate
        + (FFN * WIDTH + WIDTH)  # output
        + 2 * WIDTH  # output LayerNorm
    )
    pooler = WIDTH * WIDTH + WIDTH
    classifier = WIDTH * LABELS + LABELS
    non_embedding = embedding_layer_norm + LAYERS * per_layer + pooler + classifier
    assert count_parameters(tiny_bert) == {
        "params": embedding_tables + non_embedding,
        "non_embedding_params": non_embedding,
    }
    assert (embedding_tables, per_layer, non_embedding) == (2640, 2224, 2 * 2224 + 32 + 272 + 51)


def test_count_parameters_of_a_plain_module_without_hf_api():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    assert count_parameters(model) == {"params": 40 + 10, "non_embedding_params": 10}


def test_disk_bytes_sums_files_recursively(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_bytes(b"y" * 24)
    assert disk_bytes(tmp_path) == 1024
    assert disk_bytes(tmp_path / "model.safetensors") == 1000
    with pytest.raises(FileNotFoundError, match="no saved model"):
        disk_bytes(tmp_path / "missing")


class FakeClock:
    """A clock each piece of work advances by its own cost, so timings are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _work(clock, log, name, costs, units=1):
    """Work that logs its runs and advances `clock` by the next of `costs` (seconds) each run."""
    remaining = list(costs)

    def run():
        log.append(name)
        clock.now += remaining.pop(0)

    return TimedWork(run, units=units)


def test_interleaved_rounds_rotate_the_order_and_take_each_entrys_median_per_unit():
    clock, log = FakeClock(), []
    work = {
        "teacher": _work(clock, log, "teacher", [9.0, 1.0, 1.2, 50.0, 1.1]),  # warm-up 9 s, a round hit by a pause
        "student": _work(clock, log, "student", [9.0, 0.2, 0.3, 0.25, 0.4], units=2),
        ("student", "batch32"): _work(clock, log, "s32", [9.0, 0.5, 0.5, 0.5, 0.5]),
    }
    latencies = interleaved_latency_ms(work, rounds=4, warmup=1, clock=clock)
    assert log == ["teacher", "student", "s32",  # warm-up, off the clock
                   "teacher", "student", "s32",  # each round runs every entry once,
                   "student", "s32", "teacher",  # starting one place further on
                   "s32", "teacher", "student",
                   "teacher", "student", "s32"]
    assert latencies == pytest.approx({"teacher": 1150.0, "student": 137.5, ("student", "batch32"): 500.0})


def test_interleaved_latency_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one unit"):
        TimedWork(lambda: None, units=0)
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved_latency_ms({}, rounds=0)
    with pytest.raises(ValueError, match="warmup >= 0"):
        interleaved_latency_ms({}, rounds=1, warmup=-1)


def test_forward_work_runs_each_batch_in_eval_mode_and_restores_the_training_flag(tiny_bert):
    batches = [{"input_ids": torch.randint(0, VOCAB, (rows, 6))} for rows in (1, 1, 3)]
    seen = []
    hook = tiny_bert.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((module.training, torch.is_inference_mode_enabled(),
                                                  kwargs["input_ids"].shape[0])), with_kwargs=True)
    tiny_bert.train()
    try:
        work = forward_work(tiny_bert, batches)
        work.run()
    finally:
        hook.remove()
    assert work.units == 3
    assert seen == [(False, True, 1), (False, True, 1), (False, True, 3)]
    assert tiny_bert.training, "the model's training flag must be restored"


# --------------------------------------------------------------------------- the latency sample

# A held-out split sorted by language, as SIB-200's is: the first 32 rows are all Amharic.
LANGUAGES = ["amh_Ethi"] * 40 + ["eng_Latn"] * 40 + ["fra_Latn"] * 40 + ["zho_Hans"] * 40 + ["yor_Latn"] * 3


def test_latency_sample_draws_evenly_from_every_language_and_the_same_rows_each_time():
    sample = spread_over_languages(LANGUAGES, 32, seed=0)
    assert len(sample) == len(set(sample)) == 32
    counts = Counter(LANGUAGES[i] for i in sample)
    # Yoruba has 3 rows and gives them all; the other four share the rest, 7 each.
    assert counts == {"yor_Latn": 3, "amh_Ethi": 8, "eng_Latn": 7, "fra_Latn": 7, "zho_Hans": 7}
    assert spread_over_languages(LANGUAGES, 32, seed=0) == sample
    assert spread_over_languages(LANGUAGES, 32, seed=1) != sample
    assert sorted(spread_over_languages(LANGUAGES[:5], 32)) == [0, 1, 2, 3, 4]  # fewer rows than asked: all


def test_mean_tokens_per_language_by_hand():
    assert mean_tokens_per_language([4, 6, 10, 3], ["b", "b", "a", "b"]) == {"a": 10.0, "b": 4.33}
    with pytest.raises(ValueError, match="3 lengths for 2 languages"):
        mean_tokens_per_language([1, 2, 3], ["a", "b"])


def _rows_marked_by_language() -> TokenizedSplit:
    """Each row's first token names its language (its place among the sorted languages, plus 1) and its
    length grows with that place, so a forward pass's input says whose rows it holds."""
    names = sorted(set(LANGUAGES))
    token_ids = [np.asarray([names.index(language) + 1] + [7] * (2 + names.index(language)), dtype=np.int32)
                 for language in LANGUAGES]
    return TokenizedSplit(sample_ids=np.arange(len(LANGUAGES), dtype=np.int64), token_ids=token_ids,
                          labels=np.zeros(len(LANGUAGES), dtype=np.int64), languages=list(LANGUAGES))


def test_efficiency_times_rows_from_every_language_the_same_rows_every_run(tiny_bert, tmp_path):
    from polydistill.student.efficiency import interleaved_latency_ms
    from polydistill.student.scoring import LATENCY_ROUNDS, latency_figures, latency_work, sizes

    def efficiency(model, model_dir, rows, pad_id):  # what evaluation reports of one model timed alone
        timed = interleaved_latency_ms(latency_work(model, rows, pad_id), rounds=LATENCY_ROUNDS)
        return {**sizes(model, model_dir, rows), **latency_figures(timed)}

    names = sorted(set(LANGUAGES))
    rows = _rows_marked_by_language()
    tiny_bert.save_pretrained(tmp_path / "model")
    batches: list[torch.Tensor] = []
    hook = tiny_bert.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["input_ids"].clone()), with_kwargs=True)
    try:
        first = efficiency(tiny_bert, tmp_path / "model", rows, pad_id=0)
        first_batches, batches[:] = list(batches), []
        second = efficiency(tiny_bert, tmp_path / "model", rows, pad_id=0)
    finally:
        hook.remove()
    assert [b.tolist() for b in batches] == [b.tolist() for b in first_batches]  # the same rows, in the same order

    singles = [b for b in first_batches if b.shape[0] == 1]
    batch32 = [b for b in first_batches if b.shape[0] == 32]
    assert singles and batch32 and len(singles) + len(batch32) == len(first_batches)
    single_languages = Counter(names[int(b[0, 0]) - 1] for b in singles)
    runs = 1 + LATENCY_ROUNDS  # a warm-up round, then the timed ones
    assert single_languages == {"yor_Latn": 3 * runs, "amh_Ethi": 8 * runs, "eng_Latn": 7 * runs,
                                "fra_Latn": 7 * runs, "zho_Hans": 7 * runs}
    assert len(batch32) == runs
    batch_languages = Counter(names[int(token) - 1] for token in batch32[0][:, 0])
    assert batch_languages == {"yor_Latn": 3, "amh_Ethi": 8, "eng_Latn": 7, "fra_Latn": 7, "zho_Hans": 7}

    # Sequence lengths: each language's own mean, and the sample's.
    assert first["mean_tokens_per_row"] == {language: float(3 + names.index(language)) for language in names}
    # amh 8 rows of 3 tokens, eng 7 of 4, fra 7 of 5, yor 3 of 6, zho 7 of 7
    assert first["latency_sample_mean_tokens"] == pytest.approx((8 * 3 + 7 * 4 + 7 * 5 + 3 * 6 + 7 * 7) / 32, abs=0.01)
    assert {key for key in first if key.startswith("latency")} == {
        "latency_ms_batch1", "latency_ms_batch32", "latency_sample_mean_tokens"}
    latency = first["latency_ms_batch32"]  # rounded to 0.001 ms; the throughput comes from the unrounded figure
    assert 32e3 / (latency + 0.0005) - 0.05 <= first["samples_per_s_batch32"] <= 32e3 / max(latency - 0.0005, 1e-9) + 0.05
    assert all(math.isfinite(first[key]) and first[key] > 0 for key in ("latency_ms_batch1", "latency_ms_batch32"))
    assert first["mean_tokens_per_row"] == second["mean_tokens_per_row"]
