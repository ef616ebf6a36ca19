"""`facefed demo`: the whole platform on real faces, as a list of named steps.

The demo starts a real `facefed serve` on 127.0.0.1 in a fresh working
folder, registers two sites, and then plays each role in turn: the sites
enroll people from real photos through the full local pipeline and identify
others, a spoof is refused, the sites fine-tune the model together with
differential privacy, a site runs an encrypted 1:1 match, and a data subject
exports and erases their data. Everything it measures goes into a Markdown
report with plots under `demo-output/`. Any step that fails stops the demo
with a message naming the step, and everything started is stopped.
"""

import csv
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from facefed.client.admin import AdminClient
from facefed.client.agent import SiteAgent
from facefed.client.consent import ConsentRecord
from facefed.client.gallery import GalleryClient
from facefed.client.launcher import ServerProcess, create_key_with_cli
from facefed.client.settings import ClientSettings
from facefed.core.errors import FaceError, FacefedError, SpoofError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEME = "orthonormal-v1"
COLLECTION = "default"
REFUSAL_ACTION = "site.capture.refused"
TRAINING_TIMEOUT_S = 420.0


class DemoError(FacefedError):
    """Raised when a demo step fails; the message names the step."""

    exit_code = 20


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on.

    Attributes:
        output: Folder of the report; its `work/` subfolder is wiped and
            holds the server's and the sites' state.
        people_per_site: People each site enrolls.
        fast: A smaller run (fewer people, one training round) for tests.
        seed: Seed of every random choice (people, sites, DP noise).
        data_dir: The test data folder (holds `lfw/manifest.csv` and
            `antispoof/`); the repository's `tests/data` when None.
        shared_dir: The shared data set (`identity/lfw_deepfunneled/`), used
            for the people when present and not `fast`; by default
            `FACEFED_SHARED_DATA` or `../shared/data` beside the repository.
    """

    output: Path = Path("demo-output")
    people_per_site: int = 20
    fast: bool = False
    seed: int = 7
    data_dir: Path | None = None
    shared_dir: Path | None = None

    @property
    def rounds(self) -> int:
        """Federated rounds to run."""
        return 1 if self.fast else 2


@dataclass(frozen=True)
class Person:
    """One identity of the demo data and its photos."""

    identity: str
    photos: tuple[Path, ...]


@dataclass
class DemoSite:
    """One site of the demo: its id, key, agent and whom it enrolled."""

    name: str
    site_id: str = ""
    api_key: str = field(default="", repr=False)
    agent: Any = None
    people: list[Person] = field(default_factory=list)
    receipts: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoContext:
    """State shared by the steps."""

    config: DemoConfig
    console: Console
    rng: np.random.Generator
    work: Path
    data_dir: Path
    server: ServerProcess | None = None
    admin_key: str = field(default="", repr=False)
    sites: list[DemoSite] = field(default_factory=list)
    strangers: list[Person] = field(default_factory=list)
    heldout: list[Person] = field(default_factory=list)
    pipeline: Any = None
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    usable_probes: dict[str, Path] = field(default_factory=dict)


Step = Callable[[DemoContext], None]
_T = TypeVar("_T")


# -- helpers -------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _server_env(ctx: DemoContext) -> dict[str, str]:
    return {
        "FACEFED_HOME": str(ctx.work / "server"),
        "FACEFED_MASTER_KEY_FILE": str(ctx.work / "server" / "master.key"),
        "FACEFED_DATABASE_URL": "",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _consent(ctx: DemoContext) -> ConsentRecord:
    return ConsentRecord(
        purpose="Access control at the branch entrance (facefed demo)",
        lawful_basis="consent",
        consent_text_version="demo-2026-01",
        given_at=datetime.now(UTC),
        retention_days=30,
    )


def _shared_lfw(config: DemoConfig) -> Path | None:
    if config.fast:
        return None
    shared = config.shared_dir or Path(
        os.environ.get("FACEFED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
    )
    folder = shared / "identity" / "lfw_deepfunneled"
    return folder if folder.is_dir() else None


def _read_shared_people(folder: Path) -> tuple[list[Person], list[Person]]:
    """LFW people of the shared set: three photos each, and one-photo strangers."""
    enrollable: list[Person] = []
    strangers: list[Person] = []
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = tuple(sorted(person.glob("*.jpg")))
        if len(photos) >= 3:
            enrollable.append(Person(person.name, photos[:3]))
        elif len(photos) == 1:
            strangers.append(Person(person.name, photos))
    return enrollable, strangers


def _read_people(data_dir: Path) -> tuple[list[Person], list[Person]]:
    """People with three photos (enrollable) and people with one (strangers)."""
    photos: dict[str, list[Path]] = {}
    roles: dict[str, str] = {}
    with (data_dir / "lfw" / "manifest.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            photos.setdefault(row["identity"], []).append(data_dir / row["path"])
            roles[row["identity"]] = row["role"]
    people = [Person(name, tuple(sorted(paths))) for name, paths in photos.items()]
    enrolled = [p for p in people if roles[p.identity] == "enrolled"]
    strangers = [p for p in people if roles[p.identity] != "enrolled"]
    return sorted(enrolled, key=lambda p: p.identity), strangers


# -- the steps -----------------------------------------------------------------


def prepare_folder(ctx: DemoContext) -> None:
    """Wipe the working folder and split the people between the two sites."""
    if ctx.work.exists():
        shutil.rmtree(ctx.work)
    (ctx.work / "server").mkdir(parents=True)
    shared = _shared_lfw(ctx.config)
    if shared is not None:
        enrollable, strangers = _read_shared_people(shared)
        ctx.console.print(f"people from the shared LFW set in {shared}")
    else:
        enrollable, strangers = _read_people(ctx.data_dir)
        ctx.console.print(f"people from {ctx.data_dir / 'lfw'}")
    per_site = ctx.config.people_per_site
    if ctx.config.fast:
        per_site = min(per_site, 6)
    if 2 * per_site > len(enrollable):
        raise DemoError(
            f"The demo needs {2 * per_site} people with three photos; the data "
            f"folder {ctx.data_dir} has {len(enrollable)}."
        )
    order = ctx.rng.permutation(len(enrollable))
    chosen = [enrollable[i] for i in order]
    ctx.sites = [
        DemoSite("site-a", people=chosen[:per_site]),
        DemoSite("site-b", people=chosen[per_site : 2 * per_site]),
    ]
    # People who were never enrolled: some of the remaining three-photo people
    # (also the sites' held-out evaluation people) and one-photo strangers;
    # each is tried once.
    others = [strangers[i] for i in ctx.rng.permutation(len(strangers))]
    ctx.strangers = chosen[2 * per_site :][:8] + others[:12]
    # Held-out evaluation people of the training run: never enrolled, never
    # trained on; up to 8 per site.
    ctx.heldout = chosen[2 * per_site :][:16]
    if ctx.config.fast:
        ctx.strangers = ctx.strangers[:6]
    _fill_training_folders(ctx)
    ctx.console.print(
        f"{len(ctx.sites[0].people)} + {len(ctx.sites[1].people)} people to enroll "
        f"at two sites, {len(ctx.strangers)} people never enrolled"
    )


def start_server(ctx: DemoContext) -> None:
    """Start `facefed serve` on 127.0.0.1 at a free port with a fresh master key."""
    import base64

    key_file = ctx.work / "server" / "master.key"
    key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    key_file.chmod(0o600)
    ctx.server = ServerProcess(
        env=_server_env(ctx), log_file=ctx.work / "server.log"
    ).start()
    ctx.console.print(f"server listening at {ctx.server.url} (log: work/server.log)")


def bootstrap_admin(ctx: DemoContext) -> None:
    """Create the first admin key with `facefed admin create-key`."""
    ctx.admin_key = create_key_with_cli(_server_env(ctx), role="admin", name="demo")
    ctx.console.print("admin key created with `facefed admin create-key` (not shown)")


def _admin(ctx: DemoContext) -> AdminClient:
    if ctx.server is None:
        raise DemoError("The server is not running.")
    return AdminClient.connect(
        api_key=ctx.admin_key,
        settings=ClientSettings(server_url=ctx.server.url, max_attempts=3),
        rng=ctx.rng,
    )


def load_pipeline(ctx: DemoContext) -> None:
    """Load the default local pipeline: YuNet, quality gate, liveness, embedder."""
    from facefed.models.zoo import default_pipeline

    ctx.pipeline = default_pipeline(liveness=True)
    metadata = ctx.pipeline.embedder.metadata
    ctx.results["model_id"] = metadata.model_id
    ctx.results["embedding_size"] = metadata.embedding_size
    ctx.console.print(f"embedding model {metadata.model_id} ({metadata.name})")


def register_sites(ctx: DemoContext) -> None:
    """As admin: a protection key, the gallery collection, and two sites."""
    with _admin(ctx) as admin:
        version = admin.create_protection_key(SCHEME)
        admin.create_collection(
            COLLECTION,
            model_id=ctx.results["model_id"],
            scheme=SCHEME,
            dim=int(ctx.results["embedding_size"]),
        )
        for site in ctx.sites:
            credentials = admin.register_site(site.name)
            site.site_id, site.api_key = credentials.site_id, credentials.api_key
    for site in ctx.sites:
        client = GalleryClient.from_settings(
            ClientSettings(
                server_url=ctx.server.url if ctx.server else "",
                collection=COLLECTION,
                max_attempts=3,
            ),
            api_key=site.api_key,
            rng=ctx.rng,
        )
        data_store = _training_store(ctx, site)
        site.agent = SiteAgent(client, ctx.pipeline, data_store=data_store)
    ctx.console.print(
        f"protection key {SCHEME} v{version}; collection '{COLLECTION}'; "
        f"sites {', '.join(f'{s.name} ({s.site_id})' for s in ctx.sites)}"
    )


def enroll_people(ctx: DemoContext) -> None:
    """Each site enrolls its people from two photos each, with consent."""
    consent = _consent(ctx)
    total = sum(len(site.people) for site in ctx.sites)
    refused: list[str] = []
    with _progress(ctx.console) as progress:
        task = progress.add_task("enrolling", total=total)
        for site in ctx.sites:
            for person in site.people:
                try:
                    receipt = site.agent.enroll(
                        list(person.photos[:2]),
                        subject_ref=person.identity,
                        consent=consent,
                        skip_unusable=True,
                    )
                except FaceError as error:
                    # Old press photos can fail the quality gate or look
                    # recaptured to the liveness check; a site would take a
                    # new photo, the demo leaves the person out.
                    refused.append(f"{person.identity}: {error}")
                else:
                    site.receipts[person.identity] = receipt
                progress.advance(task)
    enrolled = sum(len(site.receipts) for site in ctx.sites)
    ctx.results["enrolled"] = enrolled
    ctx.results["enroll_refused"] = refused
    for line in refused:
        ctx.console.print(f"[yellow]not enrolled[/yellow] {line}")
    if enrolled < total // 2:
        raise DemoError(f"Only {enrolled} of {total} people could be enrolled.")
    ctx.console.print(f"enrolled {enrolled} of {total} people")


def identify_people(ctx: DemoContext) -> None:
    """Identify a third photo of each enrolled person, and never-enrolled people."""
    genuine, impostor = _identify_all(ctx, label="identifying")
    ctx.results["before"] = _summary(genuine, impostor)
    summary = ctx.results["before"]
    ctx.console.print(
        f"rank-1 accuracy {summary['rank1']:.1%} ({summary['correct']}/"
        f"{summary['probes']}), false accepts {summary['false_accepts']}/"
        f"{summary['strangers']} at threshold {summary['threshold']:.3f}; "
        f"{ctx.results['probes_refused']} probe photo(s) refused by the pipeline"
    )


def _identify_all(
    ctx: DemoContext, *, label: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    genuine: list[dict[str, Any]] = []
    impostor: list[dict[str, Any]] = []
    probes = [
        (site, person)
        for site in ctx.sites
        for person in site.people
        if person.identity in site.receipts
    ]
    refused = 0
    with _progress(ctx.console) as progress:
        task = progress.add_task(label, total=len(probes) + len(ctx.strangers))
        for site, person in probes:
            progress.advance(task)
            try:
                result = site.agent.identify(person.photos[2], top_k=5)
            except FaceError:
                refused += 1
                continue
            ctx.usable_probes[person.identity] = person.photos[2]
            expected = site.receipts[person.identity].subject_id
            best = result.candidates[0] if result.candidates else None
            genuine.append(
                {
                    "score": best.score if best else float("nan"),
                    "rank1": best is not None and best.subject_id == expected,
                    "accepted": result.match is not None
                    and result.match.subject_id == expected,
                    "threshold": result.threshold,
                }
            )
        for index, person in enumerate(ctx.strangers):
            site = ctx.sites[index % 2]
            progress.advance(task)
            try:
                result = site.agent.identify(person.photos[-1], top_k=5)
            except FaceError:
                refused += 1
                continue
            best = result.candidates[0] if result.candidates else None
            impostor.append(
                {
                    "score": best.score if best else float("nan"),
                    "accepted": result.match is not None,
                    "threshold": result.threshold,
                }
            )
    ctx.results["probes_refused"] = refused
    return genuine, impostor


def _summary(
    genuine: list[dict[str, Any]], impostor: list[dict[str, Any]]
) -> dict[str, Any]:
    correct = sum(bool(row["rank1"]) for row in genuine)
    threshold = (genuine or impostor)[0]["threshold"] if genuine or impostor else 0.0
    return {
        "probes": len(genuine),
        "correct": correct,
        "rank1": correct / len(genuine) if genuine else 0.0,
        "accepted": sum(bool(row["accepted"]) for row in genuine),
        "strangers": len(impostor),
        "false_accepts": sum(bool(row["accepted"]) for row in impostor),
        "threshold": float(threshold),
        "genuine_scores": [float(row["score"]) for row in genuine],
        "impostor_scores": [float(row["score"]) for row in impostor],
    }


def refuse_spoof(ctx: DemoContext) -> None:
    """A printed-photo attack (Silent-Face sample) is refused at enrollment."""
    site = ctx.sites[0]
    spoofs = sorted((ctx.data_dir / "antispoof").glob("image_F*.jpg"))
    if not spoofs:
        raise DemoError(f"No spoof samples in {ctx.data_dir / 'antispoof'}.")
    refused: list[str] = []
    for spoof in spoofs:
        try:
            receipt = site.agent.enroll(
                [spoof], subject_ref=f"spoof-{spoof.stem}", consent=_consent(ctx)
            )
        except SpoofError as error:
            refused.append(f"{spoof.name}: {'; '.join(error.reasons) or error}")
            continue
        site.agent.erase(receipt.subject_id, subject_ref=f"spoof-{spoof.stem}")
        raise DemoError(f"The spoof {spoof.name} was enrolled: liveness failed.")
    with _admin(ctx) as admin:
        events = admin.audit_events(action=REFUSAL_ACTION)
    ctx.results["spoofs_refused"] = refused
    ctx.results["refusals_in_audit"] = len(events)
    for line in refused:
        ctx.console.print(f"[green]refused[/green] {line}")
    ctx.console.print(
        f"{len(events)} refusal(s) counted in the audit log (stage and reason only)"
    )


def subject_rights(ctx: DemoContext) -> None:
    """A data subject exports their data, erases themselves, and no longer matches."""
    site, identity, _ = _two_probed_people(ctx)
    receipt = site.receipts[identity]
    anonymous = GalleryClient.from_settings(
        ClientSettings(
            server_url=ctx.server.url if ctx.server else "", collection=COLLECTION
        ),
        anonymous=True,
        rng=ctx.rng,
    )
    with anonymous:
        export = anonymous.export(
            receipt.subject_id, subject_token=receipt.subject_token
        )
        export_file = ctx.config.output / "subject-export.json"
        export_file.write_text(json.dumps(export, indent=2), encoding="utf-8")
        erasure = anonymous.erase(
            receipt.subject_id, subject_token=receipt.subject_token
        )
    if site.agent.data_store is not None:
        site.agent.data_store.forget(identity)
    del site.receipts[identity]
    after = site.agent.identify(ctx.usable_probes[identity], top_k=5)
    still_there = [c for c in after.candidates if c.subject_id == receipt.subject_id]
    if still_there:
        raise DemoError("The erased subject is still returned by identify.")
    with _admin(ctx) as admin:
        chain = admin.verify_audit()
    if not chain["ok"]:
        raise DemoError(f"The audit chain does not verify: {chain['problems']}")
    ctx.results["subject"] = {
        "export_templates": len(export["templates"]),
        "export_consents": len(export["consents"]),
        "erasure_removed": erasure["removed"],
        "best_score_after": after.candidates[0].score if after.candidates else None,
        "audit_events": chain["events"],
    }
    ctx.console.print(
        f"subject exported {len(export['templates'])} template(s) and "
        f"{len(export['consents'])} consent(s) ({export_file.name}), erased "
        f"themselves ({erasure['removed']}); their photo no longer matches them; "
        f"audit chain of {chain['events']} events verifies"
    )


def write_report(ctx: DemoContext) -> None:
    """Write `demo-output/report.md` with score and timing plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ctx.config.output
    before = ctx.results.get("before", {})
    figure, axis = plt.subplots(figsize=(6, 3.5))
    scores = before.get("genuine_scores", []) + before.get("impostor_scores", [])
    low = min([s for s in scores if np.isfinite(s)], default=0.0) - 0.02
    bins = [float(edge) for edge in np.linspace(low, 1.0, 41)]
    axis.hist(before.get("genuine_scores", []), bins=bins, alpha=0.6, label="enrolled")
    axis.hist(
        before.get("impostor_scores", []), bins=bins, alpha=0.6, label="never enrolled"
    )
    if before:
        threshold = float(before["threshold"])
        axis.axvline(
            threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}"
        )
    axis.set_xlabel("best identify score (cosine)")
    axis.set_ylabel("probes")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "scores.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 3.5))
    names = list(ctx.timings)
    axis.barh(names, [ctx.timings[name] for name in names])
    axis.invert_yaxis()
    axis.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(out / "timings.png", dpi=100)
    plt.close(figure)

    (out / "report.md").write_text(_report_markdown(ctx), encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(
            {"results": ctx.results, "timings": ctx.timings}, indent=2, default=str
        ),
        encoding="utf-8",
    )
    ctx.console.print(f"report written to {out / 'report.md'}")


