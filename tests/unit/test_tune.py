"""``polydistill tune``'s pure parts: overrides from a sample, the Pareto front, the best trial and the
search description's validation; and, with the trials faked, that trials are chosen on the dev split and
the test split is read once, for the chosen trial. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from polydistill.cluster.cli import main
from polydistill.cluster.config import load_config, parse_override
from polydistill.cluster.tune import (
    TuneConfigError,
    best_trial,
    cache_overrides,
    cache_supported,
    check_space,
    effective_sample,
    format_tune_table,
    load_tune_config,
    pareto_front,
    plot_pareto,
    run_tune,
    shared_tracking,
    trial_bundles,
    trial_metrics,
    trial_overrides,
    validate_tune_config,
    yaml_value,
)
from polydistill.storage.job_data import load_job_split

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = EXAMPLES / "tiny.yaml"


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("value", [1e-05, 3.0e-4, 2.0, 0.1 + 0.2, 7, 0, True, False, None, "uniform",
                                   "/tmp/a b: #c", [[1, 2], [2, 4]], [], {"a": 1.5e-06}])
def test_override_values_read_back_as_themselves(value):
    _, parsed = parse_override(f"x.y={yaml_value(value)}")
    assert parsed == value and type(parsed) is type(value)


def test_trial_overrides_in_sample_order():
    sample = {"distill.temperature": 4.0, "training.lr": 1e-05, "student.config.num_hidden_layers": 1}
    assert trial_overrides(sample) == ["distill.temperature=4.0", "training.lr=1.0e-05",
                                       "student.config.num_hidden_layers=1"]


def test_hidden_mapping_and_weight_switch_together():
    assert effective_sample({"distill.hidden_layers": None, "distill.hidden_weight": 0.5}) == {
        "distill.hidden_layers": None, "distill.hidden_weight": 0.0}
    assert effective_sample({"distill.hidden_layers": [[1, 2]], "distill.hidden_weight": 0}) == {
        "distill.hidden_layers": None, "distill.hidden_weight": 0}
    assert trial_overrides({"distill.hidden_layers": None}) == ["distill.hidden_layers=null",
                                                                "distill.hidden_weight=0.0"]
    assert trial_overrides({"distill.hidden_layers": [[1, 2], [2, 4]], "distill.hidden_weight": 1.0}) == [
        "distill.hidden_layers=[[1, 2], [2, 4]]", "distill.hidden_weight=1.0"]


def test_overrides_build_the_job_they_describe():
    sample = {"distill.temperature": 4.0, "distill.hidden_layers": "uniform", "distill.hidden_weight": 0.5,
              "training.lr": 2.5e-4, "student.config.num_hidden_layers": 1}
    config = load_config(TINY, trial_overrides(sample))
    assert config.distill.temperature == 4.0
    assert config.distill.hidden_layers == "uniform" and config.distill.hidden_weight == 0.5
    assert config.training.lr == 2.5e-4
    assert config.student.config["num_hidden_layers"] == 1
    paired = load_config(TINY, trial_overrides({"distill.hidden_layers": [[1, 2], [2, 4]],
                                                "distill.hidden_weight": 1.0}))
    assert paired.distill.hidden_layers == [(1, 2), (2, 4)]


def test_numpy_values_from_tune_become_plain():
    np = pytest.importorskip("numpy")
    assert trial_overrides({"training.lr": np.float64(0.001), "x.n": np.int64(2)}) == ["training.lr=0.001", "x.n=2"]


# --------------------------------------------------------------------------- Pareto front and best trial


def row(name, accuracy, params, latency, status="ok"):
    return {"trial": name, "status": status, "accuracy": accuracy, "params": params, "latency_share_batch32": latency}


ROWS = [  # the latency: the student's share of the teacher's
    row("a", 0.80, 100, 0.25),
    row("b", 0.70, 50, 0.25),    # smaller than a, less accurate: on the front
    row("c", 0.70, 100, 0.25),   # a is as small, as fast and more accurate: dominated
    row("d", 0.90, 200, 0.5),    # the most accurate: on the front
    row("e", 0.60, 50, 0.125),   # the fastest: on the front
    row("f", None, None, None, status="error"),  # failed: never a candidate
    row("g", 0.80, 100, 0.25),   # equal to a: equals do not dominate each other
    row("h", 0.60, 50, 0.15),    # e is as small, faster, as accurate: dominated
]


def names(rows):
    return [r["trial"] for r in rows]


def test_pareto_front_of_hand_made_rows():
    assert names(pareto_front(ROWS)) == ["d", "a", "g", "b", "e"]


def test_pareto_front_on_one_cost_and_no_cost():
    assert names(pareto_front(ROWS, minimize=("params",))) == ["d", "a", "g", "b"]
    assert names(pareto_front(ROWS, minimize=())) == ["d"]


def test_pareto_front_ignores_a_cost_no_row_has():
    rows = [{**r, "latency_share_batch32": None} for r in ROWS]  # evaluation.latency: false
    assert names(pareto_front(rows)) == ["d", "a", "g", "b"]


def test_pareto_front_is_non_dominated_and_dominates_the_rest():
    front = pareto_front(ROWS)
    keys = ("params", "latency_share_batch32")

    def dominates(x, y):
        no_worse = x["accuracy"] >= y["accuracy"] and all(x[k] <= y[k] for k in keys)
        return no_worse and (x["accuracy"] > y["accuracy"] or any(x[k] < y[k] for k in keys))

    assert not any(dominates(x, y) for x in front for y in front)
    for rest in (r for r in ROWS if r not in front and r["accuracy"] is not None):
        assert any(dominates(x, rest) for x in front)


def test_pareto_front_maximises_another_metric():
    rows = [{"trial": "x", "retention": 0.9, "params": 10}, {"trial": "y", "retention": 0.95, "params": 20},
            {"trial": "z", "retention": 0.8, "params": 20}]
    assert names(pareto_front(rows, maximize="retention", minimize=["params"])) == ["y", "x"]


def test_best_trial_is_the_argmax_first_of_equals():
    assert best_trial(ROWS)["trial"] == "d"
    assert best_trial([row("p", 0.5, 1, 1), row("q", 0.5, 1, 1)])["trial"] == "p"
    assert best_trial([row("f", None, None, None, "error")]) is None
    assert best_trial([]) is None
    assert best_trial(ROWS, metric="retention") is None


def test_equal_scores_go_to_the_cheaper_trial_which_is_on_the_front():
    rows = [row("p", 0.5, 200, 1.0), row("q", 0.5, 100, 9.0), row("r", 0.5, 100, 3.0), row("s", 0.4, 50, 1.0)]
    costs = ("params", "latency_share_batch32")
    best = best_trial(rows, tie_break=costs)
    assert best["trial"] == "r" and best in pareto_front(rows, minimize=costs)
    assert best_trial(rows)["trial"] == "p"  # no tie-break: the first of equals


# --------------------------------------------------------------------------- the search description


SPACE = {"space": {"temperature": {"choice": [1.0, 2.0]}, "lr": {"loguniform": [1e-4, 1e-3]}}}


def problem(raw) -> str:
    with pytest.raises(TuneConfigError) as info:
        validate_tune_config(raw)
    return str(info.value)


def test_defaults():
    config = validate_tune_config(SPACE)
    assert config.num_samples == 8 and config.max_concurrent_trials == 1
    assert config.metric == "accuracy" and config.minimize == ["params", "latency_share_batch32"]
    assert list(config.space.dimensions()) == ["distill.temperature", "training.lr"]


@pytest.mark.parametrize("space, field, words", [
    ({"temprature": {"choice": [1.0]}}, "space.temprature", "unknown key"),
    ({"temperature": {"loguniform": [0, 1]}}, "space.temperature", "low > 0"),
    ({"lr": {"uniform": [1e-3, 1e-4]}}, "space.lr", "low < high"),
    ({"lr": {"choice": [1e-3], "loguniform": [1e-4, 1e-3]}}, "space.lr", "exactly one"),
    ({"soft_weight": {"choice": []}}, "space.soft_weight", "empty"),
    ({"soft_weight": {"choice": ["high"]}}, "space.soft_weight", "numbers"),
    ({"hidden_layers": {"uniform": [0, 1]}}, "space.hidden_layers", "choice"),
    ({"hidden_layers": {"choice": [[[1, 2, 3]]]}}, "space.hidden_layers", "pairs"),
    ({"more": {"transport.redis_url": {"choice": ["redis://x"]}}}, "space.more", "transport"),
    ({"more": {"distill.temperature": {"choice": [1.0]}}}, "space.more", "space.temperature"),
    ({"more": {"epochs": {"choice": [1]}}}, "space.more", "dotted"),
    ({}, "space", "empty"),
])
def test_space_errors_name_the_field(space, field, words):
    message = problem({"space": space})
    assert f"  - {field}" in message and words in message


@pytest.mark.parametrize("key, value, field", [
    ("num_samples", 0, "num_samples"),
    ("max_concurrent_trials", 0, "max_concurrent_trials"),
    ("metric", "loss", "metric"),
    ("minimize", ["size"], "minimize.0"),
    ("minimize", ["params", "params"], "minimize"),
    ("set", ["training.epochs"], "set"),
    ("sampels", 3, "sampels"),
])
def test_top_level_errors_name_the_field(key, value, field):
    assert f"  - {field}:" in problem({**SPACE, key: value})


def test_example_space_is_valid_for_the_tiny_job():
    config = load_tune_config(EXAMPLES / "tune" / "tiny_space.yaml")
    assert "student.config.num_hidden_layers" in config.space.dimensions()
    check_space(TINY.resolve(), list(config.set), config)


def test_a_value_that_makes_an_invalid_job_is_refused_before_the_search(tmp_path):
    config = validate_tune_config({"space": {"temperature": {"choice": [2.0, 0.0]}}})
    with pytest.raises(TuneConfigError) as info:
        check_space(TINY.resolve(), [], config)
    assert "space.temperature" in str(info.value) and "distill.temperature" in str(info.value)
    # A mapping without a weight: the job's hidden_weight is 0.
    mapping = validate_tune_config({"space": {"hidden_layers": {"choice": [None, "uniform"]}}})
    with pytest.raises(TuneConfigError, match="space.hidden_layers"):
        check_space(TINY.resolve(), [], mapping)


def test_cli_bad_space_exits_2_naming_the_field(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": {"lr": {"loguniform": [-1, 1]}}}))
    assert main(["tune", str(TINY), "--space", str(space), "--output", str(tmp_path / "out")]) == 2
    assert "space.lr" in capsys.readouterr().err
    assert main(["tune", str(TINY), "--space", str(tmp_path / "missing.yaml")]) == 2
    assert "no such search space file" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(SPACE))
    assert main(["tune", str(TINY), "--space", str(good), "--set", "data.eval_split=null",
                 "--output", str(tmp_path / "out")]) == 2
    assert "data.eval_split" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started


# --------------------------------------------------------------------------- resources, metrics, report


def test_trial_bundles_reserve_every_actor_of_the_job():
    assert trial_bundles(load_config(TINY)) == [{}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1.0}]
    scaled = load_config(TINY, ["teacher.autoscaling={min_replicas: 1, max_replicas: 3}", "student.num_cpus=0"])
    assert trial_bundles(scaled) == [{}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]
    # A heavy stage runs in an actor's bundle when it fits one (no actor runs beside it), else in one of its own.
    staged = load_config(TINY, ["evaluation.resources={num_cpus: 2}", "teacher.finetune_resources={num_cpus: 1}"])
    assert trial_bundles(staged) == [{}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1.0}, {"CPU": 2.0}]


def test_trial_metrics_read_the_job_report():
    report = {
        "overall": {"language_average": {"student": 0.5, "teacher": 0.6}, "retention": 0.83,
                    "student": {"accuracy": 0.52, "macro_f1": 0.4}},
        "efficiency": {"student": {"params": 1000, "disk_bytes": 4000, "latency_ms_batch1": 1.0,
                                   "latency_ms_batch32": 3.0},
                       "teacher": {"latency_ms_batch1": 2.0, "latency_ms_batch32": 12.0}},
        "teachers": [{"samples": 0}], "samples_distilled": 64, "total_seconds": 12.0, "final_loss": 0.7,
        "knowledge_cache": {"key": "k", "read_from_start": True},
    }
    metrics = trial_metrics(report)
    assert metrics["accuracy"] == 0.5 and metrics["retention"] == 0.83 and metrics["macro_f1"] == 0.4
    assert metrics["params"] == 1000 and metrics["latency_ms_batch32"] == 3.0
    assert metrics["latency_share_batch1"] == 0.5 and metrics["latency_share_batch32"] == 0.25
    assert metrics["knowledge_from_cache"] is True and metrics["teacher_samples_computed"] == 0
    assert '"read_from_start": true' in metrics["knowledge_cache"]
    computed = trial_metrics({**report, "teachers": [{"samples": 40}, {"samples": 24}]})
    assert computed["knowledge_from_cache"] is False and computed["teacher_samples_computed"] == 64


def test_latency_share_compares_trials_timed_on_a_machine_whose_speed_drifted():
    """Two trials of the same student, the second timed while the machine ran at half speed: their
    milliseconds differ twofold, their shares of the teacher's latency (timed in the same rounds) do not."""
    def report(student_ms, teacher_ms, accuracy):
        return {"overall": {"language_average": {"student": accuracy}},
                "efficiency": {"student": {"params": 1000, "latency_ms_batch32": student_ms},
                               "teacher": {"latency_ms_batch32": teacher_ms}}}
    fast, slow = trial_metrics(report(10.0, 40.0, 0.80)), trial_metrics(report(20.0, 80.0, 0.81))
    assert fast["latency_share_batch32"] == slow["latency_share_batch32"] == 0.25
    rows = [{"trial": "fast", **fast}, {"trial": "slow", **slow}]
    assert names(pareto_front(rows)) == ["slow"]  # as fast in truth, and more accurate
    assert names(pareto_front(rows, minimize=("params", "latency_ms_batch32"))) == ["slow", "fast"]
    no_latency = trial_metrics({"overall": {}, "efficiency": {}})
    assert no_latency["latency_share_batch32"] is None


