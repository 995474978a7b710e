"""The README's commands are the ones CI runs: keep the two from drifting apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python -m pytest")]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = ci_commands()
    assert len(commands) == 1, commands
    assert f"\n{commands[0]}\n" in readme


def test_readme_install_puts_cpu_torch_first():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 && pip install -e '.[test]'" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("torch==2.13.0") < ci.index("-e '.[test]'")
