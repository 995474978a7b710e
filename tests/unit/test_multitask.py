"""Multi-task jobs without Ray or Redis: the epoch's interleaving of the tasks' batches, the config's
views and refusals, the task on the wire and the task work streams."""

from __future__ import annotations

import numpy as np
import pytest

from polydistill.actors.multitask_feeder import interleave_tasks, task_language
from polydistill.cluster.config import ConfigError, validate_config
from polydistill.storage.keys import JobKeys
from polydistill.storage.wire import WorkBatch, decode, encode


def test_weights_set_each_tasks_share_of_the_order():
    order = interleave_tasks({"a": 3, "b": 6}, {"a": 1.0, "b": 2.0})
    assert [task for task, _ in order] == ["b", "a", "b", "b", "a", "b", "b", "a", "b"]
    # every batch of every task exactly once, each task's own batches in their order
    assert [index for task, index in order if task == "a"] == [0, 1, 2]
    assert [index for task, index in order if task == "b"] == list(range(6))


def test_a_task_that_runs_out_leaves_the_rest_to_the_others():
    order = interleave_tasks({"main": 5, "small": 1}, {"main": 1.0, "small": 1.0})
    assert [task for task, _ in order] == ["main", "small", "main", "main", "main", "main"]
    assert interleave_tasks({"a": 0, "b": 2}, {"a": 1.0, "b": 1.0}) == [("b", 0), ("b", 1)]


def test_extra_tasks_count_their_languages_apart():
    assert task_language("main", "fra") == "fra" and task_language("tags", "fra") == "tags/fra"


TEACHER = {"model": "random", "config": {"model_type": "bert"}}
TAGGING = {"name": "tags", "task": "token-classification", "teacher": TEACHER, "weight": 2.0,
           "data": {"path": "/c", "label_column": "tags", "word_tags": True, "language_column": "language"}}


def multi_task(**changes):
    return validate_config({"teacher": TEACHER, "data": {"path": "/d"}, "extra_tasks": [TAGGING], **changes})


def test_each_task_is_seen_as_a_job_of_its_own():
    config = multi_task()
    assert config.task_names == ["main", "tags"]
    tags = config.for_task("tags")
    assert (tags.task, tags.data.path, tags.extra_tasks, tags.student) == ("token-classification", "/c", [],
                                                                            config.student)
    assert config.for_task("main").task == "sequence-classification"
    assert config.task_weight_of("tags") == 2.0 and config.task_weight_of("main") == 1.0
    stage = config.task_stage("tags")
    assert (stage.name, stage.task, stage.count) == ("tags", "tags", 1)


@pytest.mark.parametrize("changes, message", [
    ({"extra_tasks": [{**TAGGING, "name": "main"}]}, "'main' is taken"),
    ({"extra_tasks": [TAGGING, TAGGING]}, "'tags' is taken or repeated"),
    ({"student": {"trim_vocabulary": True}}, "student.trim_vocabulary"),
    ({"knowledge_cache": {"enabled": True}}, "knowledge_cache.enabled"),
    ({"extra_tasks": [{**TAGGING, "data": {"path": "/c", "label_column": "tags"}}]},
     r"extra_tasks\[0\] \(tags\): .*data.word_tags: true"),
])
def test_multi_task_settings_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        multi_task(**changes)


def test_a_batch_says_its_task_and_goes_to_its_tasks_stream():
    work = WorkBatch(job_id="j", epoch=0, batch_id=4, sample_ids=np.arange(2), languages=("fra", "swh"),
                     input_ids=np.ones((2, 3), np.int32), attention_mask=np.ones((2, 3), np.uint8), task="tags")
    assert decode(encode(work)).task == "tags"
    keys = JobKeys("j")
    assert keys.work_stream_of("main") == keys.work_stream
    assert keys.work_stream_of("tags") == "polydistill:j:work:tags"
    assert keys.teacher_inputs(1, ["main", "tags"]) == [keys.work_stream, "polydistill:j:work:tags"]
    assert keys.stage_streams(0, 1, "tags") == ("polydistill:j:work:tags", keys.knowledge_stream)
