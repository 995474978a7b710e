"""Translation evaluation: sacrebleu scores grouped by language, and batched generation with a tiny
random BART and a WordPiece tokenizer built offline."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from sacrebleu.metrics import BLEU, CHRF

from polydistill.storage.vocab import SPECIAL_TOKENS, train_wordpiece_tokenizer
from polydistill.student.translation_eval import bleu_tokenizer_for, translate, translation_scores

TRAINING_SENTENCES = [
    "the cat sat on the mat",
    "a dog runs in the park",
    "translation models are small and fast",
    "students learn from their teachers",
    "the teacher writes a long sentence",
    "cats and dogs are friends",
]
SOURCES = [
    "the cat sat on the mat",
    "a dog",
    "students learn from the long sentence their teachers",
    "cats",
    "the dogsat catsdogs",
    "translation models are fast",
]


def build_wordpiece_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """The project's own small WordPiece (lowercased, [CLS] ... [SEP], a WordPiece decoder)."""
    return train_wordpiece_tokenizer(TRAINING_SENTENCES, 150, folder)


def build_tiny_bart(tokenizer: transformers.PreTrainedTokenizerFast) -> transformers.BartForConditionalGeneration:
    config = transformers.BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.cls_token_id,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config)


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a busy machine their hand-offs
    make each step of generation orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> transformers.PreTrainedTokenizerFast:
    return build_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="module")
def model(tokenizer) -> transformers.BartForConditionalGeneration:
    """The tiny random BART, kept from the special tokens other than [SEP] (end of sequence) and from
    word continuations (``##`` pieces). Untrained, it would otherwise repeat [CLS] so that every
    translation decodes to '', or open with a continuation that decodes to a literal ``##``; this
    way every generated token is a whole word that re-tokenizes to one token."""
    bart = build_tiny_bart(tokenizer)
    silenced = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS if token != "[SEP]"]
    silenced += [index for token, index in tokenizer.get_vocab().items() if token.startswith("##")]
    with torch.no_grad():
        bart.final_logits_bias[0, silenced] = -1e4
    return bart


