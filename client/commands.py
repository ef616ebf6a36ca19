"""Site agent commands: `facefed site ...`, `facefed subject ...`, `facefed demo`.

Every command reads the server URL and the site's API key from
`FACEFED_SERVER_URL` and `FACEFED_API_KEY` (or `FACEFED_API_KEY_FILE`); the
key is never printed. Heavy modules load inside the commands.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from facefed.client.agent import SiteAgent
    from facefed.client.gallery import GalleryClient
    from facefed.client.registry import SiteRegistry

console = Console()

site_app = typer.Typer(
    help="Site operator: enroll, identify, verify, erase via the local pipeline.",
    no_args_is_help=True,
)
subject_app = typer.Typer(
    help="Data subject: see and erase your own data with your subject token.",
    no_args_is_help=True,
)


def _client(*, anonymous: bool = False) -> "GalleryClient":
    from facefed.client.gallery import GalleryClient

    return GalleryClient.from_settings(anonymous=anonymous)


def _agent(*, with_pipeline: bool = True, model: str | None = None) -> "SiteAgent":
    from facefed.client.agent import SiteAgent
    from facefed.client.settings import get_client_settings

    settings = get_client_settings()
    client = _client()
    pipeline = None
    if with_pipeline:
        from facefed.client.site_model import choose_model, load_site_embedder
        from facefed.models.zoo import default_pipeline

        # Refused before any photo is read: a model the collection does not
        # accept, or one this site does not hold.
        model_id = choose_model(
            model or settings.embedding_model,
            client.models(),
            collection=client.collection,
        )
        pipeline = default_pipeline(
            liveness=settings.liveness, embedder=load_site_embedder(model_id)
        )
    training_dir = settings.resolved_site_dir / "training"
    data_store = None
    if training_dir.is_dir():
        from facefed.client.federated.store import SiteDataStore

        data_store = SiteDataStore(training_dir)
    return SiteAgent(
        client,
        pipeline,
        data_store=data_store,
        check_liveness=settings.liveness,
    )


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Embedding model id to use (one the collection accepts, registered "
        "at this site), or 'serving'; default FACEFED_EMBEDDING_MODEL, which "
        "defaults to the collection's serving model.",
    ),
]


def _registry() -> "SiteRegistry":
    from facefed.client.registry import SiteRegistry
    from facefed.client.settings import get_client_settings

    return SiteRegistry(get_client_settings().resolved_site_dir)


@site_app.command("enroll")
def enroll(
    images: Annotated[list[Path], typer.Argument(help="Photos of one person.")],
    subject_ref: Annotated[
        str | None,
        typer.Option(help="The site's reference for the person (a new enrollment)."),
    ] = None,
    consent: Annotated[
        Path | None,
        typer.Option(help="Consent record, JSON or YAML (a new enrollment)."),
    ] = None,
    subject: Annotated[
        str | None,
        typer.Option(
            help="Add the photos to this already enrolled subject id instead "
            "(its consent record stands)."
        ),
    ] = None,
    receipt_out: Annotated[
        Path | None,
        typer.Option(help="Write the receipt, with the subject token, to this file."),
    ] = None,
    skip_unusable: Annotated[
        bool,
        typer.Option(
            help="Leave out photos without a usable face if one photo is usable "
            "(a photo refused by the liveness check always refuses the enrollment)."
        ),
    ] = False,
    model: ModelOption = None,
) -> None:
    """Enroll one person from one or more photos, with their consent record."""
    if subject is not None:
        _add_photos(
            images, subject_id=subject, skip_unusable=skip_unusable, model=model
        )
        return
    from facefed.client.consent import load_consent
    from facefed.core.errors import ConfigurationError, ConflictError

    if subject_ref is None or consent is None:
        raise ConfigurationError(
            "A new enrollment needs --subject-ref and --consent "
            "(or --subject SUBJECT_ID to add photos to an enrolled subject)."
        )
    registry = _registry()
    # Checked before any photo is processed: the server cannot tell that two
    # enrollments are one person (it only sees protected templates).
    enrolled = registry.subject_of(subject_ref)
    if enrolled is not None:
        raise ConflictError(
            f"The subject ref {subject_ref!r} is already enrolled at this site as "
            f"subject {enrolled}. Add photos with `facefed site enroll "
            f"--subject {enrolled} PHOTO...`, or erase it first with "
            f"`facefed site erase {enrolled}`."
        )
    record = load_consent(consent)
    agent = _agent(model=model)
    with console.status("Running the local pipeline and enrolling..."):
        receipt = agent.enroll(
            images,
            subject_ref=subject_ref,
            consent=record,
            skip_unusable=skip_unusable,
        )
    registry.record(receipt.subject_id, subject_ref)
    console.print(
        f"enrolled subject [bold]{receipt.subject_id}[/bold] "
        f"({receipt.template_count} template(s))"
    )
    if receipt_out is not None:
        receipt_out.write_text(json.dumps(receipt.raw, indent=2), encoding="utf-8")
        receipt_out.chmod(0o600)
        console.print(f"receipt with the subject token written to {receipt_out}")
    else:
        console.print(
            "subject token (give it to the person; it is shown only once): "
            f"{receipt.subject_token}"
        )


def _add_photos(
    images: list[Path], *, subject_id: str, skip_unusable: bool, model: str | None
) -> None:
    from facefed.core.errors import GoneError

    agent = _agent(model=model)
    try:
        with console.status("Running the local pipeline and adding photos..."):
            count = agent.add_templates(
                images, subject_id=subject_id, skip_unusable=skip_unusable
            )
    except GoneError:
        _forget_erased(agent, subject_id)
        raise
    console.print(f"subject [bold]{subject_id}[/bold] now has {count} template(s)")


def _forget_erased(agent: "SiteAgent", subject_id: str) -> None:
    """Drop local entries of a subject the server reports as erased (410 Gone).

    A data subject can erase themselves (`facefed subject erase`) without the
    site knowing; the site learns it when a command meets the subject, and
    then drops the subject from its registry and its local training photos.
    """
    import logging

    registry = _registry()
    ref = registry.ref_of(subject_id)
    if ref is None:
        return
    removed = agent.data_store.forget(ref) if agent.data_store is not None else 0
    registry.remove(subject_id)
    logging.getLogger(__name__).warning(
        "Subject %s was erased on the server; dropped from the site registry with "
        "%d local training sample(s)",
        subject_id,
        removed,
    )


@site_app.command("identify")
def identify(
    image: Annotated[Path, typer.Argument(help="Probe photo.")],
    top_k: Annotated[int, typer.Option(min=1, help="Candidates to list.")] = 5,
    model: ModelOption = None,
) -> None:
    """Search the gallery for the person in a photo (1:N)."""
    agent = _agent(model=model)
    result = agent.identify(image, top_k=top_k)
    for rank, candidate in enumerate(result.candidates, start=1):
        console.print(f"{rank}. {candidate.subject_id}  score {candidate.score:.3f}")
    if result.match is None:
        console.print(f"no match (threshold {result.threshold:.3f})")
    else:
        console.print(
            f"match: [bold]{result.match.subject_id}[/bold] "
            f"(score {result.match.score:.3f} >= {result.threshold:.3f})"
        )


@site_app.command("verify")
def verify(
    image: Annotated[Path, typer.Argument(help="Probe photo.")],
    subject: Annotated[str, typer.Option(help="The claimed subject id.")],
    model: ModelOption = None,
) -> None:
    """Check a photo against one enrolled subject (1:1); exits 1 on no match."""
    from facefed.core.errors import GoneError

    agent = _agent(model=model)
    try:
        result = agent.verify(image, subject_id=subject)
    except GoneError:
        _forget_erased(agent, subject)
        raise
    verdict = "match" if result.match else "no match"
    console.print(
        f"{verdict}: score {result.score:.3f} (threshold {result.threshold:.3f})"
    )
    if not result.match:
        # SystemExit, not typer.Exit: the root command runs Click with
        # standalone_mode=False, which turns typer.Exit into a return value
        # that `facefed.core.cli.main` drops.
        raise SystemExit(1)


@site_app.command("erase")
def erase(
    subject_id: Annotated[str, typer.Argument(help="Subject id to erase.")],
    subject_ref: Annotated[
        str | None,
        typer.Option(
            help="The site's reference (looked up in the site folder when omitted)."
        ),
    ] = None,
) -> None:
    """Erase a subject this site enrolled, on the server and in local training data."""
    from facefed.core.errors import GoneError

    registry = _registry()
    agent = _agent(with_pipeline=False)
    try:
        receipt = agent.erase(
            subject_id, subject_ref=subject_ref or registry.ref_of(subject_id)
        )
    except GoneError:
        # Already erased on the server (the data subject erased themselves):
        # finish the job locally.
        if subject_ref is not None and registry.ref_of(subject_id) is None:
            registry.record(subject_id, subject_ref)
        _forget_erased(agent, subject_id)
        console.print(
            f"subject {subject_id} was already erased on the server; "
            "its local entries are dropped"
        )
        return
    registry.remove(subject_id)
    console.print_json(json.dumps(receipt))


def _token(token_file: Path) -> str:
    from facefed.core.errors import ConfigurationError

    try:
        text = token_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigurationError(
            f"Cannot read the token file {token_file}: {error}."
        ) from error
    if text.startswith("{"):
        text = str(json.loads(text).get("subject_token", ""))
    if not text:
        raise ConfigurationError(f"The token file {token_file} holds no subject token.")
    return text


@subject_app.command("export")
def subject_export(
    subject_id: Annotated[str, typer.Argument(help="Your subject id.")],
    token_file: Annotated[
        Path,
        typer.Option(help="File with your subject token (or the enrollment receipt)."),
    ],
) -> None:
    """Print everything the server holds about you, as JSON (GDPR Art. 15)."""
    with _client(anonymous=True) as client:
        console.print_json(
            json.dumps(client.export(subject_id, subject_token=_token(token_file)))
        )


@subject_app.command("erase")
def subject_erase(
    subject_id: Annotated[str, typer.Argument(help="Your subject id.")],
    token_file: Annotated[
        Path,
        typer.Option(help="File with your subject token (or the enrollment receipt)."),
    ],
) -> None:
    """Erase yourself from the gallery (GDPR Art. 17); prints the signed receipt."""
    with _client(anonymous=True) as client:
        receipt = client.erase(subject_id, subject_token=_token(token_file))
    console.print_json(json.dumps(receipt))


def demo(
    output: Annotated[Path, typer.Option(help="Folder for the report.")] = Path(
        "demo-output"
    ),
    people_per_site: Annotated[
        int, typer.Option(min=3, help="People each site enrolls.")
    ] = 20,
    fast: Annotated[
        bool, typer.Option(help="A smaller, quicker run (tests use it).")
    ] = False,
) -> None:
    """Run the whole platform on real faces and write a report."""
    from facefed.client.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output=output, people_per_site=people_per_site, fast=fast))


def register(app: typer.Typer, eval_app: typer.Typer) -> None:
    """Add `facefed site`, `facefed subject` and `facefed demo`."""
    app.add_typer(site_app, name="site")
    app.add_typer(subject_app, name="subject")
    app.command("demo")(demo)
