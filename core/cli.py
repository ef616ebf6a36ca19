"""The `facefed` command: one Typer app that every part of facefed adds commands to.

Each part registers its commands through the `facefed.cli` entry-point group
(see pyproject.toml), so `core` never imports the parts built on top of it.
Registration must stay cheap: heavy imports belong inside the commands.
"""

import logging
import sys
from importlib.metadata import entry_points

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from facefed.core.errors import FacefedError

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="facefed",
    help="Privacy-preserving, federated face recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate detectors, models, privacy and training.")
app.add_typer(eval_app, name="eval")

error_console = Console(stderr=True)


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail."),
) -> None:
    """Privacy-preserving, federated face recognition."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)


def configure_logging(level: int = logging.INFO) -> None:
    """Send facefed's log records to stderr through rich; quieten chatty libraries."""
    handler = RichHandler(console=error_console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s")
    logging.getLogger("facefed").setLevel(level)


def _register_commands() -> None:
    for entry_point in entry_points(group="facefed.cli"):
        register = entry_point.load()
        register(app, eval_app)


def main() -> None:
    """Run the `facefed` command, turning facefed errors into clean exits."""
    _register_commands()
    try:
        # Outside standalone mode click returns, rather than raises, the code
        # a command exits with through `typer.Exit`.
        exit_code = app(standalone_mode=False)
    except FacefedError as error:
        # Messages quote user input (paths, values): never read them as markup.
        error_console.print("[red]error:[/red]", escape(str(error)))
        sys.exit(error.exit_code)
    except typer.Abort:
        error_console.print("aborted")
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as usage_error:
        usage_error.show()
        sys.exit(usage_error.exit_code)
    if isinstance(exit_code, int):
        sys.exit(exit_code)
