"""Students with tokenizers of their own: work batches carry the teacher's tokenization of each text and
one per student tokenizer, each student reads its own ids, and sequence-level knowledge (soft labels)
needs no alignment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from polydistill.cluster.config import ConfigError
from polydistill.cluster.driver import run_job
from polydistill.storage.datasets import load_split
from polydistill.storage.vocab import train_wordpiece_tokenizer
from tests.integration.test_pipeline import EXAMPLES, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_student_with_its_own_tokenizer_learns_every_sample_once(tmp_path, redis_server, local_ray):
    texts = load_split(str(EXAMPLES / "data" / "sib200"), "train", languages=["eng_Latn", "swh_Latn"]).dataset["text"]
    own = train_wordpiece_tokenizer(texts, 1500, tmp_path / "own-tokenizer")
    config = tiny_config(tmp_path, redis_server.url, f"student.tokenizer={tmp_path / 'own-tokenizer'}",
                         f"student.config.vocab_size={len(own)}", "training.epochs=1", "teacher.replicas=1",
                         "data.limit_per_language=100")
    report = run_job(config, show_progress=False)

    assert report["samples_distilled"] == report["samples_expected"] == 200
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    student_tokenizer = AutoTokenizer.from_pretrained(report["student_path"])
    assert student_tokenizer.get_vocab() == own.get_vocab()
    model = AutoModelForSequenceClassification.from_pretrained(report["student_path"])
    assert model.config.vocab_size == len(own) and report["teacher_path"]
    assert len(AutoTokenizer.from_pretrained(report["teacher_path"])) != len(own)
    # Evaluated through its own tokenizer, beside the teacher.
    assert 0 <= report["per_language"]["swh_Latn"]["student"]["accuracy"] <= 1


def test_a_student_with_a_trimmed_vocabulary_learns_its_own_ids_of_every_sample_once(tmp_path, redis_server,
                                                                                      local_ray):
    config = tiny_config(tmp_path, redis_server.url, "student.trim_vocabulary=true", "student.vocab_min_count=2",
                         "training.epochs=1", "teacher.replicas=1", "data.limit_per_language=100",
                         "data.languages=[eng_Latn, zho_Hans]", "evaluation.ablation=true", "evaluation.latency=false")
    report = run_job(config, show_progress=False)

    assert report["samples_distilled"] == report["samples_expected"] == 200
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    init = report["student_init"]
    assert init["trimmed_vocabulary"] and init["vocabulary_after"] < init["vocabulary_before"]
    # Its saved tokenizer is the trimmed one it trained with: the student read those ids (a teacher id would
    # not fit its embedding), and evaluation reads the held-out text through it, beside the ablation's.
    assert len(AutoTokenizer.from_pretrained(report["student_path"])) == init["vocabulary_after"]
    intervals = report["per_language"]["zho_Hans"]["intervals"]
    assert set(intervals) == {"student_minus_ablation", "retention"}
    difference = intervals["student_minus_ablation"]
    assert -1 <= difference["low"] <= difference["estimate"] <= difference["high"] <= 1
    assert report["overall"]["intervals"]["resamples"] == 1000


def test_students_of_one_teacher_pass_learn_over_vocabularies_of_their_own(tmp_path, redis_server, local_ray):
    """The main student over the pieces used twice or more, an extra one over those used five times or more
    through a factorised embedding: each learns its own tokenizer's ids of every sample once, and is evaluated
    and saved with that tokenizer."""
    config = tiny_config(tmp_path, redis_server.url, "student.trim_vocabulary=true", "student.vocab_min_count=2",
                         "extra_students=[{name: small, trim_vocabulary: true, vocab_min_count: 5, embedding_size: 16}]",
                         "training.epochs=1", "teacher.replicas=1", "data.limit_per_language=100",
                         "data.languages=[eng_Latn, zho_Hans]", "evaluation.latency=false")
    report = run_job(config, show_progress=False)

    small = report["extra_students"]["small"]
    for student in (report, small):
        assert student["samples_distilled"] == report["samples_expected"] == 200
        assert student["duplicates_dropped"] == 0
    sizes = {name: len(AutoTokenizer.from_pretrained(student["student_path"]))
             for name, student in (("student", report), ("small", small))}
    assert sizes["small"] < sizes["student"]
    assert (report["student_init"]["vocabulary_after"], small["student_init"]["vocabulary_after"]) == (
        sizes["student"], sizes["small"])
    models = {name: AutoModelForSequenceClassification.from_pretrained(student["student_path"])
              for name, student in (("student", report), ("small", small))}
    for name, size in sizes.items():
        assert models[name].config.vocab_size == size, name  # it read (and learnt) ids of its own tokenizer only
    # The small one trained as, and was saved as, the stock ALBERT model its factorised embedding makes.
    assert models["student"].config.model_type == "bert" and models["small"].config.model_type == "albert"
    assert small["student_init"]["embedding_size"] == models["small"].config.embedding_size == 16
    start = AutoModelForSequenceClassification.from_pretrained(Path(small["student_path"]).parent / "student_init")
    narrow_tables = [model.get_input_embeddings().weight for model in (start, models["small"])]
    assert narrow_tables[0].shape == narrow_tables[1].shape and not torch.equal(*narrow_tables)
    assert 0 <= report["per_language"]["zho_Hans"]["small"]["accuracy"] <= 1


def test_token_level_knowledge_across_tokenizers_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="distill.hidden_weight"):
        tiny_config(tmp_path, "redis://127.0.0.1:1/0", "student.tokenizer=bert-base-multilingual-cased",
                    "distill.hidden_layers=uniform", "distill.hidden_weight=1")

