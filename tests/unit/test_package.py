"""The installed package: one top-level name, a small public API, the examples and dashboard inside."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import polydistill

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("cluster", "actors", "student", "storage")


def test_public_api_and_version():
    assert polydistill.__version__ == version("polydistill")
    assert {"run", "load_config", "Report", "__version__"} <= set(polydistill.__all__)
    config = polydistill.load_config(ROOT / "examples" / "tiny.yaml", ["training.epochs=3"])
    assert config.training.epochs == 3


def test_version_flag_of_the_command_and_the_module():
    for command in (["polydistill", "--version"], [sys.executable, "-m", "polydistill", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"polydistill {polydistill.__version__}"


def test_run_refuses_a_bad_override_before_anything_starts(tmp_path):
    with pytest.raises(polydistill.ConfigError, match="training.epochs"):
        polydistill.run(ROOT / "examples" / "tiny.yaml", tmp_path, **{"training.epochs": 0})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (built,) = folder.glob("polydistill-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_installs_one_top_level_package(wheel):
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names} == {"polydistill", f"polydistill-{polydistill.__version__}.dist-info"}
    for package in SUBPACKAGES:
        assert f"polydistill/{package}/__init__.py" in names
    assert "polydistill/cluster/grafana/polydistill_dashboard.json" in names
    assert "polydistill/examples/tiny.yaml" in names
    assert "polydistill/examples/data/sib200/eng_Latn/train.tsv" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "polydistill = polydistill.cluster.cli:main" in wheel.read(entry_points).decode()


def test_examples_command_writes_runnable_configs(tmp_path):
    result = subprocess.run(["polydistill", "examples", str(tmp_path / "ex")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    config = polydistill.load_config(tmp_path / "ex" / "tiny.yaml")
    assert Path(config.data.path) == tmp_path / "ex" / "data" / "sib200"
    assert (tmp_path / "ex" / "grafana" / "polydistill_dashboard.json").exists()
