"""Vocabulary trimming: keep only the word pieces that the job's languages use.

A multilingual teacher such as multilingual-e5-small spends about 96M of its 118M parameters on
a 250k-row word-embedding matrix; a student for a fixed set of languages needs only the pieces
that those languages' text produces. Trimming is exact on the text the vocabulary was selected
from: the trimmed tokenizer yields the same pieces there, and the trimmed model (new ids) gives
the same outputs as the original (old ids).

Why the segmentation survives trimming:
- Unigram: Viterbi picks the best-scoring path through the lattice of in-vocabulary pieces;
  removing pieces that the best path does not use only removes worse candidates. One subtlety:
  the score of an unknown character is ``min(vocab scores) - 10``, and trimming the rare pieces
  would raise that minimum and so make unk paths cheaper. The unk piece's own score (which
  Viterbi never reads, since a literal unk token is split off as a special token first) is
  set to the original minimum to keep the unk penalty unchanged.
- WordPiece: greedy longest-match-first; the piece it chose is kept, longer ones did not match.
- BPE: the merges that fired are kept as long as every intermediate token is kept, which
  `select_vocabulary` guarantees by closing the kept set under "is a part of a kept token".

Off the training text the two differ: a word whose pieces were dropped is segmented by the trimmed
tokenizer into pieces it kept, while its old ids map to unk. So a student that learns sentence-level
knowledge reads its trimmed tokenizer's ids of the texts (student/token_inputs.py), as it does in
evaluation; one that learns per-token knowledge needs the teacher's token positions and maps the
teacher's ids with `remap_ids` through a lookup table built once (`build_id_map` / `VocabMap`),
old ids that were not kept becoming the trimmed vocabulary's unk id.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

VOCAB_MAP_FILE = "vocab_map.json"
VOCAB_MAP_FORMAT = 1
_ENCODE_BATCH = 1024
# Tokenizer settings carried over to the trimmed tokenizer (special tokens are added separately).
_CARRIED_INIT_KWARGS = (
    "model_max_length",
    "padding_side",
    "truncation_side",
    "clean_up_tokenization_spaces",
    "model_input_names",
    "extra_special_tokens",
    "additional_special_tokens",
)
_SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class VocabTrimError(ValueError):
    """A vocabulary cannot be trimmed as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Choosing the pieces


def select_vocabulary(
    tokenizer: PreTrainedTokenizerFast,
    texts: Iterable[str],
    *,
    min_count: int = 1,
    always_keep: Iterable[int] = (),
) -> list[int]:
    """The old ids to keep, sorted: special and added tokens, every id that ``texts`` produce at
    least ``min_count`` times, ``always_keep``, and what the tokenizer model needs to reproduce
    them (BPE intermediates, the byte alphabet of byte-level / byte-fallback tokenizers)."""
    if min_count < 1:
        raise VocabTrimError(f"min_count must be at least 1, got {min_count}")
    serialized = _serialized(tokenizer)
    backend = _plain_backend(serialized)
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in _batched(texts, _ENCODE_BATCH):
        encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        if ids:
            counts += np.bincount(np.concatenate(ids), minlength=vocab_size)[:vocab_size]
    keep = set(np.flatnonzero(counts >= min_count).tolist())
    keep.update(int(i) for i in tokenizer.all_special_ids)
    keep.update(int(i) for i in tokenizer.added_tokens_decoder)
    extra = [int(i) for i in always_keep]
    bad = [i for i in extra if not 0 <= i < vocab_size]
    if bad:
        raise VocabTrimError(f"always_keep ids {bad[:5]} are outside the tokenizer's vocabulary (0..{vocab_size - 1})")
    keep.update(extra)
    keep |= _required_by_model(json.loads(serialized), keep)
    return sorted(keep)


