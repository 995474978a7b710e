"""``polydistill push DIR --repo-id ORG/NAME``: a saved student, with its model card, to a model hub
repository through ``huggingface_hub`` (its token: ``HF_TOKEN`` or a stored login; never an argument).

``upload_plan`` (pure) decides what goes: the student's own files and the folders stock libraries read
(ONNX graphs, sentence-transformers modules), never training state (checkpoints, optimiser) or
anything that could carry a secret."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MODEL_CARD = "README.md"
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
# Never uploaded: training state, and files a run leaves that are not the model.
LEFT_OUT_DIRS = {"checkpoints", "knowledge_cache", "mlruns", "tensorboard", "__pycache__", ".git"}
LEFT_OUT_SUFFIXES = (".tmp", ".lock", ".pt", ".log")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PushError(ValueError):
    """The folder or repository id cannot be pushed as given; the message says what to change."""


@dataclass(frozen=True)
class UploadPlan:
    folder: Path
    files: list[str]  # paths relative to the folder, sorted
    left_out: list[str]


def upload_plan(folder: Path, repo_id: str) -> UploadPlan:
    if not REPO_ID.match(repo_id):
        raise PushError(f"--repo-id {repo_id!r}: give OWNER/NAME (letters, digits, '-', '_', '.')")
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder; give a saved student's folder (e.g. OUTPUT/student)")
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHTS):
        raise PushError(f"{folder}: no config.json and weights; give a saved student's folder (e.g. OUTPUT/student)")
    if not (folder / MODEL_CARD).is_file():
        raise PushError(f"{folder}: no model card ({MODEL_CARD}); `polydistill run` writes one beside every student "
                        "it evaluates: push the folder of such a run")
    files, left_out = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if set(relative.parts[:-1]) & LEFT_OUT_DIRS or path.name.endswith(LEFT_OUT_SUFFIXES):
            left_out.append(relative.as_posix())
        else:
            files.append(relative.as_posix())
    return UploadPlan(folder, files, left_out)


def push_student(folder: str | Path, repo_id: str, *, private: bool = False, api=None) -> str:
    """Creates the repository if needed and uploads the plan's files in one commit; returns its URL.
    ``api``: an ``huggingface_hub.HfApi`` (default: a new one)."""
    plan = upload_plan(Path(folder), repo_id)
    if api is None:
        try:
            from huggingface_hub import HfApi
        except ImportError as error:  # a dependency of transformers, so normally present
            raise PushError("polydistill push needs huggingface_hub: pip install huggingface_hub") from error
        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if private and not getattr(api.repo_info(repo_id, repo_type="model"), "private", False):
        raise PushError(f"{repo_id} exists and is public, so --private would not keep the student private: make the "
                        "repository private on the hub first, or push without --private")
    commit = api.upload_folder(folder_path=str(plan.folder), repo_id=repo_id, repo_type="model",
                               allow_patterns=plan.files, commit_message="Upload a student distilled by polydistill")
    return str(getattr(commit, "commit_url", None) or commit)