class EchoSeq2Seq(torch.nn.Module):
    """Stands in for a seq2seq model: ``generate`` returns its input ids and records each call."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def generate(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **options) -> torch.Tensor:
        assert not torch.is_grad_enabled() and not self.training
        self.calls.append({"rows": input_ids.shape[0], "lengths": attention_mask.sum(dim=1).tolist(), **options})
        return input_ids


# ---------------------------------------------------------------- translation_scores


def test_identical_hypotheses_score_100():
    sentences = ["the cat sat on the mat .", "a dog runs in the park today ."]
    scores = translation_scores(sentences, sentences, ["eng", "eng"])
    assert scores["per_language"]["eng"] == {"bleu": 100.0, "chrf": 100.0, "n": 2}
    assert scores["overall"] == {"bleu": 100.0, "chrf": 100.0, "n": 2}
    assert scores["language_average"] == {"bleu": 100.0, "chrf": 100.0}


def test_unrelated_hypothesis_scores_zero_bleu():
    scores = translation_scores(["zzz qqq xxx www"], ["the cat sat on the mat"], ["eng"])
    assert scores["per_language"]["eng"]["bleu"] == 0.0
    assert scores["overall"]["bleu"] == 0.0


def test_scores_are_grouped_by_language():
    hypotheses = [
        "the cat sat on a mat",
        "le chien court dans un parc",
        "a dog runs in the park",
        "les chats sont des amis",
        "students learn from teachers",
    ]
    references = [
        "the cat sat on the mat",
        "le chien court dans le parc",
        "the dog runs in the big park",
        "les chats et les chiens sont amis",
        "students learn from their teachers",
    ]
    languages = ["eng", "fra", "eng", "fra", "eng"]
    scores = translation_scores(hypotheses, references, languages)

    expected = {}
    for language in ("eng", "fra"):
        rows = [row for row, code in enumerate(languages) if code == language]
        language_hypotheses = [hypotheses[row] for row in rows]
        language_references = [[references[row] for row in rows]]
        expected[language] = {
            "bleu": round(BLEU(tokenize="13a").corpus_score(language_hypotheses, language_references).score, 2),
            "chrf": round(CHRF().corpus_score(language_hypotheses, language_references).score, 2),
            "n": len(rows),
        }
    assert scores["per_language"] == expected
    assert 0 < expected["eng"]["bleu"] < 100 and expected["eng"]["bleu"] != expected["fra"]["bleu"]
    assert scores["overall"] == {
        "bleu": round(BLEU(tokenize="13a").corpus_score(hypotheses, [references]).score, 2),
        "chrf": round(CHRF().corpus_score(hypotheses, [references]).score, 2),
        "n": 5,
    }
    assert scores["language_average"]["bleu"] == pytest.approx(
        (expected["eng"]["bleu"] + expected["fra"]["bleu"]) / 2, abs=0.01
    )
    assert scores["language_average"]["chrf"] == pytest.approx(
        (expected["eng"]["chrf"] + expected["fra"]["chrf"]) / 2, abs=0.01
    )


def test_chinese_is_scored_with_the_zh_tokenizer():
    hypothesis, reference = "我喜欢吃苹果", "我喜欢吃香蕉"
    assert BLEU(tokenize="13a").corpus_score([hypothesis], [[reference]]).score == 0.0
    for language in ("cmn", "zho_Hans"):
        scores = translation_scores([hypothesis], [reference], [language])
        expected = round(BLEU(tokenize="zh").corpus_score([hypothesis], [[reference]]).score, 2)
        assert scores["per_language"][language]["bleu"] == expected > 0


def test_japanese_is_scored_by_character():
    hypothesis, reference = "私は猫が好きです", "私は犬が好きです"
    scores = translation_scores([hypothesis], [reference], ["jpn"])
    expected = round(BLEU(tokenize="char").corpus_score([hypothesis], [[reference]]).score, 2)
    assert scores["per_language"]["jpn"]["bleu"] == expected > 0


def test_bleu_tokenizer_choice():
    assert [bleu_tokenizer_for(code) for code in ("cmn", "zho_Hant", "zh-CN", "jpn", "jpn_Jpan", "fra", "eng_Latn")] == [
        "zh", "zh", "zh", "char", "char", "13a", "13a",
    ]


def test_overall_bleu_tokenizes_each_sentence_for_its_language():
    hypotheses = ["the cat sat on a mat", "我喜欢吃苹果"]
    references = ["the cat sat on the mat", "我喜欢吃香蕉"]
    scores = translation_scores(hypotheses, references, ["eng", "cmn"])
    pretokenize_english = BLEU(tokenize="13a").tokenizer
    pretokenize_chinese = BLEU(tokenize="zh").tokenizer
    pretokenized_hypotheses = [pretokenize_english(hypotheses[0]), pretokenize_chinese(hypotheses[1])]
    pretokenized_references = [pretokenize_english(references[0]), pretokenize_chinese(references[1])]
    expected = BLEU(tokenize="none").corpus_score(pretokenized_hypotheses, [pretokenized_references]).score
    assert scores["overall"]["bleu"] == round(expected, 2)
    assert scores["overall"]["n"] == 2


def test_no_sentences_gives_empty_per_language():
    scores = translation_scores([], [], [])
    assert scores["per_language"] == {}
    assert scores["overall"]["n"] == 0


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"2, 1 and 2"):
        translation_scores(["a", "b"], ["a"], ["eng", "eng"])
    with pytest.raises(ValueError, match=r"1, 1 and 0"):
        translation_scores(["a"], ["a"], [])


# ---------------------------------------------------------------- translate


def test_translate_batches_by_length_and_keeps_input_order(tokenizer):
    assert any(piece.startswith("##") for source in SOURCES for piece in tokenizer.tokenize(source))
    echo = EchoSeq2Seq()
    outputs = translate(echo, tokenizer, SOURCES, num_beams=3, max_new_tokens=7, batch_size=2)
    assert outputs == SOURCES
    assert [call["rows"] for call in echo.calls] == [2, 2, 2]
    lengths_by_batch = [call["lengths"] for call in echo.calls]
    flattened = [length for lengths in lengths_by_batch for length in lengths]
    assert flattened == sorted(flattened, reverse=True)
    for call in echo.calls:
        assert call["num_beams"] == 3 and call["max_new_tokens"] == 7 and call["do_sample"] is False


def test_translate_truncates_long_sources(tokenizer):
    echo = EchoSeq2Seq()
    (output,) = translate(echo, tokenizer, ["the cat sat on the mat"], max_length=4)
    assert output == "the cat"
    assert translate(echo, tokenizer, []) == []


def test_translate_with_tiny_bart_matches_one_by_one(model, tokenizer):
    together = translate(model, tokenizer, SOURCES, max_new_tokens=8, batch_size=2)
    one_by_one = [translate(model, tokenizer, [source], max_new_tokens=8)[0] for source in SOURCES]
    assert together == one_by_one
    assert len(together) == len(SOURCES)
    assert all(isinstance(text, str) and text == text.strip() for text in together)
    assert any(together)
    assert not model.training


def test_translate_decodes_like_the_tokenizer(model, tokenizer):
    source = SOURCES[0]
    encoded = tokenizer([source], return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], max_new_tokens=8, do_sample=False
        )
    expected = tokenizer.decode(generated[0], skip_special_tokens=True).strip()
    assert translate(model, tokenizer, [source], max_new_tokens=8) == [expected]
    assert "##" not in expected


@pytest.mark.parametrize("max_new_tokens", [1, 3, 6])
def test_max_new_tokens_bounds_the_output(model, tokenizer, max_new_tokens):
    for text in translate(model, tokenizer, SOURCES, max_new_tokens=max_new_tokens):
        pieces = tokenizer(text)["input_ids"]
        assert len(pieces) <= max_new_tokens + 2


def test_beam_search_runs(model, tokenizer):
    outputs = translate(model, tokenizer, SOURCES, num_beams=2, max_new_tokens=6, batch_size=3)
    assert len(outputs) == len(SOURCES)
    assert all(isinstance(text, str) for text in outputs)