def _report_markdown(ctx: DemoContext) -> str:
    results = ctx.results
    before = results.get("before", {})
    lines = [
        "# facefed demo report",
        "",
        f"Run at {datetime.now(UTC).isoformat(timespec='seconds')}; model "
        f"`{results.get('model_id')}`; protection scheme `{SCHEME}`.",
        "",
        "## Identification (1:N, protected templates)",
        "",
        "| | value |",
        "| --- | --- |",
        f"| people enrolled (from 1 or 2 usable photos) | {results.get('enrolled')} |",
        f"| rank-1 accuracy on a third photo | {before.get('rank1', 0):.1%} "
        f"({before.get('correct')}/{before.get('probes')}) |",
        f"| false accepts of never-enrolled people | {before.get('false_accepts')}"
        f"/{before.get('strangers')} |",
        f"| decision threshold | {before.get('threshold', 0):.3f} |",
        "",
        "![score distributions](scores.png)",
        "",
        "## Presentation attacks",
        "",
        *[f"- refused: {line}" for line in results.get("spoofs_refused", [])],
        "- capture refusals counted in the audit log (quality and liveness, "
        f"enrollment included): {results.get('refusals_in_audit')}",
        "",
    ]
    if "training" in results:
        lines += _training_markdown(results["training"])
    if "encrypted" in results:
        encrypted = results["encrypted"]
        lines += [
            "## Encrypted 1:1 match (CKKS)",
            "",
            f"- genuine: encrypted score {encrypted['genuine_score']:.4f}, plaintext "
            f"{encrypted['genuine_plain']:.4f}",
            f"- impostor: encrypted score {encrypted['impostor_score']:.4f}, "
            f"plaintext {encrypted['impostor_plain']:.4f}",
            "",
        ]
    if "subject" in results:
        subject = results["subject"]
        lines += [
            "## Data subject rights",
            "",
            f"- export: {subject['export_templates']} protected template(s), "
            f"{subject['export_consents']} consent record(s)",
            f"- erasure removed: {subject['erasure_removed']}",
            "- identify after erasure: the subject is no longer among the candidates",
            f"- audit chain verified over {subject['audit_events']} events",
            "",
        ]
    lines += [
        "## Timings",
        "",
        "| step | seconds |",
        "| --- | --- |",
        *[f"| {name} | {seconds:.1f} |" for name, seconds in ctx.timings.items()],
        "",
        "![timings](timings.png)",
        "",
    ]
    return "\n".join(lines)


