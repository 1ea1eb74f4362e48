"""The `compact-search` command line. Thin: parse, call one library function, render.

Exit codes: 0 ok, 1 check failed / regression, 2 bad input or usage.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from compact_search.errors import UserInputError

app = typer.Typer(
    name="compact-search",
    help="Search, export and run per-head structured sparse attention for video DiTs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def main() -> None:
    """Console-script entry: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except UserInputError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        code = exc.exit_code if isinstance(exc, typer.Exit) else exc.code
        sys.exit(code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
