"""Bad input gets a clear error naming what to change, fast: one row per case.

Each case builds its input in a temporary folder, runs the function a user's command would
reach first, and checks the message names the thing to fix.
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from polydistill.cluster.config import ConfigError, load_config
from polydistill.storage import wire
from polydistill.storage.datasets import DataSourceError, load_split
from polydistill.storage.model_sources import resolve_model_source

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _sib(tmp_path: Path, train: bytes, test: bytes | None = None) -> str:
    folder = tmp_path / "data" / "eng_Latn"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_bytes(train)
    if test is not None:
        (folder / "test.tsv").write_bytes(test)
    (tmp_path / "data" / "labels.txt").write_text("sports\ntravel\n", encoding="utf-8")
    return str(tmp_path / "data")


def invalid_yaml(tmp_path):
    load_config(_config_file(tmp_path, "teacher: [unclosed\n"))


def wrong_value_type(tmp_path):
    load_config(TINY, ["training.batch_size=lots"])


def misspelt_key(tmp_path):
    load_config(TINY, ["distill.temprature=3"])


def unix_socket_redis_url(tmp_path):
    load_config(TINY, ["transport.redis_url=unix:///tmp/redis.sock"])


def two_redis_passwords(tmp_path):
    load_config(TINY, ["transport.redis_url=redis://:one@h:6379/0", "transport.password_env=REDIS_PASSWORD"])


def missing_local_model(tmp_path):
    resolve_model_source(str(tmp_path / "no-such-checkpoint"))


def non_utf8_rows(tmp_path):
    load_split(_sib(tmp_path, b"index_id\tcategory\ttext\n1\tsports\tcaf\xe9\n"), "train")


def unknown_label_in_test_split(tmp_path):
    root = _sib(tmp_path, b"index_id\tcategory\ttext\n1\tsports\tok\n", b"index_id\tcategory\ttext\n1\tcooking\tx\n")
    load_split(root, "test", label_names=["sports", "travel"])


def unknown_language(tmp_path):
    load_split(_sib(tmp_path, b"index_id\tcategory\ttext\n1\tsports\tok\n"), "train", languages=["xxx_Latn"])


def missing_column(tmp_path):
    load_split(_sib(tmp_path, b"index_id\tcategory\tsentence\n1\tsports\tok\n"), "train")


def garbage_message(tmp_path):
    wire.decode(b"\xc1 this is not msgpack")


def newer_schema_version(tmp_path):
    wire.decode(msgpack.packb({"v": wire.SCHEMA_VERSION + 1, "kind": "work"}))


def oversized_message(tmp_path):
    wire.decode(b"\x00" * (wire.MAX_MESSAGE_BYTES + 1))


def oversized_outgoing_message(tmp_path):
    n, length = 4, 4096
    huge = np.zeros((n, length, 1100), dtype=np.float32)  # about 72 MB of logits
    work = wire.WorkBatch(
        job_id="job", epoch=0, batch_id=0, sample_ids=np.arange(n), languages=("eng_Latn",) * n,
        input_ids=np.ones((n, length), dtype=np.int32), attention_mask=np.ones((n, length), dtype=np.uint8),
        labels=None,
    )
    wire.encode(wire.Knowledge(work=work, teacher_id="t", soft=wire.SoftLabels.full(huge)))


def validation_without_a_dev_split(tmp_path):
    from polydistill.cluster.driver import check_before_models

    data = _sib(tmp_path, b"index_id\tcategory\ttext\n1\tsports\tok\n")  # a training split, no dev split
    check_before_models(load_config(TINY, [f"data.path={data}", "data.languages=[eng_Latn]",
                                           "training.validate_each_epoch=true"]))


def rows_longer_than_the_teacher_reads(tmp_path):
    from polydistill.cluster.prepare import _check_max_length
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
               max_position_embeddings=128).save_pretrained(tmp_path / "teacher")
    _check_max_length(load_config(TINY, ["data.max_length=1024"]), tmp_path / "teacher")


CASES = [
    (invalid_yaml, ConfigError, "not valid YAML"),
    (wrong_value_type, ConfigError, "training.batch_size"),
    (misspelt_key, ConfigError, "distill.temprature: unknown key"),
    (unix_socket_redis_url, ConfigError, "transport.redis_url: Value error, must start with redis:// or rediss://"),
    (two_redis_passwords, ConfigError, "password_env and a password inside redis_url each give the Redis password"),
    (missing_local_model, FileNotFoundError, "no-such-checkpoint"),
    (non_utf8_rows, DataSourceError, "line 2: byte 0xe9"),
    (unknown_label_in_test_split, DataSourceError, "cooking"),
    (unknown_language, DataSourceError, "xxx_Latn"),
    (missing_column, DataSourceError, "data.text_column"),
    (garbage_message, wire.WireError, "not a msgpack message"),
    (newer_schema_version, wire.WireVersionError, "upgrade polydistill"),
    (oversized_message, wire.WireError, "exceeds the limit"),
    (oversized_outgoing_message, wire.WireError, "distill.top_k"),
    (validation_without_a_dev_split, ConfigError, "set data.dev_from_train: true"),
    (rows_longer_than_the_teacher_reads, ConfigError, "data.max_length is 1024, but the teacher (random) reads rows "
     "of at most 128 tokens (max_position_embeddings): set data.max_length to 128 or less"),
]


@pytest.mark.parametrize(("case", "error", "message"), CASES, ids=[case.__name__ for case, _, _ in CASES])
def test_bad_input_is_refused_with_a_message_naming_the_fix(tmp_path, case, error, message):
    with pytest.raises(error) as info:
        case(tmp_path)
    assert message in str(info.value)
