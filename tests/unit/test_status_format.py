"""What `polydistill status` prints of a job's progress, from the fields its workers keep in Redis."""

from __future__ import annotations

from polydistill.cluster.jobs import format_status
from polydistill.storage.keys import dev_accuracies, dev_accuracy_field


def progress(**more) -> dict:
    return {"samples": 640, "samples_per_epoch": {"0": 320, "1": 320}, "step": 40, "loss": 0.41,
            "samples_per_s": 52.5, "teachers_wanted": 1, "teachers_running": 1, "teachers_override": None,
            "pool_reason": "steady", "replicas": {}, "streams": {}, **more}


def test_the_students_dev_accuracy_after_each_epoch_is_shown_when_it_is_scored():
    fields = {"step": "40", dev_accuracy_field(1): "0.655", dev_accuracy_field(0): "0.61"}
    shown = format_status({"submission_id": "raysubmit_1", "job_id": "j", "status": "RUNNING",
                           "progress": progress(dev_accuracy=dev_accuracies(fields))})
    assert "  dev accuracy: 61.0% after epoch 1, 65.5% after epoch 2" in shown.splitlines()
    plain = format_status({"submission_id": "raysubmit_1", "job_id": "j", "status": "RUNNING",
                           "progress": progress(dev_accuracy=[])})
    assert "dev accuracy" not in plain and "student: 640 samples (epoch 0: 320, epoch 1: 320)" in plain
