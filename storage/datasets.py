"""Load a split of labelled multilingual text into one canonical `datasets.Dataset`.

Canonical columns (`CANONICAL_FEATURES`):
- `sample_id` int64: the row's position in the loaded split, counted after language selection
  and `limit_per_language` but before cleaning, so ids stay unique and stable through cleaning
  (dropped rows leave gaps) and travel in work messages as the sample's identity.
- `text` str, `label` int64 (-1 when unlabelled), `language` str.
- `index_id` (int64, or str when not every id is an integer), only when every file of the split has
  that column: the sentence a row translates, the same in every language (SIB-200 and FLORES number
  their sentences so), by which a row finds its translations.

Sources, tried in this order:
(a) a SIB-200 style directory: `path/<lang>/<split>.tsv`, language = folder name, languages in
    sorted folder order (so the order of `languages` does not change ids); label order from
    `path/labels.txt` if present, else the sorted labels of the train split.
(b) a file, or a directory holding `<split>.<ext>` (or shards `<split>-*.<ext>`), ext one of
    tsv/csv/jsonl/json/parquet; language from `language_column`, else a single `languages`
    entry, else "und"; label order from a `labels.txt` beside the data if present.
(c) anything else that does not look like a local path: a hub dataset name passed to
    `datasets.load_dataset` (for online users; with `languages` and no `language_column`, each
    language is loaded as a config name, as `Davlan/sib200` is organised).

TSV quoting: rows are split on line ends only, never on quotes, so a stray quote cannot swallow
the rows after it. The SIB-200 files were written with CSV quoting, though: 871 texts are stored
with an outer pair of quotes and every inner quote doubled (the sentence <"Yes," he said.> is
stored with three quotes before Yes and two after the comma). A field entirely in that form --
starts and ends with a quote, every inner quote doubled -- is decoded; any other field is taken
literally.
"""

from __future__ import annotations

import csv
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, Features, Value
from datasets import Sequence as ListFeature

__all__ = [
    "CANONICAL_FEATURES",
    "DataSourceError",
    "LoadedSplit",
    "has_split",
    "load_parallel",
    "load_split",
]

CANONICAL_FEATURES = Features(
    {
        "sample_id": Value("int64"),
        "text": Value("string"),
        "label": Value("int64"),
        "language": Value("string"),
    }
)
UNLABELLED = -1
INDEX_ID = "index_id"
UNKNOWN_LANGUAGE = "und"
FILE_EXTENSIONS = ("tsv", "csv", "jsonl", "json", "parquet")
LABELS_FILE = "labels.txt"

_CONFIG_KEY = {"text": "data.text_column", "label": "data.label_column", "language": "data.language_column"}
_INT_LITERAL = re.compile(r"-?\d+")
_CSV_QUOTED_FIELD = re.compile(r'"((?:[^"]|"")*)"', re.DOTALL)


class DataSourceError(ValueError):
    """The data on disk does not match what the configuration asks for; the message says what to change."""


@dataclass(frozen=True)
class LoadedSplit:
    dataset: Dataset
    label_names: list[str]
    source: str
    languages: list[str] = field(default_factory=list)


