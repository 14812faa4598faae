"""Helpers for the evaluation and planning tests."""
import pytest

from dinowm.errors import run_cli


def cli_error(capsys, main, *args: str) -> str:
    """Run a command-line main through run_cli: a user error must exit 2 with one line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, captured.err
    return lines[0]
