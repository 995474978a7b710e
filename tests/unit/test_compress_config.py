"""The job config's compress section: a bad chain is refused at load time, naming the field."""

import pytest

from polydistill.cluster.config import ConfigError, validate_config
from polydistill.student.report import format_stages_table, render_markdown

MINIMAL = {"teacher": {"model": "random", "config": {"model_type": "bert"}}, "data": {"path": "/data"}}
CHAIN = [
    {"name": "distil", "kind": "measure"},
    {"name": "pruned", "kind": "prune", "head_sparsity": 0.5, "ffn_sparsity": 0.3},
    {"name": "recovered", "kind": "recover"},
    {"name": "int8", "kind": "quantize"},
]


def _with(compress: dict, **sections) -> dict:
    return {**MINIMAL, **sections, "compress": compress}


def _refused(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return str(info.value)


def test_no_compress_section_by_default():
    assert validate_config(MINIMAL).compress is None


def test_a_full_chain_is_accepted_with_defaults():
    config = validate_config(_with({"stages": CHAIN, "recover_epochs": 0.5}))
    assert [stage.kind for stage in config.compress.stages] == ["measure", "prune", "recover", "quantize"]
    assert config.compress.recover_epochs == 0.5
    assert config.compress.recover_loss == "distill"
    assert config.compress.stages[0].calibration_batches == 8


def test_quantize_embeddings_default_on_and_can_be_turned_off():
    on = validate_config(_with({"stages": CHAIN})).compress.stages[3]
    off = validate_config(_with({"stages": [*CHAIN[:3], {**CHAIN[3], "embeddings": False}]})).compress.stages[3]
    assert on.embeddings is True and off.embeddings is False
    assert "compress.stages.3.embeddings" in _refused(_with({"stages": [*CHAIN[:3], {**CHAIN[3], "embeddings": "int4"}]}))


def test_quantize_before_the_end_is_refused_naming_the_stage():
    message = _refused(_with({"stages": [CHAIN[0], CHAIN[3], CHAIN[1]]}))
    assert "compress.stages" in message and "'int8'" in message and "last stage" in message


@pytest.mark.parametrize(
    "stages, words",
    [
        ([{"name": "p", "kind": "prune"}], ["compress.stages", "head_sparsity", "ffn_sparsity"]),
        ([{"name": "m", "kind": "magnitude"}], ["compress.stages", "sparsity"]),
        ([CHAIN[0], {**CHAIN[0]}], ["compress.stages", "unique"]),
        ([], ["compress.stages", "at least one stage"]),
    ],
)
def test_bad_chains_are_refused(stages, words):
    message = _refused(_with({"stages": stages}))
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "compress, field",
    [
        ({"stages": [{"name": "x", "kind": "distil"}]}, "compress.stages.0.kind"),
        ({"stages": [{"name": "p", "kind": "prune", "head_sparsity": 1.0}]}, "compress.stages.0.head_sparsity"),
        ({"stages": [{"name": "p", "kind": "prune", "head_sparsty": 0.5}]}, "compress.stages.0.head_sparsty"),
        ({"stages": [{"name": "", "kind": "measure"}]}, "compress.stages.0.name"),
        ({"stages": CHAIN, "recover_epochs": 0}, "compress.recover_epochs"),
        ({"stages": CHAIN, "recover_loss": "soft"}, "compress.recover_loss"),
        ({"stages": CHAIN, "recover_epoch": 1}, "compress.recover_epoch"),
        ({"recover_epochs": 1}, "compress.stages"),
    ],
)
def test_field_errors_name_the_field(compress, field):
    assert field in _refused(_with(compress))


def test_compress_needs_held_out_rows():
    message = _refused(_with({"stages": CHAIN}, data={"path": "/data", "eval_split": None}))
    assert "compress" in message and "data.eval_split" in message


def test_hard_label_recovery_needs_labels():
    message = _refused(_with({"stages": CHAIN, "recover_loss": "hard"}, data={"path": "/data", "withhold_labels": True}))
    assert "compress.recover_loss" in message


def _row(name, kind, params, disk):
    return {"name": name, "kind": kind, "params": params, "disk_bytes": disk, "latency_ms_batch1": 2.0,
            "latency_ms_batch32": 20.0, "accuracy": 0.8, "retention": 0.95, "per_language": {}}


def test_report_shows_a_stages_table_only_when_there_are_stages():
    assert format_stages_table({}) == ""
    assert "Compression stages" not in render_markdown({})
    report = {"stages": [_row("distil", "measure", 1_000_000, 4_000_000), _row("int8", "quantize", 1_000_000, 1_000_000)]}
    markdown = render_markdown(report)
    assert "## Compression stages" in markdown
    table = format_stages_table(report)
    assert "| distil" in table and "| int8" in table and "1,000,000" in table and "95.0%" in table


def test_a_factorised_student_is_not_pruned():
    message = _refused(_with({"stages": CHAIN}, student={"embedding_size": 64}))
    assert "the stage 'pruned' prunes a BERT-layout student" in message and "student.embedding_size" in message
    by_magnitude = [CHAIN[0], {"name": "sparse", "kind": "magnitude", "sparsity": 0.5}, *CHAIN[2:]]
    assert "the stage 'sparse'" in _refused(_with({"stages": by_magnitude}, student={"embedding_size": 64}))
    without_pruning = [stage for stage in CHAIN if stage["kind"] != "prune"]
    assert validate_config(_with({"stages": without_pruning}, student={"embedding_size": 64})).compress