def _training_markdown(training: dict[str, Any]) -> list[str]:
    lines = ["## Federated fine-tuning with differential privacy", ""]
    for site, epsilon in sorted(training.get("epsilon", {}).items()):
        lines.append(f"- {site}: epsilon {float(epsilon):.2f}")
    lines.append(f"- rounds: {training.get('rounds')}")
    lines += ["", "| metric | before | after |", "| --- | --- | --- |"]
    before, after = training.get("before", {}), training.get("after", {})
    for name in sorted(set(before) | set(after)):
        lines.append(f"| {name} | {before.get(name, '')} | {after.get(name, '')} |")
    return [*lines, ""]


# -- federated training ----------------------------------------------------------


def _training_dir(ctx: DemoContext, site: DemoSite) -> Path:
    # The folder's name is the site's name in the training run's reports.
    return ctx.work / "training" / site.name


def _training_store(ctx: DemoContext, site: DemoSite) -> Any:
    """The site's training data store (its own photos never leave the site)."""
    from facefed.client.federated.store import SiteDataStore

    return SiteDataStore(_training_dir(ctx, site))


def _fill_training_folders(ctx: DemoContext) -> None:
    """Copy each site's people into its training folder, with held-out pairs.

    The held-out people (evaluation only) are the three-photo people no site
    enrolled, split between the sites; each site's pairs are every genuine
    pair of its held-out people and as many impostor pairs.
    """
    heldout_people = ctx.heldout
    for index, site in enumerate(ctx.sites):
        root = _training_dir(ctx, site)
        for person in site.people:
            folder = root / person.identity
            folder.mkdir(parents=True, exist_ok=True)
            for photo in person.photos:
                shutil.copy2(photo, folder / photo.name)
        mine = heldout_people[index::2][:8]
        if len(mine) < 2:
            raise DemoError("Too few never-enrolled people for held-out pairs.")
        heldout = root / "_heldout"
        rows: list[tuple[str, str, int]] = []
        for person in mine:
            (heldout / person.identity).mkdir(parents=True, exist_ok=True)
            names = []
            for photo in person.photos:
                shutil.copy2(photo, heldout / person.identity / photo.name)
                names.append(f"{person.identity}/{photo.name}")
            rows += [(a, b, 1) for i, a in enumerate(names) for b in names[i + 1 :]]
        genuine = len(rows)
        for k in range(genuine):
            a, b = mine[k % len(mine)], mine[(k + 1) % len(mine)]
            rows.append(
                (
                    f"{a.identity}/{a.photos[k % len(a.photos)].name}",
                    f"{b.identity}/{b.photos[(k + 1) % len(b.photos)].name}",
                    0,
                )
            )
        with (heldout / "pairs.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path1", "path2", "same"])
            writer.writerows(rows)


