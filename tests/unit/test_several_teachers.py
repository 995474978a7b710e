"""Several teachers in one job: the mixture the student learns from, the per-teacher wire field,
the stage streams, routing counts and the config's refusals. Hand-computed where numbers matter:

  teacher A logits [ln 3, 0] -> [3/4, 1/4];  teacher B logits [0, ln 3] -> [1/4, 3/4]
  weights 1 and 3, both serving a row: p = (1·[3/4, 1/4] + 3·[1/4, 3/4]) / 4 = [3/8, 5/8]
"""

import math

import numpy as np
import pytest
import torch

from polydistill.cluster.config import ConfigError, validate_config
from polydistill.storage.keys import JobKeys
from polydistill.storage.wire import Knowledge, TeacherVote, WireError, WorkBatch, decode, encode
from polydistill.student.losses import ensemble_log_probs, soft_label_kl
from polydistill.student.objectives import ensemble_soft_labels, served_counts

LN3 = math.log(3.0)
A = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
B = torch.tensor([[0.0, LN3], [0.0, LN3]])


def test_mixture_of_two_teachers_by_hand():
    served = [torch.tensor([1, 1]), torch.tensor([1, 0])]  # B did not serve row 1
    log_p = ensemble_log_probs([A, B], served, [1.0, 3.0], temperature=1.0)
    np.testing.assert_allclose(log_p.exp().numpy(), [[3 / 8, 5 / 8], [3 / 4, 1 / 4]], rtol=1e-6)


def test_mixture_softens_each_teacher_at_the_temperature():
    # At T = 2, A -> softmax([ln3/2, 0]) = [sqrt3, 1]/(sqrt3 + 1); alone (B unserved) that is the target.
    log_p = ensemble_log_probs([A[:1], B[:1]], [torch.tensor([1]), torch.tensor([0])], [1.0, 1.0], temperature=2.0)
    s3 = math.sqrt(3.0)
    np.testing.assert_allclose(log_p.exp().numpy(), [[s3 / (s3 + 1), 1 / (s3 + 1)]], rtol=1e-6)


def test_T_log_p_as_teacher_logits_distils_exactly_towards_the_mixture():
    temperature = 2.0
    log_p = ensemble_log_probs([A, B], [torch.ones(2), torch.ones(2)], [1.0, 3.0], temperature=temperature)
    student = torch.zeros(2, 2, requires_grad=True)
    loss = soft_label_kl(student, temperature * log_p, temperature=temperature)
    p = log_p.exp()
    by_hand = (p * (log_p - math.log(0.5))).sum(-1).mean() * temperature**2
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-6)
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_a_row_no_teacher_served_is_an_error():
    with pytest.raises(ValueError, match=r"rows \[1\] were served by no teacher"):
        ensemble_log_probs([A, B], [torch.tensor([1, 0]), torch.tensor([1, 0])], [1.0, 1.0], temperature=1.0)


def _work(languages=("eng_Latn", "swh_Latn", "yor_Latn")) -> WorkBatch:
    n = len(languages)
    return WorkBatch(job_id="job", epoch=0, batch_id=3, sample_ids=np.arange(n), languages=languages,
                     input_ids=np.ones((n, 4), dtype=np.int32), attention_mask=np.ones((n, 4), dtype=np.uint8),
                     labels=np.zeros(n, dtype=np.int64))


def _knowledge() -> Knowledge:
    votes = (TeacherVote("teacher", np.array([[LN3, 0], [LN3, 0], [LN3, 0]], dtype=np.float32), np.ones(3, np.uint8)),
             TeacherVote("africa", np.array([[0, 0], [0, LN3], [0, LN3]], dtype=np.float32),
                         np.array([0, 1, 1], np.uint8)))
    return Knowledge(work=_work(), teacher_id="teacher-0", ensemble=votes)