def test_table_marks_best_and_front(tmp_path):
    rows = [{**r, "config": {"distill.temperature": 2.0, "distill.hidden_layers": [[1, 2]]}} for r in ROWS]
    result = {"trials": rows, "searched": ["distill.temperature", "distill.hidden_layers"], "best_trial": "d",
              "pareto_front": names(pareto_front(rows))}
    table = format_tune_table(result).splitlines()
    assert table[0].startswith("| trial ") and "temperature" in table[0] and "hidden_layers" in table[0]
    line = {cells.split("|")[1].strip(): cells for cells in table[2:]}
    assert "★◆" in line["d"] and "◆" in line["a"] and "◆" not in line["c"] and "failed" in line["f"]
    assert "[[1, 2]]" in line["a"]
    assert "4.00×" in line["a"] and "8.00×" in line["e"] and "2.00×" in line["d"]  # the speed-up: 1 / share
    assert "| — " in line["f"]
    path = plot_pareto(rows, result["pareto_front"], "d", "accuracy", ["params", "latency_share_batch32"],
                       tmp_path / "pareto.png")
    assert path is not None and path.read_bytes().startswith(b"\x89PNG")


def test_cache_overrides_only_where_the_job_config_has_a_cache(tmp_path, monkeypatch):
    config = load_config(TINY)
    if cache_supported():
        sets, folder = cache_overrides(config, tmp_path / "cache")
        assert folder == str((tmp_path / "cache").resolve())
        assert load_config(TINY, sets).knowledge_cache.enabled
        own = load_config(TINY, [f"knowledge_cache.dir={tmp_path / 'mine'}"])
        assert cache_overrides(own, tmp_path / "cache")[1] == str((tmp_path / "mine").resolve())
    monkeypatch.setattr("polydistill.cluster.tune.cache_supported", lambda: False)
    assert cache_overrides(config, tmp_path / "cache") == ([], None)


