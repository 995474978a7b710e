"""Alignment targets: the teacher's embedding of each sentence in one language, looked up by ``index_id``.

Parallel multilingual data (SIB-200, FLORES) holds the same sentence in many languages, tied together
by ``index_id``. With ``distill.align_language`` the teacher embeds every training row of that
language once, before distilling, and every training row in any language is then pulled towards the
embedding of its own sentence in that language: a student reading Yoruba learns where the teacher puts
the English sentence, which the teacher understands far better.

The table is small (one vector per distinct sentence) and lives beside the job's output as a plain
``.npz`` (no pickled objects); the feeder attaches each row's vector to its work batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from polydistill.storage.datasets import INDEX_ID

TABLE_FILE = "alignment_targets.npz"


class AlignmentDataError(ValueError):
    """The data cannot give alignment targets; the message says what to change."""


@dataclass(frozen=True)
class AlignmentTable:
    """``vectors[i]`` is the teacher's embedding of the sentence whose index_id is ``index_ids[i]``."""

    language: str
    index_ids: np.ndarray  # [m], integers or strings, unique
    vectors: np.ndarray  # [m, d] float16

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.index_ids):
            raise ValueError(f"alignment table: {len(self.index_ids)} index ids but vectors of shape "
                             f"{list(self.vectors.shape)}; expected [{len(self.index_ids)}, d]")
        if len(np.unique(self.index_ids)) != len(self.index_ids):
            raise ValueError("alignment table: an index_id appears twice")

    def save(self, folder: Path | str) -> Path:
        """Written beside and renamed into place, so a reader never sees half a table."""
        path = Path(folder) / TABLE_FILE
        partial = path.with_suffix(".partial")
        with partial.open("wb") as handle:
            np.savez(handle, language=np.array(self.language), index_ids=self.index_ids, vectors=self.vectors)
        partial.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path | str) -> "AlignmentTable":
        path = Path(folder) / TABLE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no alignment targets in {path}: the driver writes them before the feeder "
                                    "starts; run the job with `polydistill run`")
        with np.load(path, allow_pickle=False) as stored:
            return cls(language=str(stored["language"]), index_ids=stored["index_ids"], vectors=stored["vectors"])

    def targets_for(self, index_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [n, d], found [n]) for the given rows' index_ids; a row whose sentence the table lacks
        gets zeros and found 0, so its loss term is skipped."""
        order = np.argsort(self.index_ids, kind="stable")
        sorted_ids = self.index_ids[order]
        spots = np.searchsorted(sorted_ids, index_ids).clip(max=max(len(sorted_ids) - 1, 0))
        found = (sorted_ids[spots] == index_ids) if len(sorted_ids) else np.zeros(len(index_ids), dtype=bool)
        vectors = np.zeros((len(index_ids), self.vectors.shape[1]), dtype=self.vectors.dtype)
        vectors[found] = self.vectors[order[spots[found]]]
        return vectors, found.astype(np.uint8)


def row_index_ids(dataset: Dataset, what: str = "the training split") -> np.ndarray:
    """Every row's index_id, or an error saying how to give them."""
    if INDEX_ID not in dataset.column_names:
        raise AlignmentDataError(
            f"distill.align_language needs an {INDEX_ID} column in {what} (the same sentence's id in every "
            f"language, as SIB-200 and FLORES give it): add {INDEX_ID} to the data, or unset distill.align_language")
    ids = np.asarray(dataset.with_format(None)[INDEX_ID][:])
    if ids.dtype.kind not in "iuU":  # integers or strings (storage/datasets.py); anything else would pickle
        raise AlignmentDataError(f"{what}: {INDEX_ID} must be integers or strings, found {ids.dtype} values")
    return ids


def coverage_by_language(languages: list[str], found: np.ndarray) -> dict[str, float]:
    """The share of each language's rows that have an alignment target."""
    names = np.asarray(languages)
    return {language: float(found[names == language].mean()) for language in sorted(set(languages))}


def check_coverage(coverage: dict[str, float], language: str) -> None:
    """Refuses targets that reach no row at all (index ids that never match: other types, other data)."""
    if coverage and max(coverage.values()) == 0:
        raise AlignmentDataError(
            f"no training row's {INDEX_ID} matches a sentence of {language!r}: give each translation the same "
            f"{INDEX_ID} in every language, or unset distill.align_language")


def pivot_rows(dataset: Dataset, language: str) -> np.ndarray:
    """Positions of the rows of ``language``, one per distinct index_id (the first one), in order."""
    ids = row_index_ids(dataset)
    languages = np.asarray(dataset.with_format(None)["language"][:])
    positions = np.flatnonzero(languages == language)
    if len(positions) == 0:
        found = sorted(set(languages.tolist()))
        raise AlignmentDataError(
            f"distill.align_language is {language!r}, but the training split has no row in it (languages: "
            f"{', '.join(found)}): pick one of those")
    _, first = np.unique(ids[positions], return_index=True)
    return positions[np.sort(first)]
