"""What every data tool does with bad input: one ``error: ...`` line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from pretrain.data.errors import DataError


def run_tool(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; turn :class:`DataError` and missing / unreadable files into exit code 2.

    Anything else is a bug and keeps its traceback.
    """
    try:
        return int(main(argv) or 0)
    except (DataError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message looked like
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (outputs are written under temporary names; re-run to finish)", file=sys.stderr)
        return 130
