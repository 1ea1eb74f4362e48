"""The `compact-search` command line. Thin: parse, call one library function, render.

Exit codes: 0 ok, 1 check failed / regression, 2 bad input or usage.
"""

from __future__ import annotations

import sys
from pathlib import Path
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's files.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the end-to-end demo on the built-in default and print a summary."""
    from rich.table import Table

    from compact_search.demo import run_foundation_demo

    result = run_foundation_demo(out, seed=seed)
    console.print(f"config written and re-validated: [bold]{result.config_path}[/]")
    console.print("layout: " + ", ".join(f"{k}={v}" for k, v in result.layout.items()))
    table = Table(title="sparse (reference kernel) vs dense attention")
    for column in ("head", "pattern", "density", "cost", "rel. error vs dense"):
        table.add_column(column, justify="right")
    for h in result.heads:
        table.add_row(str(h.head), h.kind, f"{h.density:.3f}", f"{h.cost:.3f}",
                      f"{h.relative_error:.4f}")
    console.print(table)
    console.print(
        f"sparse reference {result.sparse_seconds * 1e3:.1f} ms, dense SDPA "
        f"{result.dense_seconds * 1e3:.1f} ms (CPU)"
    )


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