def single_character_ids(tokenizer: PreTrainedTokenizerFast, scripts: Collection[str] | None = None) -> list[int]:
    """Ids of the one-character pieces (with or without a word-boundary marker such as "\u2581" or
    "##"), only those whose character belongs to one of ``scripts`` (``character_script``) when given;
    pass them as ``always_keep`` so that an unseen word of those scripts still tokenizes into its
    characters instead of becoming unk. For multilingual-e5 and SIB-200's 24 languages the scripts of
    the training text add 8,630 pieces to the 48,463 kept at vocab_min_count 2 (every one-character
    piece would add 11,764), and the trimmed tokenizer's unk count on the test split falls from 1,018
    to 59 of 180k tokens (Chinese 368 -> 2, Japanese 254 -> 5, Korean 180 -> 3)."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    markers = ("\u2581", "##", "\u0120")
    ids = []
    for piece, i in vocab.items():
        for marker in markers:
            if piece.startswith(marker) and len(piece) > len(marker):
                piece = piece[len(marker) :]
                break
        if len(piece) == 1 and (scripts is None or character_script(piece) in scripts):
            ids.append(i)
    return sorted(ids)


def character_script(character: str) -> str | None:
    """The script a letter, mark or digit is written in, as the first word of its Unicode name ("LATIN",
    "CJK", "HANGUL", "DEVANAGARI", "COMBINING" for the diacritics every script shares); None for
    punctuation, symbols, spaces and unnamed code points, which belong to no one script."""
    if unicodedata.category(character)[0] not in "LMN":
        return None
    name = unicodedata.name(character, "")
    return name.split(" ", 1)[0] if name else None


def scripts_of(texts: Iterable[str]) -> set[str]:
    """The scripts (``character_script``) that ``texts`` are written in."""
    characters = set().union(*map(set, texts))
    return {script for script in map(character_script, characters) if script is not None}


def _required_by_model(state: dict, keep: set[int]) -> set[int]:
    """Ids that the tokenizer model needs so that the kept pieces still come out."""
    model = state["model"]
    kind = model.get("type")
    extra: set[int] = set()
    if kind == "Unigram":
        if model.get("unk_id") is not None:
            extra.add(int(model["unk_id"]))
        if model.get("byte_fallback"):
            pieces = {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
            extra.update(pieces[b] for b in _byte_pieces() if b in pieces)
    elif kind in ("WordPiece", "WordLevel", "BPE"):
        vocab = model["vocab"]
        if model.get("unk_token") in vocab:
            extra.add(vocab[model["unk_token"]])
        if kind == "BPE":
            if model.get("byte_fallback"):
                extra.update(vocab[b] for b in _byte_pieces() if b in vocab)
            if _uses_byte_level(state.get("pre_tokenizer")):
                # A byte-level BPE has no unk: a byte missing from the vocabulary is dropped silently.
                extra.update(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab)
            extra |= _bpe_closure(model, keep | extra) - keep
    return extra


def _bpe_closure(model: dict, keep: set[int]) -> set[int]:
    """``keep`` plus both parts of every merge that builds a kept token, transitively."""
    vocab = model["vocab"]
    pieces = {i: p for p, i in vocab.items()}
    parts_of: dict[str, list[tuple[str, str]]] = {}
    for left, right in _merge_pairs(model["merges"]):
        parts_of.setdefault(left + right, []).append((left, right))
    closed = set(keep)
    todo = [pieces[i] for i in keep if i in pieces]
    while todo:
        for left, right in parts_of.get(todo.pop(), ()):
            for part in (left, right):
                part_id = vocab.get(part)
                if part_id is not None and part_id not in closed:
                    closed.add(part_id)
                    todo.append(part)
    return closed


# ---------------------------------------------------------------------------------------------
# The tokenizer


def trim_tokenizer(
    tokenizer: PreTrainedTokenizerFast, keep_ids: Sequence[int], out_dir: str | Path | None
) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose vocabulary is exactly the kept pieces (new id i = old id keep_ids[i]).

    Normaliser, pre-tokenizer, decoder and post-processor are carried over (special ids in the
    post-processor and padding remapped); saved with ``save_pretrained(out_dir)`` unless
    ``out_dir`` is None.
    """
    state = json.loads(_serialized(tokenizer))
    keep = _checked_keep_ids(keep_ids, tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    old_to_new = {old: new for new, old in enumerate(keep)}
    kind = state["model"].get("type")
    model_size = _model_vocab_size(state["model"])
    in_model = [old for old in keep if old < model_size]
    beyond = keep[len(in_model) :]
    if any(old < model_size for old in beyond):
        raise VocabTrimError(
            f"keep_ids must list every id of the tokenizer model's vocabulary (< {model_size}) before the "
            f"added tokens outside it (>= {model_size}); pass them sorted"
        )

    if kind == "Unigram":
        state["model"] = _trim_unigram(state["model"], in_model, old_to_new)
    elif kind in ("WordPiece", "WordLevel"):
        state["model"] = _trim_dict_vocab(state["model"], in_model, kind)
    elif kind == "BPE":
        state["model"] = _trim_bpe(state["model"], in_model)
    else:
        raise NotImplementedError(
            f"vocabulary trimming supports Unigram, WordPiece, WordLevel and BPE tokenizer models; "
            f"this tokenizer's model is {kind!r}"
        )

    added = []
    for token in state.get("added_tokens", []):
        if token["id"] in old_to_new:
            added.append({**token, "id": old_to_new[token["id"]]})
        elif token.get("special"):
            raise VocabTrimError(
                f"special token {token['content']!r} (id {token['id']}) is not in keep_ids; "
                f"special tokens must be kept (select_vocabulary keeps them)"
            )
    state["added_tokens"] = added
    if state.get("post_processor") is not None:
        state["post_processor"] = _remap_processor(state["post_processor"], old_to_new)
    # transformers sets padding/truncation on the backend per call and leaves the last call's
    # settings behind; a saved tokenizer should not pad every encoding.
    state["padding"] = None
    state["truncation"] = None

    backend = Tokenizer.from_str(json.dumps(state, ensure_ascii=False))
    old_pieces = [tokenizer.backend_tokenizer.id_to_token(old) for old in keep]
    new_pieces = [backend.id_to_token(new) for new in range(len(keep))]
    if backend.get_vocab_size(with_added_tokens=True) != len(keep) or new_pieces != old_pieces:
        wrong = next((i for i, (a, b) in enumerate(zip(old_pieces, new_pieces)) if a != b), len(keep))
        raise VocabTrimError(
            f"the trimmed tokenizer does not map new id {wrong} to the piece of old id "
            f"{keep[wrong] if wrong < len(keep) else '?'} (duplicate pieces in the vocabulary?)"
        )

    kwargs = {name: tokenizer.init_kwargs[name] for name in _CARRIED_INIT_KWARGS if name in tokenizer.init_kwargs}
    for name in _SPECIAL_TOKEN_ATTRIBUTES:
        value = getattr(tokenizer, name, None)
        if value is not None:
            kwargs[name] = tokenizer.init_kwargs.get(name, value)
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        trimmed.save_pretrained(out_dir)
    return trimmed


def _trim_unigram(model: dict, in_model: list[int], old_to_new: dict[int, int]) -> dict:
    if model.get("unk_id") is None:
        raise VocabTrimError("this Unigram tokenizer has no unk piece; trimming needs one for the dropped pieces")
    old_unk = int(model["unk_id"])
    if old_unk not in old_to_new:
        raise VocabTrimError(f"keep_ids must contain the unk id {old_unk} of the Unigram tokenizer")
    vocab = [list(model["vocab"][old]) for old in in_model]
    new_unk = old_to_new[old_unk]
    # Keep the unk penalty (min score - 10) of the original vocabulary; see the module docstring.
    original_min = min(score for _piece, score in model["vocab"])
    vocab[new_unk][1] = min(vocab[new_unk][1], original_min)
    return {**model, "vocab": vocab, "unk_id": new_unk}


def _trim_dict_vocab(model: dict, in_model: list[int], kind: str) -> dict:
    pieces = _pieces_by_id(model["vocab"])
    vocab = {pieces[old]: new for new, old in enumerate(in_model)}
    unk = model.get("unk_token")
    if unk is not None and unk in model["vocab"] and unk not in vocab:
        raise VocabTrimError(f"keep_ids must contain the unk token {unk!r} of the {kind} tokenizer")
    return {**model, "vocab": vocab}


def _trim_bpe(model: dict, in_model: list[int]) -> dict:
    trimmed = _trim_dict_vocab(model, in_model, "BPE")
    vocab = trimmed["vocab"]
    merges = model["merges"]
    kept = [
        merge
        for merge, (left, right) in zip(merges, _merge_pairs(merges))
        if left in vocab and right in vocab and left + right in vocab
    ]
    return {**trimmed, "merges": kept}


def _remap_processor(processor: dict, old_to_new: dict[int, int]) -> dict:
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        special = {
            name: {**spec, "ids": [_remapped(i, old_to_new, f"post-processor token {name!r}") for i in spec["ids"]]}
            for name, spec in processor.get("special_tokens", {}).items()
        }
        return {**processor, "special_tokens": special}
    if kind in ("BertProcessing", "RobertaProcessing"):
        return {
            **processor,
            **{
                key: [processor[key][0], _remapped(processor[key][1], old_to_new, f"post-processor {key}")]
                for key in ("sep", "cls")
            },
        }
    if kind == "Sequence":
        return {**processor, "processors": [_remap_processor(p, old_to_new) for p in processor["processors"]]}
    if kind == "ByteLevel":
        return processor
    raise NotImplementedError(f"cannot remap the special ids of a {kind!r} post-processor")


def _remapped(old: int, old_to_new: dict[int, int], where: str) -> int:
    if old not in old_to_new:
        raise VocabTrimError(f"{where} uses id {old}, which is not in keep_ids; keep it (always_keep)")
    return old_to_new[old]


# ---------------------------------------------------------------------------------------------
# The model


def trim_embeddings(model: PreTrainedModel, keep_ids: Sequence[int]) -> None:
    """Shrinks the input embedding (and a tied or untied output embedding with its bias) to the
    kept rows, in place, and moves ``config.vocab_size`` and the config's ``*_token_id``s to
    the new ids."""
    embedding = model.get_input_embeddings()
    old_rows = embedding.weight.shape[0]
    keep = _checked_keep_ids(keep_ids, old_rows)
    old_to_new = {old: new for new, old in enumerate(keep)}
    index = torch.as_tensor(keep, dtype=torch.long, device=embedding.weight.device)

    output = model.get_output_embeddings()
    output_weight = getattr(output, "weight", None) if output is not None else None
    output_bias = getattr(output, "bias", None) if output is not None else None
    old_in = embedding.weight
    new_in = _sliced(old_in, index)
    _replace_parameter(model, old_in, new_in)  # also replaces a tied output weight
    embedding.num_embeddings = len(keep)
    if embedding.padding_idx is not None:
        embedding.padding_idx = old_to_new.get(embedding.padding_idx)
    if output_weight is not None and output_weight is not old_in and output_weight.shape[0] == old_rows:
        _replace_parameter(model, output_weight, _sliced(output_weight, index))
    if output_bias is not None and output_bias.shape[0] == old_rows:
        _replace_parameter(model, output_bias, _sliced(output_bias, index))  # BERT's head shares this bias
    if output is not None and getattr(output, "out_features", None) == old_rows:
        output.out_features = len(keep)

    for config in _configs_of(model):
        config.vocab_size = len(keep)
        _remap_token_ids(config, old_to_new, type(config).__name__)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        _remap_token_ids(generation, old_to_new, "generation_config")


def _sliced(param: torch.nn.Parameter, index: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(param.detach().index_select(0, index).clone(), requires_grad=param.requires_grad)


def _replace_parameter(model: torch.nn.Module, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Replaces every registration of ``old`` (tied weights are one Parameter in several modules)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is old:
                module._parameters[name] = new


def _configs_of(model: PreTrainedModel) -> list:
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    return configs


def _remap_token_ids(config, old_to_new: dict[int, int], where: str) -> None:
    for name, value in list(vars(config).items()):
        if not name.endswith("_token_id") or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, int) for v in values):
            continue
        missing = [v for v in values if v not in old_to_new]
        if missing:
            raise VocabTrimError(f"{where}.{name}={value} is not in keep_ids; keep that id (always_keep)")
        new = [old_to_new[v] for v in values]
        setattr(config, name, type(value)(new) if isinstance(value, (list, tuple)) else new[0])


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Old ids -> new ids


def build_id_map(keep_ids: Sequence[int], old_vocab_size: int, unk_new_id: int) -> np.ndarray:
    """An int32 table of ``old_vocab_size`` entries: new id of each old id, ``unk_new_id`` for dropped ids."""
    keep = np.asarray(keep_ids, dtype=np.int64)
    if keep.size and (keep.min() < 0 or keep.max() >= old_vocab_size):
        raise VocabTrimError(f"keep_ids must lie in 0..{old_vocab_size - 1}")
    if not 0 <= unk_new_id < max(len(keep), 1):
        raise VocabTrimError(f"unk_new_id {unk_new_id} is not a new id (0..{len(keep) - 1})")
    table = np.full(old_vocab_size, unk_new_id, dtype=np.int32)
    table[keep] = np.arange(len(keep), dtype=np.int32)
    return table


def remap_ids(old_ids: np.ndarray, id_map: np.ndarray | VocabMap) -> np.ndarray:
    """New ids for an array of old ids (any shape), through a table from `build_id_map` / `VocabMap`."""
    table = id_map.table if isinstance(id_map, VocabMap) else id_map
    ids = np.asarray(old_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise VocabTrimError(
            f"old ids must lie in 0..{table.shape[0] - 1} (the original vocabulary), got {ids.min()}..{ids.max()}"
        )
    return table[ids]


@dataclass(frozen=True)
class VocabMap:
    """What `vocab_map.json` holds: the old id of each kept row, and the table built from it."""

    keep_ids: tuple[int, ...]
    old_vocab_size: int
    unk_new_id: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_table", build_id_map(self.keep_ids, self.old_vocab_size, self.unk_new_id))

    @property
    def table(self) -> np.ndarray:
        return self._table  # type: ignore[attr-defined]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        body = {
            "format": VOCAB_MAP_FORMAT,
            "old_vocab_size": self.old_vocab_size,
            "unk_new_id": self.unk_new_id,
            "keep_ids": list(self.keep_ids),
        }
        path.write_text(json.dumps(body, separators=(",", ":")))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VocabMap:
        body = json.loads(Path(path).read_text())
        if body.get("format") != VOCAB_MAP_FORMAT:
            raise VocabTrimError(f"{path}: vocab map format {body.get('format')!r}, expected {VOCAB_MAP_FORMAT}")
        return cls(tuple(body["keep_ids"]), int(body["old_vocab_size"]), int(body["unk_new_id"]))


# ---------------------------------------------------------------------------------------------
# Both at once


@dataclass(frozen=True)
class TrimResult:
    kept: int  # rows of the trimmed embedding
    original_vocab: int  # rows of the original embedding (may exceed len(tokenizer), e.g. e5: 250037)
    params_before: int
    params_after: int
    id_map_path: Path
    keep_ids: tuple[int, ...]


def trim_model_and_tokenizer(
    model_dir_or_model: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast | str | Path | None,
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    min_count: int = 1,
    always_keep: Iterable[int] = (),
    keep_script_characters: bool = True,
) -> TrimResult:
    """Selects the vocabulary of ``texts``, trims tokenizer and model (a model object is trimmed in
    place) and saves both plus `vocab_map.json` into ``out_dir``. With ``keep_script_characters``
    the one-character pieces of every script that ``texts`` are written in are kept too
    (``single_character_ids``): a word the texts do not hold then falls apart into its characters
    rather than into unk, which costs most in scripts without spaces (Chinese, Japanese)."""
    out_dir = Path(out_dir)
    texts = list(texts)
    model = _load_model(model_dir_or_model) if isinstance(model_dir_or_model, (str, Path)) else model_dir_or_model
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        source = tokenizer if tokenizer is not None else model_dir_or_model
        if not isinstance(source, (str, Path)):
            raise VocabTrimError("pass a tokenizer (or its directory) when the model is an object")
        tokenizer = AutoTokenizer.from_pretrained(source)
    if not getattr(tokenizer, "is_fast", False):
        raise VocabTrimError("vocabulary trimming needs a fast tokenizer (tokenizer.json)")

    original_vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > original_vocab:
        raise VocabTrimError(
            f"the tokenizer has {len(tokenizer)} ids but the model only {original_vocab} embedding rows"
        )
    if keep_script_characters:
        always_keep = [*always_keep, *single_character_ids(tokenizer, scripts_of(texts))]
    keep = select_vocabulary(tokenizer, texts, min_count=min_count, always_keep=always_keep)
    params_before = count_parameters(model)
    trimmed = trim_tokenizer(tokenizer, keep, out_dir)
    trim_embeddings(model, keep)
    model.save_pretrained(out_dir)
    vocab_map = VocabMap(tuple(keep), original_vocab, trimmed.unk_token_id)
    path = vocab_map.save(out_dir / VOCAB_MAP_FILE)
    return TrimResult(len(keep), original_vocab, params_before, count_parameters(model), path, tuple(keep))


def _load_model(path: str | Path) -> PreTrainedModel:
    """The checkpoint's own architecture (heads included), else the bare model."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls.from_pretrained(path)
    return AutoModel.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Helpers


def _serialized(tokenizer: PreTrainedTokenizerFast) -> str:
    if not getattr(tokenizer, "is_fast", False):
        raise VocabTrimError("vocabulary trimming needs a fast tokenizer (tokenizer.json)")
    return tokenizer.backend_tokenizer.to_str()


def _plain_backend(serialized: str) -> Tokenizer:
    """A backend tokenizer without truncation or padding (a padded transformers call leaves
    padding set on the shared backend), for counting pieces."""
    backend = Tokenizer.from_str(serialized)
    backend.no_truncation()
    backend.no_padding()
    return backend


def _checked_keep_ids(keep_ids: Sequence[int], size: int) -> list[int]:
    keep = [int(i) for i in keep_ids]
    if not keep:
        raise VocabTrimError("keep_ids is empty")
    if len(set(keep)) != len(keep):
        raise VocabTrimError("keep_ids lists an id twice")
    bad = [i for i in keep if not 0 <= i < size]
    if bad:
        raise VocabTrimError(f"keep_ids {bad[:5]} are outside the vocabulary (0..{size - 1})")
    return keep


def _model_vocab_size(model: dict) -> int:
    vocab = model["vocab"]
    return len(vocab) if isinstance(vocab, list) else max(vocab.values(), default=-1) + 1


def _pieces_by_id(vocab: dict[str, int]) -> dict[int, str]:
    return {i: piece for piece, i in vocab.items()}


def _merge_pairs(merges: list) -> Iterator[tuple[str, str]]:
    """Merges are "a b" strings in older tokenizer.json files and [a, b] pairs in newer ones."""
    for merge in merges:
        if isinstance(merge, str):
            left, right = merge.split(" ", 1)
        else:
            left, right = merge
        yield left, right


def _uses_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_uses_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []))


def _byte_pieces() -> list[str]:
    return [f"<0x{b:02X}>" for b in range(256)]


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch
