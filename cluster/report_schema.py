"""The job's report, declared once: what ``report.json`` holds and ``polydistill.run`` returns.

The driver assembles the sections as the job runs and validates the whole against this model
before writing it, so a key that is not declared here cannot reach ``report.json`` unnoticed.
Sections whose shape depends on the task kind (metrics per language, efficiency, compression
stages) stay mappings: their keys are the metrics each task kind reports.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Section = dict[str, Any]


class StudentSeconds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    total: float
    waiting_for_knowledge: float
    training: float


class _Declared(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DevPoint(_Declared):
    """One dev score of teacher fine-tuning."""

    step: int
    epoch: float
    accuracy: float
    per_language: dict[str, float]


class TeacherFineTuning(_Declared):
    """How the teacher was fine-tuned (student/finetune.py): its budget, its dev curve and the step chosen."""

    max_epochs: float
    max_steps: int
    steps_per_epoch: int
    eval_every_steps: int
    patience: int
    schedule: str
    lr: float
    steps_trained: int
    stopped_early: bool
    chosen_step: int
    chosen_epoch: float
    dev_accuracy: float
    curve: list[DevPoint]
    seconds: float  # the fine-tuning's wall time, when it ran (a reused teacher ran in an earlier job)
    device: str = "cpu"  # where it ran: "cuda" when its stage was given a GPU (cluster/stages.py)
    reused: bool  # taken from the fine-tuning cache instead of trained by this job


class DevSplitSummary(_Declared):
    split: str
    source: Literal["data", "train"]  # the data's own split, or rows carved from the training split
    rows: int
    rows_per_language: dict[str, int]


class LanguageScores(_Declared):
    overall: float
    per_language: dict[str, float]


class WeakLanguage(_Declared):
    language: str
    teacher: float
    baseline: str
    baseline_score: float


class TeacherGate(_Declared):
    """The teacher against the baselines on the dev split (student/teacher_gate.py); only a status and a
    note when the task has no classes to score."""

    status: Literal["passed", "weak_allowed", "refused", "skipped"]
    note: str | None = None
    min_margin: float | None = None
    allow_weak: bool | None = None
    teacher: LanguageScores | None = None
    baselines: dict[str, LanguageScores] = {}
    majority_label: str | None = None
    strongest_baseline: str | None = None
    lead_points: float | None = None  # teacher minus the strongest baseline, accuracy points
    weak_languages: list[WeakLanguage] = []  # below a baseline there, worst first
    seconds: float | None = None


class TeacherFinetune(_Declared):
    """The teacher as prepared before distilling: fine-tuning (absent when used as given) and the gate."""

    teacher_path: str
    teacher_model: str
    fine_tuning: TeacherFineTuning | None = None
    dev: DevSplitSummary | None = None
    gate: TeacherGate
    seconds: float  # the teacher's preparation in this job: fine-tuning (or reusing it) and the gate


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    # How the job ended: every sample distilled once (completed), every sample distilled once or
    # dead-lettered with messages dead-lettered on the way (completed_with_dead_letters, exit status 4:
    # samples_dead_lettered and the job's dead-letter stream say why), stopped from outside before that
    # (`polydistill stop`, SIGTERM, Ctrl-C: `polydistill resume` continues it from its checkpoint), or
    # ended without exact accounting (failed).
    status: Literal["completed", "completed_with_dead_letters", "stopped", "failed"]
    stopped_by: str | None = None  # who stopped it (cluster/stopping.py), when stopped
    # Accounting: every sample distilled exactly once per epoch.
    samples_expected: int
    samples_distilled: int
    samples_per_epoch: dict[int, int]
    batches_expected: int
    batches_applied: int
    batches_missing: int
    batches_fed: int
    feeds_lost: int = 0
    duplicates_dropped: int
    student_steps: int
    dead_letters: int
    # Samples of the planned batches that were dead-lettered and never distilled, by the dead letter's
    # reason: samples_distilled + their sum = samples_expected in a job completed with dead letters.
    samples_dead_lettered: dict[str, int] = {}
    epochs: int  # planned
    # training.patience: the epochs the student learnt (samples_expected counts them), and when dev stopped
    # improving ({after_epoch, patience, last_epoch}; null: every planned epoch was trained).
    epochs_trained: int | None = None
    stopped_early: Section | None = None
    data_parallel: Section | None = None
    resumed_from_step: int | None = None
    steps_skipped_nonfinite: int = 0
    chunk_batches_given_up: int = 0
    recoveries: list[Section] = []
    # Teachers: the starting pool size, how the pool changed, what each replica served.
    teacher_replicas: int
    teacher_pool: Section | None = None
    teachers: list[Section] = []
    teacher_pools: dict[str, Section] | None = None
    teacher_samples_per_language: dict[str, dict[str, int]] | None = None
    teacher_path: str | None = None
    teacher_finetune: TeacherFinetune | None = None
    tasks: dict[str, Section] | None = None
    # Time.
    wall_seconds: float
    total_seconds: float | None = None
    stage_seconds: dict[str, float] = {}
    # Where each heavy stage's Ray task ran (cluster/stages.py): {stage: {node_id, node_ip, device, threads, seconds}}.
    stage_placement: dict[str, Section] = {}
    student_seconds: StudentSeconds
    # The student and how it learnt.
    student_path: str
    student_init: Section = {}
    final_loss: float | None = None
    loss_history: list[dict[str, int | float | None]] = []
    # training.validate_each_epoch: the student's dev score after each completed epoch ({epoch, step, accuracy,
    # per_language}); kept_epoch: the epoch training.keep_best saved as the student (null: the last one).
    validation: list[Section] = []
    kept_epoch: int | None = None
    # The same for each hard-label ablation that scored dev: {name: {curve: [{step, epoch, accuracy, per_language}],
    # kept_step, stopped_early}}.
    ablation_validation: dict[str, Section] = {}
    wire_bytes_per_sample: float | None = None
    # What the student holds once a message is decoded, by part; packed parts (distill.value_bits,
    # feature_bits) take fewer bytes on the wire, which wire_bytes_per_sample counts.
    wire_bytes_per_sample_by_part: dict[str, float] | None = None
    pseudo_labels: Section | None = None
    knowledge_cache: Section | None = None
    extra_students: dict[str, Section] = {}
    # Data.
    labels: list[str] = []
    samples_per_language: dict[str, int] = {}
    cleaning: Section | None = None
    # Evaluation on the held-out split (absent when data.eval_split is null).
    per_language: dict[str, Section] | None = None
    overall: Section | None = None
    efficiency: Section | None = None
    eval_samples: int | None = None
    metric: str | None = None
    # Compression stages (absent without a compress section).
    stages: list[Section] | None = None
    compression: Section | None = None
    # The validated config without secrets.
    config: Section

    def as_json_dict(self) -> dict[str, Any]:
        """What ``report.json`` holds: every declared section, those the job did not produce left out."""
        return self.model_dump(mode="json", exclude_unset=True)
