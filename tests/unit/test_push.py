"""`polydistill push`: what a student's upload holds, the errors that name what to change, and the
calls made to the hub's client (a recording stand-in for huggingface_hub.HfApi: no network here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from polydistill.cluster.cli import main
from polydistill.cluster.push import PushError, push_student, upload_plan


def student(folder: Path, card: bool = True) -> Path:
    for name, text in {"config.json": "{}", "model.safetensors": "weights", "tokenizer.json": "{}",
                       "job.yaml": "job_id: x\n", "onnx/model.int8.onnx": "graph", "1_Pooling/config.json": "{}",
                       "checkpoints/student/state.pt": "optimizer", "model.safetensors.tmp": "partial"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    if card:
        (folder / "README.md").write_text("# A student\n")
    return folder


class RecordingHub:
    def __init__(self, public: bool = False):
        self.calls = []
        self.public = public

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def repo_info(self, repo_id, **kwargs):
        return type("RepoInfo", (), {"private": not self.public})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "https://hub.example/org/student/commit/abc"


def test_the_upload_holds_the_model_its_card_and_portable_folders_never_training_state(tmp_path):
    plan = upload_plan(student(tmp_path), "org/student")
    assert plan.files == ["1_Pooling/config.json", "README.md", "config.json", "job.yaml", "model.safetensors",
                          "onnx/model.int8.onnx", "tokenizer.json"]
    assert plan.left_out == ["checkpoints/student/state.pt", "model.safetensors.tmp"]


def test_push_creates_the_repository_and_uploads_the_plan_in_one_commit(tmp_path):
    hub = RecordingHub()
    url = push_student(student(tmp_path), "org/student", private=True, api=hub)
    assert url.endswith("/commit/abc")
    (create, name, options), (upload, upload_args) = hub.calls
    assert (create, name, options) == ("create_repo", "org/student", {"private": True, "exist_ok": True,
                                                                      "repo_type": "model"})
    assert upload == "upload_folder" and upload_args["repo_id"] == "org/student"
    assert upload_args["allow_patterns"] == upload_plan(tmp_path, "org/student").files


def test_private_is_refused_when_the_repository_exists_public(tmp_path):
    hub = RecordingHub(public=True)
    with pytest.raises(PushError, match="exists and is public"):
        push_student(student(tmp_path), "org/student", private=True, api=hub)
    assert [call[0] for call in hub.calls] == ["create_repo"]  # nothing uploaded


@pytest.mark.parametrize(("make", "repo_id", "words"), [
    (lambda p: student(p, card=False), "org/student", "no model card (README.md)"),
    (lambda p: p, "org/student", "no config.json and weights"),
    (lambda p: student(p), "student", "give OWNER/NAME"),
    (lambda p: p / "missing", "org/student", "no such folder"),
])
def test_what_cannot_be_pushed_exits_2_naming_what_to_change(tmp_path, capsys, make, repo_id, words):
    folder = make(tmp_path)
    with pytest.raises(PushError, match=words.replace("(", r"\(").replace(")", r"\)")):
        upload_plan(folder, repo_id)
    assert main(["push", str(folder), "--repo-id", repo_id]) == 2
    assert words in capsys.readouterr().err


def test_an_unreachable_hub_is_one_line_and_exit_1(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-m", "polydistill", "push", str(student(tmp_path)), "--repo-id", "org/s"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: pushing ") and "Traceback" not in done.stderr
    assert "hf_not_a_real_token" not in done.stderr + done.stdout
