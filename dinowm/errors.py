"""User-caused errors, and the one wrapper every command-line entry point runs through.

A problem the user can fix (a bad config value, a broken dataset file, a checkpoint that does not
fit, a full disk) raises `UserError` (or a subclass: ConfigError, DatasetError, CheckpointError,
CompatError, ...) with a message that names the file/key/value and says what to do. `run_cli`
turns it into ONE line on stderr and a non-zero exit; a bug (any other exception) keeps its
traceback, because then the traceback is what a maintainer needs.

Every entry point uses it, for example:

    def main(argv: list[str] | None = None) -> int:
        args = parser.parse_args(argv)
        if not Path(args.checkpoint).exists():
            raise UserError(f"{args.checkpoint}: no such file")
        ...
        return 0

    if __name__ == "__main__":
        run_cli(main)

OSErrors that carry a file name (missing file, permission denied, no space left, ...) are user
errors too: they are printed as one line naming the file.
"""
from __future__ import annotations

import errno
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file/key/value and what to do."""


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError, naming the file (and for a full disk, its folder)."""
    if exc.errno == errno.ENOSPC:
        where = f" on {exc.filename}" if exc.filename else ""
        return f"no space left{where}: free some space (or choose another folder) and run again"
    name = f"{exc.filename}: " if exc.filename else ""
    return f"{name}{exc.strerror or exc}"


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run `main(argv)` (default sys.argv[1:]) and exit: 0, or main's int return value; a UserError or a
    named OSError prints `error: <message>` (one line, no traceback) and exits 2; Ctrl-C exits 130."""
    try:
        result = main(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        _fail(str(exc))
    except OSError as exc:
        if exc.filename is None and exc.errno != errno.ENOSPC:
            raise  # not about a file the user named: a bug, keep the traceback
        _fail(describe_os_error(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(result if isinstance(result, int) else 0)


def one_line(exc: BaseException) -> str:
    """The message `run_cli` prints for a user error (OSErrors described by `describe_os_error`)."""
    text = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
    return " ".join(text.split())


def _fail(message: str) -> None:
    message = " ".join(message.split())  # one line, whatever the message held
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