def federated_training(ctx: DemoContext) -> None:
    """Fine-tune the embedding network across both sites with DP-SGD (Flower)."""
    from facefed.client.federated.config import TrainingConfig
    from facefed.server.federated.runner import read_progress, start_simulation

    run_dir = ctx.work / "runs" / "demo"
    config = TrainingConfig(
        num_rounds=ctx.config.rounds,
        site_dirs=tuple(str(_training_dir(ctx, site)) for site in ctx.sites),
        trainable_blocks=1,
        batch_size=16,
        target_epsilon=8.0,
        run_dir=str(run_dir),
        round_timeout=300.0,
    )
    training_log = ctx.work / "training.log"
    process = _with_output_to(
        training_log, lambda: start_simulation(config, num_sites=len(ctx.sites))
    )
    ctx.console.print(f"Flower and Ray write to work/{training_log.name}")
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    try:
        with _progress(ctx.console) as progress:
            task = progress.add_task("training rounds", total=config.num_rounds)
            while True:
                state = read_progress(run_dir)
                progress.update(task, completed=state.round)
                if state.status != "running":
                    break
                if not process.is_alive():
                    state = read_progress(run_dir)
                    if state.status == "running":
                        raise DemoError(
                            f"The training process exited with code {process.exitcode} "
                            f"without finishing; see {training_log}."
                        )
                    break
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"Training did not finish within {TRAINING_TIMEOUT_S} s."
                    )
                time.sleep(1.0)
    finally:
        if process.is_alive():
            process.terminate()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    if state.status != "finished":
        raise DemoError(f"Training failed: {state.error} (see {training_log}).")
    ctx.results["training"] = _training_summary(state, config)
    training = ctx.results["training"]
    for site_name, epsilon in sorted(training["epsilon"].items()):
        ctx.console.print(f"site {site_name}: epsilon {epsilon:.2f} (delta 1e-5)")
    table = Table("metric", "before", "after")
    for name in sorted(set(training["before"]) | set(training["after"])):
        table.add_row(
            name,
            str(training["before"].get(name, "")),
            str(training["after"].get(name, "")),
        )
    ctx.console.print(table)