@dataclass
class _Part:
    """Rows from one file (or hub config), before labels are encoded."""

    where: str
    texts: list[Any]
    labels: list[Any] | None
    languages: list[str]
    index_ids: list[Any] | None = None  # the INDEX_ID column, when the source has one


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_split(
    path: str,
    split: str,
    *,
    languages: list[str] | None = None,
    text_column: str = "text",
    label_column: str | None = "category",
    language_column: str | None = None,
    label_names: list[str] | None = None,
    limit_per_language: int | None = None,
    word_tags: bool = False,
) -> LoadedSplit:
    """``word_tags``: the label column holds one tag per word of the text (space-separated), for
    token classification; the dataset then has a ``tags`` column of tag ids and ``label`` -1."""
    if limit_per_language is not None and limit_per_language < 1:
        raise DataSourceError(f"limit_per_language must be at least 1, got {limit_per_language}")
    if languages is not None and len(languages) == 0:
        raise DataSourceError("languages is an empty list; leave it unset to load every language")
    if languages is not None and len(set(languages)) != len(languages):
        raise DataSourceError(f"languages lists a language twice: {languages}")
    columns = _Columns(text_column, label_column, language_column)

    local = Path(path).expanduser()
    if local.is_dir() and not _split_files(local, split) and _is_sib_directory(local):
        parts, names_hint, source = _load_sib_directory(local, split, languages, columns, limit_per_language)
    elif local.exists():
        parts, names_hint, source = _load_files(local, split, languages, columns, limit_per_language)
    elif _looks_like_local_path(path):
        raise DataSourceError(f"data path {path} does not exist (data.path)")
    else:
        parts, names_hint, source = _load_hub(path, split, languages, columns, limit_per_language)

    if label_names is not None:
        names = list(label_names)
    elif label_column is None:
        names = []
    else:
        names = names_hint(word_tags) if names_hint is not None else None
        if names is None:
            values = (v for p in parts for v in (p.labels or []))
            names = _infer_label_names(tag for v in values for tag in _split_tags(v)) if word_tags else \
                _infer_label_names(values)
    if len(set(names)) != len(names):
        raise DataSourceError(f"label names repeat a name: {names} (check labels.txt or the label_names passed in)")

    texts: list[str] = []
    labels: list[int] = []
    langs: list[str] = []
    tags: list[list[int]] = []
    for part in parts:
        part_texts = ["" if t is None else str(t) for t in part.texts]
        texts.extend(part_texts)
        if word_tags:
            tags.extend(_encode_word_tags(part_texts, part.labels, names, part.where))
            labels.extend([UNLABELLED] * len(part.texts))
        elif part.labels is None:
            labels.extend([UNLABELLED] * len(part.texts))
        else:
            labels.extend(_encode_labels(part.labels, names, part.where))
        langs.extend(part.languages)
    columns = {"sample_id": list(range(len(texts))), "text": texts, "label": labels, "language": langs}
    features = CANONICAL_FEATURES
    if word_tags:
        columns["tags"] = tags
        features = Features({**CANONICAL_FEATURES, "tags": ListFeature(Value("int64"))})
    if parts and all(part.index_ids is not None for part in parts):
        columns[INDEX_ID], kind = _index_ids([value for part in parts for value in part.index_ids])
        features = Features({**features, INDEX_ID: Value(kind)})
    dataset = Dataset.from_dict(columns, features=features)
    return LoadedSplit(dataset=dataset, label_names=names, source=source, languages=list(dict.fromkeys(langs)))


def has_split(path: str, split: str, *, languages: list[str] | None = None,
              language_column: str | None = None) -> bool:
    """Whether ``load_split`` with these arguments finds rows of its own for ``split``.

    A directory of files has it when ``<split>.<ext>`` (or its shards) is there; a SIB-200 style
    directory when every asked-for language folder (every folder, without ``languages``) holds
    ``<split>.tsv``. A single file has no named splits. A hub dataset is asked for its split names
    (those of the first language's config when, without a language column, each language is one)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if _split_files(local, split):
            return True
        if not _is_sib_directory(local):
            return False
        folders = [sub for sub in local.iterdir() if sub.is_dir() and any(sub.glob("*.tsv"))]
        wanted = folders if languages is None else [local / language for language in languages]
        return all((folder / f"{split}.tsv").is_file() for folder in wanted)
    if local.exists() or _looks_like_local_path(path):
        return False
    config = languages[0] if languages and language_column is None else None
    try:
        return split in datasets.get_dataset_split_names(path, config)
    except Exception as exc:  # offline, unknown name or config: all mean "fix data.path"
        raise DataSourceError(f"could not list the splits of hub dataset {path!r}: {exc} (data.path)") from exc


def parallel_languages(path: str) -> list[str]:
    """The languages with a Tatoeba pair file set in ``path``, sorted."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataSourceError(f"parallel data directory {path} does not exist (data.path)")
    return sorted(p.name.split(".")[1].split("-")[0] for p in root.glob("tatoeba.*-eng.eng") if p.name.count(".") == 2)


