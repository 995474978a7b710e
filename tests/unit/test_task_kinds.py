"""The task kinds: one spec and one behaviour module per kind, found by the config's ``task`` name,
and the registries agreeing with the config."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import get_args

import numpy as np
import pytest

from polydistill.cluster.config import JobConfig, SharedEncoderTask
from polydistill.cluster.task_specs import TASK_SPECS, task_spec
from polydistill.storage.job_data import TokenizedSplit
from polydistill.student.build import model_class
from polydistill.student.task_kinds import TASK_KINDS, task_kind
from polydistill.student.task_kinds.masked_lm import masked_tokens
from polydistill.student.task_kinds.token_classification import tagged_tokens


def test_the_config_the_specs_and_the_kinds_name_the_same_kinds_in_the_same_order():
    names = get_args(JobConfig.model_fields["task"].annotation)
    assert tuple(TASK_SPECS) == tuple(TASK_KINDS) == names
    for name in names:
        assert task_kind(name).spec is task_spec(name) and task_spec(name).name == name
    assert set(get_args(SharedEncoderTask)) <= set(names)


def test_an_unknown_kind_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="no task kind is named 'regression'; the task kinds are sequence-class"):
        task_kind("regression")
    with pytest.raises(ValueError, match="no task kind is named 'regression'"):
        task_spec("regression")


def test_each_kind_loads_with_its_auto_class_and_names_its_metric():
    expected = {
        "sequence-classification": ("AutoModelForSequenceClassification", "accuracy", "accuracy"),
        "token-classification": ("AutoModelForTokenClassification", "word tagging accuracy", "accuracy"),
        "sentence-embedding": ("AutoModel", "bitext retrieval accuracy", "accuracy"),
        "causal-lm": ("AutoModelForCausalLM", "next-token accuracy", "accuracy"),
        "masked-lm": ("AutoModelForMaskedLM", "masked-token accuracy", "accuracy"),
        "seq2seq": ("AutoModelForSeq2SeqLM", "chrF", "chrf"),
    }
    for name, (auto_class, metric, primary) in expected.items():
        kind = task_kind(name)
        assert model_class(name).__name__ == auto_class and hasattr(model_class(name), "from_pretrained")
        assert (kind.metric, kind.primary_score) == (metric, primary)


def test_loading_a_config_imports_no_torch():
    """The specs sit under the config so that `polydistill validate` stays light: no torch, no numpy."""
    code = ("import sys; import polydistill.cluster.config; "
            "print(sorted(name for name in ('torch', 'transformers', 'numpy') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_a_decoder_built_with_random_weights_takes_its_markers_from_the_tokenizer():
    wordpiece = SimpleNamespace(bos_token_id=None, eos_token_id=None, cls_token_id=2, sep_token_id=3)
    assert task_spec("seq2seq").random_model_fields(wordpiece) == {
        "bos_token_id": 2, "decoder_start_token_id": 2, "eos_token_id": 3, "forced_eos_token_id": 3}
    with_markers = SimpleNamespace(bos_token_id=0, eos_token_id=1, cls_token_id=2, sep_token_id=3)
    assert task_spec("causal-lm").random_model_fields(with_markers) == {"bos_token_id": 0, "eos_token_id": 1}
    assert task_spec("sequence-classification").random_model_fields(wordpiece) == {}


def _rows() -> TokenizedSplit:
    return TokenizedSplit(sample_ids=np.array([7, 8]), token_ids=[np.array([2, 10, 11, 3]), np.array([2, 12, 3])],
                          labels=np.array([0, 1]), languages=["a", "b"],
                          token_labels=[np.array([-100, 1, 0, -100]), np.array([-100, 2, -100])])


def test_work_batches_as_each_kind_builds_them():
    config = SimpleNamespace(training=SimpleNamespace(seed=0), distill=SimpleNamespace(mask_rate=0.5))
    rows, indices = _rows(), np.array([1, 0])
    ids, mask, labels = task_kind("sequence-classification").work_tokens(config, None, 0)(rows, indices, 0)
    assert ids.tolist() == [[2, 12, 3, 0], [2, 10, 11, 3]] and mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert labels is None
    ids, _, labels = tagged_tokens(config, None, 0)(rows, indices, 0)
    assert labels.tolist() == [[-100, 2, -100, -100], [-100, 1, 0, -100]]
    tokenizer = type("Tokenizer", (), {"mask_token_id": 4, "all_special_ids": [0, 2, 3, 4],
                                       "name_or_path": "/teacher", "__len__": lambda self: 20})()
    make = masked_tokens(config, tokenizer, 0)
    first, second = make(rows, indices, 0), make(rows, indices, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))  # the same draw for the same epoch
    ids, mask, labels = first
    masked = labels != -100
    assert masked.any() and (ids[:, 0] == 2).all()  # specials are never masked
    assert (labels[masked] == np.array([[2, 12, 3, 0], [2, 10, 11, 3]])[masked]).all()


def test_a_masked_lm_needs_a_tokenizer_with_a_mask_token():
    tokenizer = type("Tokenizer", (), {"mask_token_id": None, "name_or_path": "/teacher"})()
    with pytest.raises(ValueError, match="task masked-lm: the teacher's tokenizer in /teacher has no mask token"):
        task_kind("masked-lm").work_tokens(None, tokenizer, 0)