def test_with_tracking_on_every_trial_logs_into_the_searchs_store(tmp_path):
    assert shared_tracking(load_config(TINY), tmp_path) == []
    config = load_config(TINY, ["tracking.mlflow=true", "tracking.tensorboard=true"])
    sets = shared_tracking(config, tmp_path)
    tracked = load_config(TINY, ["tracking.mlflow=true", "tracking.tensorboard=true", *sets]).tracking
    assert tracked.mlflow_tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracked.tensorboard_dir == str(tmp_path / "tensorboard")
    own = load_config(TINY, ["tracking.mlflow=true", "tracking.mlflow_tracking_uri=http://mlflow:5000"])
    assert shared_tracking(own, tmp_path) == []


# --------------------------------------------------------------------------- selection on dev, test read once

POISON = "POISON"
TUNE_LABELS = ["science", "sports", "travel"]


def _write_rows(root: Path, language: str, split: str, per_label: int, text: str) -> None:
    (root / language).mkdir(parents=True, exist_ok=True)
    lines = [f"{i}\t{label}\t{text} {language} {label} word{i % 5} item {i}"
             for label in TUNE_LABELS for i in range(per_label)]
    (root / language / f"{split}.tsv").write_text("index_id\tcategory\ttext\n" + "\n".join(lines) + "\n",
                                                  encoding="utf-8")


