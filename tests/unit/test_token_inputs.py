"""A student trains on exactly the token ids it reads in use: with a trimmed vocabulary, a sentence-level
student reads its own trimmed tokenizer's ids of each text, not the teacher's ids mapped to ``<unk>``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from polydistill.actors.feeder import Feeder
from polydistill.cluster.config import load_config
from polydistill.cluster.prepare import prepare_student
from polydistill.storage.job_data import load_job_split
from polydistill.student.build import materialize_random_teacher
from polydistill.student.contract import ContractError
from polydistill.student.objectives import classifier_forward
from polydistill.student.token_inputs import reads_own_token_ids, student_inputs, token_source
from polydistill.student.trainer import StudentTrainer
from polydistill.student.vocab_trim import VOCAB_MAP_FILE, VocabMap

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NO_REDIS = "redis://127.0.0.1:1/0"  # the feeder and the student connect lazily; nothing here reaches Redis


def tiny(tmp_path: Path, *overrides: str):
    return load_config(EXAMPLES / "tiny.yaml", [
        f"transport.redis_url={NO_REDIS}", "data.languages=[eng_Latn, zho_Hans]", "data.limit_per_language=60",
        "training.batch_size=16", "student.trim_vocabulary=true", "student.vocab_min_count=2", *overrides,
    ], output_dir=str(tmp_path / "out"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A trimmed-vocabulary job as the driver prepares it: the teacher, then the student's folder."""
    tmp_path = tmp_path_factory.mktemp("trimmed")
    config = tiny(tmp_path)
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = materialize_random_teacher(config.teacher, train.label_names, train.dataset["text"],
                                             tmp_path / "teacher", config.training.seed)
    init_dir, _ = prepare_student(config, teacher_dir, Path(config.output_dir).resolve(), train)
    return config, train, teacher_dir, init_dir


def test_a_trimmed_sequence_classifier_trains_on_the_ids_its_saved_tokenizer_gives(prepared):
    config, train, teacher_dir, init_dir = prepared
    saved = AutoTokenizer.from_pretrained(init_dir)
    texts = dict(zip(train.dataset["sample_id"], train.dataset["text"]))
    feeder = Feeder(config, str(teacher_dir), NO_REDIS)
    trainer = StudentTrainer(config, str(init_dir), feeder.plan().batches_per_epoch, NO_REDIS, str(init_dir.parent / "s"))
    assert trainer.runner.id_map is None  # its own ids need no mapping

    # The student's forward pass over every batch of an epoch, with a model that records what it is given.
    seen: list[np.ndarray] = []

    def model(input_ids, attention_mask, **options):
        seen.append((input_ids.numpy(), attention_mask.numpy()))
        return SimpleNamespace(logits=torch.zeros(len(input_ids), 7), hidden_states=None, attentions=None)

    head = replace(trainer.main_head, model=model)
    works = [feeder.work_batch(0, batch_id, rows) for batch_id, rows in enumerate(feeder.epoch_batches(0))]
    for work in works:
        classifier_forward(trainer.runner, head, SimpleNamespace(work=work), None)

    table = VocabMap.load(init_dir / VOCAB_MAP_FILE).table
    mapped_differs = 0
    for work, (ids, mask) in zip(works, seen):
        for row, sample_id in enumerate(work.sample_ids):
            expected = saved(texts[int(sample_id)], truncation=True, max_length=config.data.max_length)["input_ids"]
            assert ids[row][mask[row] == 1].tolist() == expected
            teacher_ids = work.input_ids[row][work.attention_mask[row] == 1]
            mapped_differs += table[teacher_ids].tolist() != expected
    # The teacher's ids through the id map, which the student used to read, differ on some rows: pieces
    # seen once were dropped and map to <unk>, where the trimmed tokenizer finds smaller kept pieces.
    assert mapped_differs > 0
    assert sum(len(work.sample_ids) for work in works) == len(train.dataset)


def test_token_level_knowledge_keeps_the_teachers_positions_through_the_id_map(prepared, tmp_path):
    config, _, _, init_dir = prepared
    features = config.model_copy(update={"distill": config.distill.model_copy(update={"hidden_weight": 1.0, "hidden_layers": "uniform"})})
    tagger = config.model_copy(update={"task": "token-classification"})
    assert reads_own_token_ids(config)
    assert not reads_own_token_ids(features) and not reads_own_token_ids(tagger)
    trainer = StudentTrainer(features, str(init_dir), 4, NO_REDIS, str(tmp_path / "s"))
    assert trainer.runner.id_map is not None


def test_a_batch_without_the_students_ids_is_refused(prepared):
    config, _, teacher_dir, _ = prepared
    work = Feeder(config, str(teacher_dir), NO_REDIS).work_batch(0, 0, np.arange(4))
    (own,) = work.student_tokens
    assert own.source == token_source(config) == "teacher trimmed to pieces used 2+ times"
    assert student_inputs(work, config)[0] is own.input_ids
    with pytest.raises(ContractError, match="carries no ids of the student's tokenizer"):
        student_inputs(replace(work, student_tokens=()), config)
    # A batch written before batches named their tokenizations carried one, which every student read.
    legacy = replace(work, student_tokens=(), student_input_ids=own.input_ids, student_attention_mask=own.attention_mask)
    assert student_inputs(legacy, config)[0] is own.input_ids


def test_students_of_one_teacher_pass_each_train_on_their_own_vocabularys_ids(tmp_path):
    """A student over a smaller vocabulary beside the main one: each reads its own tokenizer's ids of
    the same texts; a student whose settings give the main one's vocabulary shares its tokenization."""
    config = tiny(tmp_path, "extra_students=[{name: small, trim_vocabulary: true, vocab_min_count: 6}, "
                            "{name: twin, trim_vocabulary: true, vocab_min_count: 2}, {name: plain}]")
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = materialize_random_teacher(config.teacher, train.label_names, train.dataset["text"],
                                             tmp_path / "teacher", config.training.seed)
    out_dir = Path(config.output_dir).resolve()
    init_dirs = {name: prepare_student(config.for_student(name), teacher_dir, out_dir, train, name)[0]
                 for name in config.student_names}
    feeder = Feeder(config, str(teacher_dir), NO_REDIS)
    rows = np.arange(len(train.dataset))
    work = feeder.work_batch(0, 0, rows)
    assert [tokens.source for tokens in work.student_tokens] == [
        "teacher trimmed to pieces used 2+ times", "teacher trimmed to pieces used 6+ times"]

    texts = train.dataset["text"]
    read: dict[str, list[list[int]]] = {}
    for name, init_dir in init_dirs.items():
        ids, mask = student_inputs(work, config.for_student(name))
        read[name] = [row[keep == 1].tolist() for row, keep in zip(ids, mask)]
        saved = AutoTokenizer.from_pretrained(init_dir)
        assert read[name] == [saved(text, truncation=True, max_length=config.data.max_length)["input_ids"]
                              for text in texts], name
    assert read["twin"] == read["student"] and read["small"] != read["student"]
    assert student_inputs(work, config.for_student("plain"))[0] is work.input_ids
    # The smaller vocabulary segments the same texts into more pieces.
    assert sum(map(len, read["small"])) > sum(map(len, read["student"]))
