"""Compatibility path of the ``gradience-jax`` command: see :mod:`gradience_jax.app.cli`.

``python -m gradience_jax.cli`` still runs the command. Supported names: those of
:mod:`gradience_jax.app.cli` (re-exported).
"""

import sys

from gradience_jax.app.cli import (
    COMMANDS,
    FIGURES,
    PROG,
    PROTOCOLS,
    CLIError,
    UsageError,
    build_parser,
    main,
    summarise,
)

__all__ = ["COMMANDS", "CLIError", "FIGURES", "PROG", "PROTOCOLS", "UsageError", "build_parser",
           "main", "summarise"]

if __name__ == "__main__":
    sys.exit(main())