def test_votes_survive_the_wire_and_are_checked():
    decoded = decode(encode(_knowledge()))
    assert [vote.teacher for vote in decoded.ensemble] == ["teacher", "africa"]
    np.testing.assert_array_equal(decoded.ensemble[1].served, [0, 1, 1])
    assert decoded.ensemble[1].logits.dtype == np.float32
    with pytest.raises(WireError, match="appears twice"):
        Knowledge(work=_work(), teacher_id="t", ensemble=(_knowledge().ensemble[0],) * 2)
    with pytest.raises(WireError, match="2 rows for a batch of 3"):
        Knowledge(work=_work(), teacher_id="t",
                  ensemble=(TeacherVote("x", np.zeros((2, 2), np.float32), np.ones(2, np.uint8)),))
    with pytest.raises(WireError, match=r"TeacherVote.served: expected shape"):
        TeacherVote("x", np.zeros((3, 2), np.float32), np.ones(2, np.uint8))


def test_served_counts_and_the_student_side_mixture():
    knowledge = _knowledge()
    assert served_counts(knowledge) == {"teacher": {"eng_Latn": 1, "swh_Latn": 1, "yor_Latn": 1},
                                        "africa": {"swh_Latn": 1, "yor_Latn": 1}}
    soft = ensemble_soft_labels(knowledge, {"teacher": 1.0, "africa": 3.0}, temperature=1.0)
    probs = torch.softmax(torch.from_numpy(soft.logits), -1).numpy()
    np.testing.assert_allclose(probs, [[3 / 4, 1 / 4], [3 / 8, 5 / 8], [3 / 8, 5 / 8]], rtol=1e-5)
    with pytest.raises(Exception, match=r"teacher\(s\) \['africa'\] that this job does not list"):
        ensemble_soft_labels(knowledge, {"teacher": 1.0}, temperature=1.0)


def test_teachers_pass_batches_along_their_own_streams():
    keys = JobKeys("job")
    assert keys.stage_streams(0, 1) == (keys.work_stream, keys.knowledge_stream)
    assert keys.stage_streams(0, 3) == (keys.work_stream, "polydistill:job:stage:1")
    assert keys.stage_streams(1, 3) == ("polydistill:job:stage:1", "polydistill:job:stage:2")
    assert keys.stage_streams(2, 3) == ("polydistill:job:stage:2", keys.knowledge_stream)
    assert keys.teacher_inputs(3) == [keys.work_stream, "polydistill:job:stage:1", "polydistill:job:stage:2"]
    with pytest.raises(ValueError):
        keys.stage_streams(3, 3)


TEACHER = {"model": "random", "config": {"model_type": "bert"}}


def _config(**changes):
    raw = {"teacher": dict(TEACHER), "data": {"path": "/data"},
           "extra_teachers": [{**TEACHER, "name": "africa", "languages": ["swh_Latn"], "weight": 2.0}]}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return validate_config(raw)


def test_stages_follow_the_config():
    config = _config()
    assert config.teacher_names == ["teacher", "africa"]
    stage = config.teacher_stage("africa")
    assert (stage.index, stage.count, stage.weight, stage.languages) == (1, 2, 2.0, ("swh_Latn",))
    assert stage.serves("swh_Latn") and not stage.serves("eng_Latn") and config.teacher_stage().serves("eng_Latn")
    assert config.for_teacher("africa").teacher.languages == ["swh_Latn"]


@pytest.mark.parametrize("changes, message", [
    ({"distill.top_k": 4}, "distill.top_k"),
    ({"task": "masked-lm", "data.label_column": None, "distill.top_k": None}, "task masked-lm"),
    ({"knowledge_cache.enabled": True}, "knowledge_cache.enabled"),
    ({"teacher.languages": ["eng_Latn"], "distill": {"hidden_weight": 1.0, "hidden_layers": "uniform"}},
     "must serve every language"),
    ({"extra_teachers": [{**TEACHER, "name": "teacher"}]}, "'teacher' is the main teacher's"),
    ({"extra_teachers": [], "teacher.languages": ["eng_Latn"]}, "extra_teachers is empty"),
])
def test_settings_several_teachers_cannot_honour_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        _config(**changes)


def test_a_local_ray_offers_a_slot_for_every_teacher_pool():
    from polydistill.cluster.services import logical_cpus_needed

    config = _config()  # main teacher and one extra, one replica each at 1 CPU, and the student's 1
    assert logical_cpus_needed(config) == 3.0
