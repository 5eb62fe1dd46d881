"""The README's set-up is what CI runs: its two commands, and `.ci/run` running the second word for word."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    """The lines of the first ```bash block under the README's "## Set-up" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no ```bash block under ## Set-up"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_setup_is_two_commands_install_and_build_then_install_and_test():
    install_and_build, install_and_test = setup_commands()
    assert install_and_build.startswith("pip install") and "datagen build" in install_and_build
    assert install_and_test.startswith("pip install") and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command_in_a_new_virtual_environment():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert setup_commands()[1] in commands, ".ci/run does not run the README's test command"
    after = commands[commands.index(setup_commands()[1]) + 1:]
    assert after == ["ruff check ."], f".ci/run runs the README's test command, then only the lint: {after}"
    venv = next(i for i, line in enumerate(commands) if "-m venv" in line)
    activate = next(i for i, line in enumerate(commands) if "/bin/activate" in line)
    assert venv < activate < commands.index(setup_commands()[1])
    assert "mktemp -d" in script and "rm -rf" in script
