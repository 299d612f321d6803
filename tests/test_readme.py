"""The README's two set-up commands are the project's contract with users and with CI."""

from pathlib import Path

import kimi_linear.cli as cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in first_block.splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("# kimi-linear\n\n```bash\n"), "the README must open with the set-up commands"
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("kimi-linear demo")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_demo_runs_and_agrees_with_the_float64_reference(capsys):
    assert cli.main(["demo", "--seq-len", "100", "--heads", "2", "--head-dim", "16", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "faster than the token loop" in out


def test_demo_rejects_bad_sizes(capsys):
    assert cli.main(["demo", "--seq-len", "0"]) == 2
    assert "must be positive" in capsys.readouterr().out


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_readme_operator_example_runs():
    scope: dict = {}
    exec(python_blocks()[0], scope)  # noqa: S102 - our own README
    assert scope["o"].shape == (1, 1000, 4, 128) and scope["o1"].shape == (1, 1, 4, 128)
    assert scope["state"].dtype.is_floating_point


def test_readme_model_example_runs_on_the_tiny_config():
    block = python_blocks()[1]
    # The checkpoint lines need a local 48B download; run the imports and the tiny-model lines.
    runnable = "\n".join(line for line in block.splitlines()
                         if line.startswith(("import", "from")) or line.startswith(("tiny", "loss")))
    scope: dict = {}
    exec(runnable, scope)  # noqa: S102 - our own README
    assert scope["loss"].item() > 0
