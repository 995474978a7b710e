"""storage/token_tags.py against a real fast tokenizer (a tiny WordPiece trained offline)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from polydistill.storage.token_tags import token_predictions_to_words, word_tags_to_token_labels

TRAINING_TEXT = [
    "the cat sat on the mat",
    "le chat est sur le tapis",
    "unbelievable things happen every day",
    "this mountain is 3,000 meters high!",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # A vocabulary this small cannot hold long or unseen words whole, so they split into several
    # pieces, which is what the alignment has to handle.
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=70, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


SENTENCES = [
    ["the", "cat", "unbelievable", "3,000", "chat"],
    ["le", "tapis"],
]
WORD_LABELS = [[1, 1, 1, 3, 2], [2, 2]]


def first_positions(word_ids: list[int | None]) -> dict[int, int]:
    """Computed independently of the module: where a word id appears for the first time."""
    seen: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None and word not in seen:
            seen[word] = position
    return seen


def test_first_subtoken_gets_the_label_everything_else_is_ignored(tokenizer):
    encoding = tokenizer(SENTENCES, is_split_into_words=True, padding=True)
    word_ids = encoding.word_ids(0)
    tokens = encoding.tokens(0)
    # The tiny vocabulary really does split words, and the special tokens are there.
    assert tokens[0] == "[CLS]" and word_ids[0] is None
    assert word_ids.count(2) > 1 and word_ids.count(3) > 1

    labels = word_tags_to_token_labels(word_ids, WORD_LABELS[0])
    assert labels.dtype == np.int64 and labels.shape == (len(word_ids),)
    starts = first_positions(word_ids)
    for position, label in enumerate(labels):
        if position in starts.values():
            word = word_ids[position]
            assert label == WORD_LABELS[0][word]
            assert not tokens[position].startswith("##")
        else:
            assert label == -100
    assert (labels != -100).sum() == len(SENTENCES[0])


def test_padding_and_special_tokens_are_ignored(tokenizer):
    encoding = tokenizer(SENTENCES, is_split_into_words=True, padding=True)
    word_ids = encoding.word_ids(1)
    tokens = encoding.tokens(1)
    assert tokens[-1] == "[PAD]"
    labels = word_tags_to_token_labels(word_ids, WORD_LABELS[1], ignore_index=-1)
    for position, word in enumerate(word_ids):
        if word is None:
            assert labels[position] == -1
    assert sorted(labels[labels != -1].tolist()) == [2, 2]


def test_round_trip_recovers_word_labels(tokenizer):
    encoding = tokenizer(SENTENCES, is_split_into_words=True, padding=True)
    for index, word_labels in enumerate(WORD_LABELS):
        word_ids = encoding.word_ids(index)
        token_labels = word_tags_to_token_labels(word_ids, word_labels)
        # A model that predicted the token labels, with junk on the ignored positions.
        predictions = np.where(token_labels == -100, 9, token_labels)
        words = token_predictions_to_words(word_ids, predictions, len(word_labels))
        assert words.dtype == np.int64
        assert words.tolist() == word_labels


def test_truncated_words_are_unpredicted(tokenizer):
    encoding = tokenizer(SENTENCES[:1], is_split_into_words=True, truncation=True, max_length=6)
    word_ids = encoding.word_ids(0)
    assert len(word_ids) == 6 and word_ids[-1] is None  # [SEP] survives truncation
    kept = {word for word in word_ids if word is not None}
    assert 0 in kept and 4 not in kept

    labels = word_tags_to_token_labels(word_ids, WORD_LABELS[0])
    assert (labels != -100).sum() == len(kept)

    predictions = np.arange(len(word_ids)) + 10  # prediction = 10 + token position
    words = token_predictions_to_words(word_ids, predictions, len(SENTENCES[0]))
    starts = first_positions(word_ids)
    expected = [10 + starts[word] if word in starts else -1 for word in range(len(SENTENCES[0]))]
    assert words.tolist() == expected
    assert words[4] == -1


def test_hand_written_word_ids():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None, None]
    assert word_tags_to_token_labels(word_ids, [5, 6, 7]).tolist() == [-100, 5, -100, 6, 7, -100, -100, -100, -100]
    predictions = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert token_predictions_to_words(word_ids, predictions, 4).tolist() == [1, 3, 4, -1]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="word 2"):
        word_tags_to_token_labels([None, 0, 2], [1, 1])
    with pytest.raises(ValueError, match="3 token predictions for 4 word ids"):
        token_predictions_to_words([None, 0, 1, None], [0, 0, 0], 2)
    with pytest.raises(ValueError, match="1-D"):
        token_predictions_to_words([None, 0], np.zeros((2, 3)), 1)
