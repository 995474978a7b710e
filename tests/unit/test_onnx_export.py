"""`polydistill export DIR --format onnx`: a saved classifier becomes a float and an int8 ONNX graph that
onnxruntime runs without polydistill, each close to the torch model, with its tokenizer and config beside it."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

from polydistill.cluster.cli import main
from polydistill.student.quantize import onnx_unavailable_reason

pytestmark = pytest.mark.skipif(onnx_unavailable_reason() is not None, reason=str(onnx_unavailable_reason()))

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "short", "sentence", ".", "somewhat", "longer", ",", "for", "the"]


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def _saved_classifier(folder):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(folder)
    word_level_tokenizer().save_pretrained(folder)
    return folder


def test_export_writes_float_and_int8_graphs_that_onnxruntime_runs_alone(tmp_path, capsys):
    import onnxruntime

    folder = _saved_classifier(tmp_path / "student")
    assert main(["export", str(folder), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "model.onnx" in printed and "model.int8.onnx" in printed
    out = folder / "onnx"
    assert {"model.onnx", "model.int8.onnx", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)  # what a user without polydistill does
    feed = dict(tokenizer(["a short sentence .", "the longer sentence"], padding=True, return_tensors="np"))
    feed = {name: feed[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    expected = BertForSequenceClassification.from_pretrained(folder).eval()(
        **{name: torch.from_numpy(value) for name, value in feed.items()}).logits.detach().numpy()
    for name, tolerance in (("model.onnx", 1e-4), ("model.int8.onnx", 0.1)):
        session = onnxruntime.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], feed)
        assert np.abs(logits - expected).max() < tolerance, name
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size


def test_a_folder_that_is_not_a_classifier_gets_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    BertModel(BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path / "encoder")
    assert main(["export", str(tmp_path / "encoder")]) == 2
    assert "covers sequence classifiers" in capsys.readouterr().err
