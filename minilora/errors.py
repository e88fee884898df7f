"""One exception type for mistakes a user can fix, and the CLI wrapper that prints it.

Why a separate type: a missing file or a malformed JSONL line is not a bug in minilora, so the command-line
tools print it as one clear line (what, where, what to do) and exit non-zero, without a traceback. Real bugs
still raise ordinary exceptions and keep their traceback.
"""

import os
import sys
from typing import Callable


class MiniloraError(Exception):
    """A problem with the user's input: the message names the file/field and says what to do."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI entry point; print a MiniloraError as `error: ...` on stderr and return exit code 1.

    Ctrl-C is exit code 130 (the shell's convention) with a short message instead of a traceback. An OSError
    (a read-only or full disk, a permission denied) is the user's environment, not a bug: one line naming the path.
    The libraries turn the ones they expect into MiniloraErrors with more context; this catches the rest.
    Under torchrun every process prints its own errors, so the line starts with the process's rank.
    """
    error = f"error: rank {os.environ.get('RANK', '?')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "error: "
    try:
        code = main(argv)
    except MiniloraError as e:
        print(f"{error}{e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"{error}{where}{e.strerror or e} (check the path, its permissions and the free disk space; "
              "files minilora writes are replaced atomically, so none was left half-written)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
