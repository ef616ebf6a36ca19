"""Commands this part adds to `facefed`: `serve` and the `admin` group."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from facefed.core.errors import ConfigurationError, FacefedError

logger = logging.getLogger(__name__)


class AuditBrokenError(FacefedError):
    """An integrity check failed: the audit chain or a receipt's signature."""

    exit_code = 1


admin_app = typer.Typer(
    help="Administer the gallery server directly on its database.",
    no_args_is_help=True,
)


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add this part's commands to the root app and the `eval` group."""
    app.command("serve")(serve)
    app.add_typer(admin_app, name="admin")


def serve(
    host: str | None = typer.Option(None, help="Address to listen on [127.0.0.1]."),
    port: int | None = typer.Option(None, help="Port to listen on [8000]."),
    dev: bool = typer.Option(
        False, "--dev", help="Development mode: generate a master key if none."
    ),
) -> None:
    """Run the gallery server (FastAPI under uvicorn)."""
    import uvicorn

    from facefed.server.app import SubjectIdLogFilter, create_app
    from facefed.server.settings import get_server_settings

    settings = get_server_settings()
    updates: dict[str, object] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    if dev:
        updates["dev_mode"] = True
    settings = settings.model_copy(update=updates)
    app = create_app(settings)
    logging.getLogger("uvicorn.access").addFilter(SubjectIdLogFilter())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def _service(*, start: bool = True):  # type: ignore[no-untyped-def]
    from facefed.server.service import GalleryService
    from facefed.server.settings import get_server_settings

    service = GalleryService(get_server_settings())
    if start:
        service.start()
    return service


@admin_app.command("create-key")
def create_key(
    role: str = typer.Option(..., help="admin or site."),
    site: str | None = typer.Option(None, help="Site id (site keys)."),
    site_name: str | None = typer.Option(
        None, help="Create a site of this name and give the key to it."
    ),
    name: str = typer.Option("", help="A label for the key."),
) -> None:
    """Create an API key (printed once; only its hash is stored)."""
    from facefed.server.security import Principal

    service = _service()
    try:
        if site_name is not None:
            site_row = service.create_site(
                Principal(role="admin", key_id="cli"), site_name
            )
            site = site_row.id
            typer.echo(f"site id: {site}")
        row, secret = service.create_api_key(
            "admin:cli", role=role, site_id=site, name=name
        )
    finally:
        service.close()
    typer.echo(f"key id:  {row.id}")
    typer.echo(f"api key: {secret}")
    typer.echo("Store the key now: it is not shown again.", err=True)


@admin_app.command("purge-expired")
def purge_expired() -> None:
    """Erase every subject whose consent retention period has passed."""
    service = _service()
    try:
        erased = service.purge_expired(actor="admin:cli")
    finally:
        service.close()
    typer.echo(f"erased {erased} subject(s) with expired consent")


@admin_app.command("audit-verify")
def audit_verify() -> None:
    """Check the audit log's hash chain; exit 1 if any event was edited or removed.

    Opens the configured database read-only in spirit: it is never created
    or migrated here, so a wrong `FACEFED_HOME` or URL is an error (exit 8)
    instead of a fresh empty log reported as intact.
    """
    from facefed.server.settings import get_server_settings

    settings = get_server_settings()
    result = _verify_existing_audit(settings.resolved_database_url)
    if result.ok:
        typer.echo(f"audit log intact: {result.events} event(s)")
        if result.events == 0:
            typer.echo(
                "WARNING: the audit log is empty; a server that has run writes "
                "events. Check that this is the right database.",
                err=True,
            )
        return
    for problem in result.problems:
        typer.echo(problem, err=True)
    typer.echo(f"audit log BROKEN ({result.events} event(s) checked)", err=True)
    # A FacefedError, not typer.Exit: core.cli.main runs the app with
    # standalone_mode=False, where a typer.Exit code is returned and lost.
    raise AuditBrokenError("The audit log failed verification.")


def _verify_existing_audit(url: str):  # type: ignore[no-untyped-def]
    """Verify the chain of an existing, migrated database without changing it."""
    from sqlalchemy import inspect

    from facefed.core.errors import NotFoundError
    from facefed.server.audit import verify_chain
    from facefed.server.db import make_engine, make_session_factory, session_scope

    engine = make_engine(url, create=False)
    try:
        if not inspect(engine).has_table("audit_events"):
            raise NotFoundError(
                "The database has no audit log (no facefed server has run on "
                "it): check FACEFED_HOME or FACEFED_DATABASE_URL."
            )
        with session_scope(make_session_factory(engine)) as session:
            return verify_chain(session)
    finally:
        engine.dispose()


@admin_app.command("verify-receipt")
def verify_receipt(
    receipt_file: Annotated[Path, typer.Argument(help="Receipt JSON file.")],
    public_key_file: Annotated[
        Path,
        typer.Argument(
            help="The server's public key: the JSON of /v1/receipts/public-key "
            "or the PEM inside it."
        ),
    ],
) -> None:
    """Check an erasure receipt's signature against the server's public key.

    Exits 1 when the signature is invalid and 2 when a file is missing or
    unusable, so a script can tell a forged receipt from a wrong path.
    """
    from facefed.server.receipts import public_key_pem_from_text
    from facefed.server.receipts import verify_receipt as check

    try:
        receipt = json.loads(_read_input(receipt_file, "receipt"))
    except json.JSONDecodeError:
        receipt = None
    if not isinstance(receipt, dict):
        raise ConfigurationError(
            f"The receipt file {receipt_file} is not a JSON object."
        )
    pem = public_key_pem_from_text(_read_input(public_key_file, "public key"))
    if check(receipt, pem):
        typer.echo("receipt signature valid")
        return
    typer.echo("receipt signature INVALID", err=True)
    raise AuditBrokenError("The receipt's signature does not verify.")


def _read_input(path: Path, what: str) -> str:
    """Read a small text input file, turning OS errors into a clean error."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"The {what} file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ConfigurationError(
            f"The {what} file {path} cannot be read: {reason}."
        ) from None