def load_parallel(path: str, language: str, *, limit: int | None = None) -> Dataset:
    """Tatoeba pairs `path/tatoeba.{language}-eng.{language}` and `...eng`, line i translating line i.

    Columns: sample_id, text (the non-English side), english, language.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataSourceError(f"parallel data directory {path} does not exist")
    other = root / f"tatoeba.{language}-eng.{language}"
    english = root / f"tatoeba.{language}-eng.eng"
    if not other.is_file() or not english.is_file():
        found = sorted(
            p.name.split(".")[1].split("-")[0] for p in root.glob("tatoeba.*-eng.eng") if p.name.count(".") == 2
        )
        raise DataSourceError(
            f"no Tatoeba pair for language {language!r} in {path} (expected {other.name} and {english.name}); "
            f"languages present: {', '.join(found) or 'none'}"
        )
    other_lines = _read_lines(other)
    english_lines = _read_lines(english)
    if len(other_lines) != len(english_lines):
        raise DataSourceError(
            f"{other} has {len(other_lines)} lines but {english} has {len(english_lines)}; "
            "parallel files must align line by line"
        )
    if limit is not None:
        other_lines, english_lines = other_lines[:limit], english_lines[:limit]
    return Dataset.from_dict(
        {
            "sample_id": list(range(len(other_lines))),
            "text": other_lines,
            "english": english_lines,
            "language": [language] * len(other_lines),
        },
        features=Features(
            {
                "sample_id": Value("int64"),
                "text": Value("string"),
                "english": Value("string"),
                "language": Value("string"),
            }
        ),
    )


# --------------------------------------------------------------------------------------------
# Source (a): SIB-200 style directory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    text: str
    label: str | None
    language: str | None

    def wanted(self) -> list[str]:
        return [c for c in (self.text, self.label, self.language) if c is not None]

    def key_for(self, column: str) -> str:
        for role in ("text", "label", "language"):
            if getattr(self, role) == column:
                return _CONFIG_KEY[role]
        return "data"


def _is_sib_directory(root: Path) -> bool:
    return any(sub.is_dir() and any(sub.glob("*.tsv")) for sub in root.iterdir())


def _load_sib_directory(root, split, languages, columns: _Columns, limit):
    with_split = sorted(sub.name for sub in root.iterdir() if (sub / f"{split}.tsv").is_file())
    if not with_split:
        splits = sorted({p.stem for p in root.glob("*/*.tsv")})
        raise DataSourceError(f"no language folder in {root} has {split}.tsv; splits present: {', '.join(splits)}")
    if languages is None:
        chosen = with_split
    else:
        missing = [lang for lang in languages if lang not in with_split]
        if missing:
            raise DataSourceError(
                f"language(s) {', '.join(missing)} not found in {root} for split {split!r} (data.languages); "
                f"languages present: {', '.join(with_split)}"
            )
        chosen = sorted(languages)

    # The folder names the language, so a language column is not needed here.
    file_columns = _Columns(columns.text, columns.label, None)
    parts = []
    for lang in chosen:
        file = root / lang / f"{split}.tsv"
        data = _read_columns(file, file_columns)
        n = len(data[columns.text])
        parts.append(
            _Part(
                where=str(file),
                texts=data[columns.text],
                labels=None if columns.label is None else data[columns.label],
                languages=[lang] * n,
                index_ids=data.get(INDEX_ID),
            )
        )
    if limit is not None:
        parts = _select_languages(parts, None, limit, str(root))

    def names_hint(word_tags: bool = False) -> list[str]:
        labels_file = root / LABELS_FILE
        if labels_file.is_file():
            return _read_label_file(labels_file)
        train_values: list[Any] = []
        for lang in chosen:
            train = root / lang / "train.tsv"
            if train.is_file():
                train_values.extend(_read_columns(train, _Columns(columns.text, columns.label, None))[columns.label])
        return _infer_label_names(train_values) if train_values else None

    source = f"SIB-200 style directory {root} (split {split}, {len(chosen)} languages)"
    return parts, (names_hint if columns.label is not None else None), source


# --------------------------------------------------------------------------------------------
# Source (b): a file or a directory of files
# --------------------------------------------------------------------------------------------


def _split_files(root: Path, split: str) -> list[Path]:
    found = []
    for ext in FILE_EXTENSIONS:
        found += [root / f"{split}.{ext}"] if (root / f"{split}.{ext}").is_file() else []
        found += sorted(root.glob(f"{split}-*.{ext}"))
    return found


def _load_files(local: Path, split, languages, columns: _Columns, limit):
    if local.is_dir():
        files = _split_files(local, split)
        if not files:
            present = sorted(p.name for p in local.iterdir() if p.suffix.lstrip(".") in FILE_EXTENSIONS)
            raise DataSourceError(
                f"no file for split {split!r} in {local} (expected {split}.<{'|'.join(FILE_EXTENSIONS)}>); "
                f"data files present: {', '.join(present) or 'none'}"
            )
        if len({f.suffix for f in files}) > 1:
            raise DataSourceError(f"split {split!r} in {local} has files of several formats: {[f.name for f in files]}")
        label_dir = local
    else:
        if local.suffix.lstrip(".") not in FILE_EXTENSIONS:
            raise DataSourceError(f"{local}: unsupported file type; expected one of {', '.join(FILE_EXTENSIONS)}")
        files = [local]
        label_dir = local.parent

    if columns.language is None and languages is not None and len(languages) > 1:
        raise DataSourceError(
            f"{local} has no language column configured but {len(languages)} languages were asked for; "
            "set data.language_column, or list a single language"
        )
    fixed_language = languages[0] if (columns.language is None and languages) else UNKNOWN_LANGUAGE

    parts = []
    for file in files:
        data = _read_columns(file, columns)
        n = len(data[columns.text])
        langs = (
            ["" if v is None else str(v) for v in data[columns.language]]
            if columns.language is not None
            else [fixed_language] * n
        )
        parts.append(
            _Part(
                where=str(file),
                texts=data[columns.text],
                labels=None if columns.label is None else data[columns.label],
                languages=langs,
                index_ids=data.get(INDEX_ID),
            )
        )
    parts = _select_languages(parts, languages if columns.language is not None else None, limit, str(local))

    def names_hint(word_tags: bool = False) -> list[str] | None:
        labels_file = label_dir / LABELS_FILE
        if labels_file.is_file():
            return _read_label_file(labels_file)
        train_files = _split_files(local, "train") if local.is_dir() and split != "train" else []
        if train_files:
            values = [v for f in train_files for v in _read_columns(f, columns)[columns.label]]
            return _infer_label_names([t for v in values for t in _split_tags(v)] if word_tags else values)
        return None

    source = f"{'directory' if local.is_dir() else 'file'} {local}" + (f" (split {split})" if local.is_dir() else "")
    return parts, (names_hint if columns.label is not None else None), source


def _select_languages(parts: list[_Part], languages, limit, where: str) -> list[_Part]:
    """Keep the asked-for languages (in file order) and at most `limit` rows of each.

    The rows kept under a limit are a seeded random sample in file order, not the first rows:
    files are often sorted (SIB-200's test split is sorted by topic), and a head would keep a
    single class.
    """
    if languages is not None:
        present = list(dict.fromkeys(lang for p in parts for lang in p.languages))
        missing = [lang for lang in languages if lang not in present]
        if missing:
            raise DataSourceError(
                f"language(s) {', '.join(missing)} not found in {where} (data.languages); "
                f"languages present: {', '.join(sorted(present))}"
            )
    if languages is None and limit is None:
        return parts
    wanted = None if languages is None else set(languages)
    positions: dict[str, list[tuple[int, int]]] = {}
    for part_index, p in enumerate(parts):
        for i, lang in enumerate(p.languages):
            if wanted is None or lang in wanted:
                positions.setdefault(lang, []).append((part_index, i))
    kept: set[tuple[int, int]] = set()
    for lang, rows in positions.items():
        if limit is not None and len(rows) > limit:
            rng = np.random.default_rng(zlib.crc32(lang.encode()))
            rows = [rows[j] for j in sorted(rng.choice(len(rows), size=limit, replace=False))]
        kept.update(rows)
    out = []
    for part_index, p in enumerate(parts):
        keep = [i for i in range(len(p.languages)) if (part_index, i) in kept]
        out.append(
            _Part(
                where=p.where,
                texts=[p.texts[i] for i in keep],
                labels=None if p.labels is None else [p.labels[i] for i in keep],
                languages=[p.languages[i] for i in keep],
                index_ids=None if p.index_ids is None else [p.index_ids[i] for i in keep],
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Source (c): hub dataset (online users only; tests never reach the network)
# --------------------------------------------------------------------------------------------


def _looks_like_local_path(path: str) -> bool:
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or any(path.endswith("." + ext) for ext in FILE_EXTENSIONS)
    )


def _load_hub(name: str, split, languages, columns: _Columns, limit):
    def fetch(*config: str) -> Dataset:
        try:
            return datasets.load_dataset(name, *config, split=split)
        except Exception as exc:  # offline, unknown name, unknown config: all mean "fix data.path"
            raise DataSourceError(
                f"{name!r} is not a local path, and loading it as a hub dataset"
                f"{' (config ' + config[0] + ')' if config else ''} failed: {exc} (data.path)"
            ) from exc

    loaded: list[tuple[str, str | None, Dataset]] = []
    if languages is not None and columns.language is None:
        for lang in languages:
            loaded.append((f"hub dataset {name} (config {lang}, split {split})", lang, fetch(lang)))
    else:
        loaded.append((f"hub dataset {name} (split {split})", None, fetch()))

    parts = []
    class_names: list[str] | None = None
    for where, lang, ds in loaded:
        _check_columns(where, ds.column_names, columns)
        if limit is not None and lang is not None:
            ds = ds.select(range(min(limit, len(ds))))
        plain = ds.with_format(None)
        n = len(plain)
        if columns.label is not None:
            feature = plain.features[columns.label]
            if isinstance(feature, datasets.ClassLabel) and class_names is None:
                class_names = list(feature.names)
        langs = (
            [lang] * n
            if lang is not None
            else (
                ["" if v is None else str(v) for v in plain[columns.language][:]]
                if columns.language is not None
                else [UNKNOWN_LANGUAGE] * n
            )
        )
        parts.append(
            _Part(
                where=where,
                texts=plain[columns.text][:],
                labels=None if columns.label is None else plain[columns.label][:],
                languages=langs,
                index_ids=plain[INDEX_ID][:] if INDEX_ID in plain.column_names else None,
            )
        )
    if columns.language is not None:
        parts = _select_languages(parts, languages, limit, f"hub dataset {name}")
    names_hint = (lambda word_tags=False: class_names) if columns.label is not None else None
    return parts, names_hint, f"hub dataset {name} (split {split})"


# --------------------------------------------------------------------------------------------
# Readers: each returns {column: values} for the wanted columns, after checking they exist
# --------------------------------------------------------------------------------------------


def _check_columns(where: str, present: Sequence[str], columns: _Columns) -> None:
    for column in columns.wanted():
        if column not in present:
            hint = columns.key_for(column)
            extra = " (or null for unlabelled data)" if hint == _CONFIG_KEY["label"] else ""
            raise DataSourceError(
                f"column {column!r} not found in {where}; columns there: {', '.join(map(str, present))}. "
                f"Set {hint} to one of them{extra}"
            )


def _read_columns(file: Path, columns: _Columns) -> dict[str, list[Any]]:
    """The wanted columns, and INDEX_ID too when the file has it."""
    ext = file.suffix.lstrip(".")
    if ext == "parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(file).schema_arrow.names
        _check_columns(str(file), names, columns)
        return pq.read_table(file, columns=_with_index_id(columns.wanted(), names)).to_pydict()
    if ext in ("tsv", "csv"):
        header, rows = _read_delimited(file, ext)
        _check_columns(str(file), header, columns)
        index = {name: header.index(name) for name in _with_index_id(columns.wanted(), header)}
        return {name: [row[i] for row in rows] for name, i in index.items()}
    if ext == "jsonl":
        records = _read_jsonl(file)
    elif ext == "json":
        records = _read_json(file)
    else:  # pragma: no cover - guarded by FILE_EXTENSIONS
        raise DataSourceError(f"{file}: unsupported file type")
    present = list(dict.fromkeys(k for r in records for k in r))
    _check_columns(str(file), present, columns)
    return {name: [r.get(name) for r in records] for name in _with_index_id(columns.wanted(), present)}


def _with_index_id(wanted: list[str], present: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*wanted, *([INDEX_ID] if INDEX_ID in present else [])]))


def _index_ids(values: list[Any]) -> tuple[list, str]:
    """The INDEX_ID column as integers when every id is one, else as strings; and its feature type."""
    as_ints = [_as_int(value) for value in values]
    if all(value is not None for value in as_ints):
        return as_ints, "int64"
    return ["" if value is None else str(value) for value in values], "string"


def _check_utf8(file: Path) -> None:
    """Names the file and line of the first byte that is not UTF-8, instead of a bare codec error."""
    raw = file.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataSourceError(
            f"{file}, line {line}: byte {raw[exc.start]:#04x} at offset {exc.start} is not UTF-8; "
            "re-encode the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
        ) from None


def _read_delimited(file: Path, ext: str) -> tuple[list[str], list[list[str]]]:
    _check_utf8(file)
    with open(file, newline="", encoding="utf-8-sig") as fh:
        if ext == "csv":
            reader = csv.reader(fh)
            rows = [row for row in reader if row]
        else:
            # Split on tabs and line ends only (see the module docstring), then decode fields that
            # are in CSV-quoted form.
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [[_unquote(v) for v in row] for row in reader if row]
    if not rows:
        raise DataSourceError(f"{file} is empty; expected a header row naming the columns")
    header, body = rows[0], rows[1:]
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataSourceError(
                f"{file}: data row {i + 1} has {len(row)} fields but the header has {len(header)} "
                f"({', '.join(header)}); a field may contain a stray delimiter"
            )
    return header, body


def _unquote(value: str) -> str:
    m = _CSV_QUOTED_FIELD.fullmatch(value)
    return m.group(1).replace('""', '"') if m else value


def _read_jsonl(file: Path) -> list[dict[str, Any]]:
    _check_utf8(file)
    records = []
    with open(file, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{file}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataSourceError(f"{file}:{n}: expected a JSON object per line, got {type(record).__name__}")
            records.append(record)
    return records


def _read_json(file: Path) -> list[dict[str, Any]]:
    with open(file, encoding="utf-8-sig") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataSourceError(f"{file}: columns have different lengths {sorted(lengths)}")
        keys = list(data)
        return [dict(zip(keys, values)) for values in zip(*data.values())]
    raise DataSourceError(
        f"{file}: expected a list of records, {{'data': [records]}}, or {{column: [values]}}; use .jsonl for one record per line"
    )


def _read_lines(file: Path) -> list[str]:
    # Split on "\n" only: str.splitlines() would also split on U+2028, U+0085 and friends,
    # which occur inside sentences and would misalign the two sides.
    text = file.read_text(encoding="utf-8-sig")
    if text.endswith("\n"):
        text = text[:-1]
    return [line.rstrip("\r") for line in text.split("\n")] if text else []


def _read_label_file(file: Path) -> list[str]:
    return [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_LITERAL.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _infer_label_names(values) -> list[str]:
    """Integer labels name themselves 0..max; anything else gives sorted unique strings."""
    present = [v for v in values if not _is_missing(v)]
    ints = [_as_int(v) for v in present]
    if present and all(i is not None for i in ints):
        if min(ints) < UNLABELLED:
            raise DataSourceError(f"integer labels must be >= 0 (or -1 for unlabelled), found {min(ints)}")
        return [str(i) for i in range(max(ints) + 1)]
    return sorted({str(v).strip() for v in present})


def _split_tags(value: Any) -> list[str]:
    return [] if _is_missing(value) else str(value).split()


def _encode_word_tags(texts: list[str], values: list[Any] | None, names: list[str], where: str) -> list[list[int]]:
    """One tag id per whitespace-separated word of each text; a row whose counts differ is an error."""
    if values is None:
        raise DataSourceError(f"{where}: token classification needs a tag column (data.label_column)")
    index = {name: i for i, name in enumerate(names)}
    encoded = []
    for row, (text, value) in enumerate(zip(texts, values)):
        tags, words = _split_tags(value), text.split()
        if len(tags) != len(words):
            raise DataSourceError(f"{where}, row {row + 1}: {len(words)} words but {len(tags)} tags; the tag column "
                                  "needs one space-separated tag per word of the text")
        unknown = [tag for tag in tags if tag not in index]
        if unknown:
            raise DataSourceError(f"{where}, row {row + 1}: tags {sorted(set(unknown))[:5]} are not among the tag "
                                  f"names {names[:20]} (labels.txt beside the data)")
        encoded.append([index[tag] for tag in tags])
    return encoded


def _encode_labels(values: list[Any], names: list[str], where: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    # A numeric string that is not itself a name is read as an index, unless names are numeric too.
    numeric_names = any(_INT_LITERAL.fullmatch(n) for n in names)
    out = []
    for value in values:
        if _is_missing(value):
            out.append(UNLABELLED)
            continue
        key = value.strip() if isinstance(value, str) else value
        if isinstance(key, str) and key in index:
            out.append(index[key])
            continue
        as_int = _as_int(key)
        if as_int is not None and (not isinstance(key, str) or not numeric_names):
            if as_int == UNLABELLED or 0 <= as_int < len(names):
                out.append(as_int)
                continue
            raise DataSourceError(
                f"label {as_int} in {where} is out of range for {len(names)} label names "
                f"({', '.join(names)}); check labels.txt beside the data or the label_names passed in"
            )
        if isinstance(key, str) and str(as_int) in index:
            out.append(index[str(as_int)])
            continue
        raise DataSourceError(
            f"unknown label {value!r} in {where}; known labels: {', '.join(names) or 'none'}. "
            "Add it to labels.txt beside the data (or to the label_names passed in), or fix the data"
        )
    return out
