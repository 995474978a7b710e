"""Multilingual sentence-embedding distillation on parallel data: the teacher embeds the English
side, the student learns to map both sides onto it; evaluated by bitext retrieval per language."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModel

from polydistill.cluster.config import ConfigError, load_config
from polydistill.cluster.driver import run_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_embedding.yaml"


def test_embedding_example_distils_both_sides_and_reports_retrieval(tmp_path, redis_server, local_ray):
    config = load_config(EXAMPLE, [f"transport.redis_url={redis_server.url}", "data.languages=[fra, swh]",
                                   "data.limit_per_language=160", "data.parallel_test_rows=60"],
                         output_dir=str(tmp_path / "out"))
    report = run_job(config, show_progress=False)

    assert report["samples_distilled"] == report["samples_expected"] == 2 * 2 * 160
    assert report["duplicates_dropped"] == 0 and report["batches_missing"] == 0
    # Both sides learn: the loss log carries the English and the translation term.
    assert {"embedding", "translation"} <= set(report["loss_history"][-1])
    assert report["metric"] == "bitext retrieval accuracy"
    for language in ("fra", "swh"):
        row = report["per_language"][language]
        for model in ("teacher", "student"):
            assert row[model]["n"] == 60 and 0 <= row[model]["accuracy"] <= 1
            assert row[model]["accuracy"] == pytest.approx((row[model]["eng_to_xx"] + row[model]["xx_to_eng"]) / 2)
    # A random teacher matches pairs only through shared pieces (names, numbers): 12-23 % here. The
    # student follows it, at least three times chance (1/60) on both languages.
    assert min(report["per_language"][lang]["student"]["accuracy"] for lang in ("fra", "swh")) > 3 / 60
    encoder = AutoModel.from_pretrained(report["student_path"])
    assert encoder.config.num_hidden_layers == 2 and encoder.config.hidden_size == 64
    # Embeddings, no classes: 128 fp16 values a sample plus the batch itself.
    assert report["wire_bytes_per_sample_by_part"]["embeddings"] == 256
    same_embeddings_in_sentence_transformers(Path(report["student_path"]), config.data.max_length)


def same_embeddings_in_sentence_transformers(student: Path, max_length: int) -> None:
    """The saved student is a sentence-transformers model embedding as retrieval was scored."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from polydistill.student.retrieval import embed

    texts = ["The cat sat on the mat.", "Le chat est assis sur le tapis.", "Paka ameketi kwenye mkeka."]
    tokenizer = AutoTokenizer.from_pretrained(student)
    token_ids = [np.array(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]) for text in texts]
    ours = embed(AutoModel.from_pretrained(student), token_ids, tokenizer.pad_token_id)
    theirs = SentenceTransformer(str(student), device="cpu").encode(texts, convert_to_numpy=True)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_embedding_task_refuses_class_losses_and_needs_parallel_data(tmp_path):
    with pytest.raises(ConfigError, match="distill.soft_weight to 0"):
        load_config(EXAMPLE, ["distill.soft_weight=0.5"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.parallel: true"):
        load_config(EXAMPLE, ["data.parallel=false"], output_dir=str(tmp_path))