def _job_with_poisoned_test(tmp_path: Path, with_dev: bool) -> Path:
    """A tiny job whose data's test rows all say POISON: any of them reaching a trial's score is a leak."""
    data = tmp_path / "data"
    for language in ("aaa_Latn", "bbb_Latn"):
        _write_rows(data, language, "train", 10, "train")
        _write_rows(data, language, "test", 4, POISON)
        if with_dev:
            _write_rows(data, language, "dev", 2, "dev")
    (data / "labels.txt").write_text("\n".join(TUNE_LABELS) + "\n", encoding="utf-8")
    job = yaml.safe_load(TINY.read_text())
    job["data"] = {"path": str(data), "max_length": 32}
    job["teacher"].update(vocab_size=100, replicas=1)
    job["teacher"]["config"].update(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    job["student"]["config"].update(num_hidden_layers=1, hidden_size=8, intermediate_size=16)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("with_dev", [True, False], ids=["data-has-dev", "dev-carved-from-train"])
def test_trials_are_chosen_on_dev_and_test_is_read_once_for_the_chosen_trial(tmp_path, monkeypatch, capsys,
                                                                            with_dev):
    import polydistill.storage.job_data as job_data
    import polydistill.student.evaluate as evaluate
    from polydistill.cluster import tune

    job_path = _job_with_poisoned_test(tmp_path, with_dev)
    reads: list[tuple[str, str]] = []  # (who, split) of every split loaded, in order
    phase = ["before the trials"]
    real_load_split = job_data.load_split

    def recording_load_split(path, split, **kwargs):
        reads.append((phase[0], split))
        return real_load_split(path, split, **kwargs)

    monkeypatch.setattr(job_data, "load_split", recording_load_split)
    dev_accuracy = {"trial_0": 0.4, "trial_1": 0.7, "trial_2": 0.5}
    trained_on, scored_on = {}, {}

    def fake_trials(job_path, base, tune_config, out, config, fill_cache):
        """Each trial as a job sees it: its config from the same overrides, its training rows and the rows
        its evaluation scores (data.eval_split), with a made-up score."""
        phase[0] = "trials"
        rows = []
        for name, temperature in zip(dev_accuracy, (1.0, 2.0, 4.0)):
            overrides = trial_overrides({"distill.temperature": temperature})
            trial = load_config(job_path, [*base, *overrides])
            trained_on[name] = load_job_split(trial.data, trial.data.train_split)
            scored_on[name] = load_job_split(trial.data, trial.data.eval_split)
            folder = out / "trials" / name
            folder.mkdir(parents=True)
            (folder / "report.json").write_text(json.dumps(
                {"teacher_path": str(out / "teacher"), "student_path": str(folder), "labels": TUNE_LABELS}))
            rows.append({"trial": name, "status": "ok", "config": {"distill.temperature": temperature},
                         "overrides": overrides, "accuracy": dev_accuracy[name], "params": 100,
                         "output_dir": str(folder)})
        phase[0] = "after the trials"
        return rows, None

    test_scorings = []

    def fake_evaluate_job(config, teacher_dir, student_dir, label_names, extra_models=None):
        phase[0] = "test scoring"
        split = load_job_split(config.data, config.data.eval_split, label_names=label_names)
        test_scorings.append((config.data.eval_split, Path(student_dir).name, split))
        return {"overall": {"language_average": {"student": 0.55, "teacher": 0.6}, "retention": 0.9,
                            "student": {"accuracy": 0.56, "macro_f1": 0.5}}, "eval_samples": len(split.dataset)}

    monkeypatch.setattr(tune, "_run_trials", fake_trials)
    monkeypatch.setattr(evaluate, "evaluate_job", fake_evaluate_job)
    space = validate_tune_config({"space": {"temperature": {"choice": [1.0, 2.0, 4.0]}}, "num_samples": 3})
    result = run_tune(job_path, space, tmp_path / "out")

    # Every trial was scored on dev rows, none of them poisoned, and trained on none of them.
    for name in dev_accuracy:
        texts = scored_on[name].dataset.with_format(None)["text"][:]
        assert texts and not any(POISON in text for text in texts)
        assert all(text.startswith("dev" if with_dev else "train") for text in texts)
        dev_ids = set(scored_on[name].dataset.with_format(None)["sample_id"][:])
        if not with_dev:  # carved from train: the trial's training rows are the rest
            assert not dev_ids & set(trained_on[name].dataset.with_format(None)["sample_id"][:])
    assert "test" not in {split for who, split in reads if who != "test scoring"}

    # The best trial is chosen on dev, and test is read once, for it alone, after the search.
    assert result["best_trial"] == "trial_1"
    assert [(split, student) for split, student, _ in test_scorings] == [("test", "trial_1")]
    assert all(POISON in text for text in test_scorings[0][2].dataset.with_format(None)["text"][:])
    assert [split for who, split in reads if who == "test scoring"] == ["test"]
    selected = result["selected_on"]
    assert selected["split"] == "dev" and selected["source"] == ("data" if with_dev else "train")
    assert selected["rows_per_language"] == ({"aaa_Latn": 6, "bbb_Latn": 6} if with_dev else
                                             {"aaa_Latn": 3, "bbb_Latn": 3})
    assert result["test"] == {"trial": "trial_1", "split": "test", "rows": 24, "accuracy": 0.55,
                              "overall_accuracy": 0.56, "macro_f1": 0.5, "retention": 0.9, "teacher_accuracy": 0.6}

    printed = capsys.readouterr().out
    assert "accuracy (dev)" in printed
    assert "selected on: 'dev', " + ("the data's own split" if with_dev else "carved from 'train'") in printed
    assert "best trial: trial_1 (dev accuracy 70.0%)" in printed
    assert "test ('test', read once for trial_1, 24 rows): accuracy 55.0%" in printed
    assert json.loads((tmp_path / "out" / "tune_report.json").read_text())["test"]["trial"] == "trial_1"


def test_dev_and_test_must_be_different_splits_and_the_search_cannot_move_them(tmp_path):
    space = validate_tune_config(SPACE)
    with pytest.raises(TuneConfigError, match="data.dev_split and data.eval_split are both 'dev'"):
        run_tune(TINY, space, tmp_path / "out", ["data.eval_split=dev"])
    with pytest.raises(TuneConfigError, match="data.dev_split and data.train_split are both 'train'"):
        run_tune(TINY, space, tmp_path / "out", ["data.dev_split=train"])
    assert not (tmp_path / "out").exists()  # nothing started
    assert "space.more" in problem({"space": {"more": {"data.dev_seed": {"choice": [0, 1]}}}})
    assert "same dev rows" in problem({"space": {"more": {"data.limit_per_language": {"choice": [10, 20]}}}})