def _with_output_to(log_path: Path, start: Callable[[], _T]) -> _T:
    """Call `start` with this process's stdout and stderr sent to `log_path`.

    A child process started inside inherits the file as its stdout and
    stderr (and so do the processes it starts), while this process gets its
    console back as soon as `start` returns: Flower's and Ray's chatter goes
    to the log and the demo's own lines stay readable.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with log_path.open("ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            return start()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _training_summary(state: Any, config: Any) -> dict[str, Any]:
    """Epsilon per site, and held-out metrics of the parent (before) and new model."""
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    for site_name, metrics in sorted(state.metrics.items()):
        for name in ("accuracy", "tar-far-1e-2"):
            if f"parent-{name}" in metrics:
                before[f"{site_name} {name}"] = (
                    f"{float(metrics[f'parent-{name}']):.3f}"
                )
            if name in metrics:
                after[f"{site_name} {name}"] = f"{float(metrics[name]):.3f}"
    return {
        "rounds": state.round,
        "epsilon": dict(state.epsilon),
        "target_epsilon": config.target_epsilon,
        "before": before,
        "after": after,
        "model_dir": state.model_dir,
    }


# -- encrypted matching ------------------------------------------------------------


def _two_probed_people(ctx: DemoContext) -> tuple[DemoSite, str, str]:
    """A site and two of its enrolled people whose probe photos pass the pipeline."""
    for site in ctx.sites:
        probed = [name for name in site.receipts if name in ctx.usable_probes]
        if len(probed) >= 2:
            return site, probed[0], probed[1]
    raise DemoError("No site has two enrolled people with a usable probe photo.")


def encrypted_match(ctx: DemoContext) -> None:
    """A 1:1 match where the server scores a CKKS-encrypted probe it cannot read."""
    from facefed.privacy.he import SiteHEContext

    site, claimed, other = _two_probed_people(ctx)
    receipt = site.receipts[claimed]
    threshold = float(ctx.results["before"]["threshold"])
    he_context = SiteHEContext.create(galois_keys=False, n_threads=1)
    context_id = site.agent.client.upload_he_context(he_context.public_bytes())
    genuine = site.agent.verify_encrypted(
        ctx.usable_probes[claimed], subject_id=receipt.subject_id,
        he_context=he_context, context_id=context_id, threshold=threshold,
    )  # fmt: skip
    impostor = site.agent.verify_encrypted(
        ctx.usable_probes[other], subject_id=receipt.subject_id,
        he_context=he_context, context_id=context_id, threshold=threshold,
    )  # fmt: skip
    genuine_plain = site.agent.verify(
        ctx.usable_probes[claimed], subject_id=receipt.subject_id
    )
    impostor_plain = site.agent.verify(
        ctx.usable_probes[other], subject_id=receipt.subject_id
    )
    ctx.results["encrypted"] = {
        "genuine_score": genuine.score,
        "genuine_plain": genuine_plain.score,
        "impostor_score": impostor.score,
        "impostor_plain": impostor_plain.score,
        "genuine_match": genuine.match,
        "impostor_match": impostor.match,
    }
    ctx.console.print(
        f"same person: encrypted score {genuine.score:.4f} (plaintext "
        f"{genuine_plain.score:.4f}) -> {'match' if genuine.match else 'no match'}; "
        f"other person: {impostor.score:.4f} (plaintext {impostor_plain.score:.4f}) "
        f"-> {'match' if impostor.match else 'no match'}"
    )
    if abs(genuine.score - genuine_plain.score) > 1e-3:
        raise DemoError("The encrypted score differs from the plaintext one.")


# -- running -------------------------------------------------------------------


STEPS: list[tuple[str, Step]] = [
    ("prepare folder", prepare_folder),
    ("start server", start_server),
    ("create admin key", bootstrap_admin),
    ("load pipeline", load_pipeline),
    ("register sites", register_sites),
    ("enroll", enroll_people),
    ("identify", identify_people),
    ("refuse a spoof", refuse_spoof),
    ("federated fine-tuning", federated_training),
    ("encrypted 1:1 match", encrypted_match),
    ("data subject rights", subject_rights),
    ("report", write_report),
]


def run_demo(config: DemoConfig, *, console: Console | None = None) -> dict[str, Any]:
    """Run every step in order; stop everything started, whatever happens.

    Returns:
        The results the report was written from.

    Raises:
        DemoError: A step failed; the message names it.
    """
    console = console or Console()
    data_dir = config.data_dir or REPO_ROOT / "tests" / "data"
    config.output.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(
        config=config,
        console=console,
        rng=np.random.default_rng(config.seed),
        work=config.output / "work",
        data_dir=data_dir,
    )
    started = time.monotonic()
    # The demo prints its own summary of each step; the agent's per-photo
    # INFO lines would bury the progress bars.
    agent_logger = logging.getLogger("facefed.client.agent")
    agent_level = agent_logger.level
    agent_logger.setLevel(logging.WARNING)
    try:
        for number, (name, step) in enumerate(STEPS, start=1):
            console.rule(f"[bold]{number}. {name}")
            begin = time.monotonic()
            try:
                step(ctx)
            except DemoError as error:
                if str(error).startswith("The demo stopped at step"):
                    raise
                raise DemoError(
                    f"The demo stopped at step '{name}': {error}"
                ) from error
            except FacefedError as error:
                raise DemoError(
                    f"The demo stopped at step '{name}': {error}"
                ) from error
            except Exception as error:
                logger.exception("Step %s failed", name)
                kind = type(error).__name__
                raise DemoError(
                    f"The demo stopped at step '{name}': {kind}: {error}"
                ) from error
            ctx.timings[name] = time.monotonic() - begin
    except DemoError as error:
        _mark_failed(config.output, str(error))
        raise
    finally:
        agent_logger.setLevel(agent_level)
        _stop_everything(ctx)
    (config.output / FAILED_MARKER).unlink(missing_ok=True)
    console.rule(f"[bold green]done in {time.monotonic() - started:.0f} s")
    return ctx.results


FAILED_MARKER = "FAILED.txt"
"""Written to the output folder by a failed run, naming the failed step."""

REPORT_FILES = ("report.md", "results.json", "scores.png", "timings.png")
"""What a successful run writes; a failed run removes an older run's copies."""


def _mark_failed(output: Path, message: str) -> None:
    """Remove an earlier run's report so it is not taken for this run's."""
    for name in REPORT_FILES:
        (output / name).unlink(missing_ok=True)
    (output / FAILED_MARKER).write_text(
        f"{datetime.now(UTC).isoformat(timespec='seconds')}: {message}\n",
        encoding="utf-8",
    )


def _stop_everything(ctx: DemoContext) -> None:
    for site in ctx.sites:
        if site.agent is not None:
            site.agent.client.close()
    if ctx.server is not None:
        ctx.server.stop()
        ctx.console.print("server stopped")
