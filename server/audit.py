"""Append-only, hash-chained audit log.

Each event stores ``hash = SHA-256(prev_hash || canonical_json(event))`` where
the canonical JSON has sorted keys and no spaces; the first event chains from
64 zeros. A separate head row records the last sequence number and hash, so
removing events at the end is caught as well as editing or removing any
other one. Events never hold personal data: no subject id, no template, no
token; erasures carry a pseudonymous event id only.

FIXME: the chain proves that events were not edited or removed by someone
who left the rest intact; whoever can rewrite the whole table can recompute
every hash. Publishing the head hash elsewhere (a transparency log, a signed
daily digest) would close that gap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from facefed.server.db import AuditEvent, AuditHead, utcnow

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64

# Serialises appends inside one process; across processes the head row is
# locked with SELECT ... FOR UPDATE (PostgreSQL) or by SQLite's writer lock.
_append_lock = threading.Lock()


def canonical_json(payload: dict[str, Any]) -> bytes:
    """Return the canonical JSON bytes an event's hash covers."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()


def _payload(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "event_id": event.event_id,
        "at": event.at,
        "action": event.action,
        "actor": event.actor,
        "site_id": event.site_id,
        "outcome": event.outcome,
        "details": event.details,
    }


def chain_hash(prev_hash: str, payload: dict[str, Any]) -> str:
    """Return SHA-256 over the previous hash and the event's canonical JSON."""
    return hashlib.sha256(prev_hash.encode() + canonical_json(payload)).hexdigest()


def append_event(
    session: Session,
    *,
    action: str,
    actor: str,
    site_id: str | None = None,
    outcome: str = "ok",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add one event to the chain inside the caller's transaction.

    The caller commits; the event is thereby written atomically with the
    change it records.

    Args:
        session: The open session of the action being recorded.
        action: What happened, e.g. ``subject.enroll``.
        actor: Who did it: ``admin:<key id>``, ``site:<key id>`` or ``subject``.
        site_id: The site involved, if any.
        outcome: ``ok`` or a short error code.
        details: Non-personal facts (counts, collection, scheme); never ids of
            subjects, templates or tokens.

    Returns:
        The new event (flushed, not committed).
    """
    with _append_lock:
        head = session.scalars(
            select(AuditHead).where(AuditHead.id == 1).with_for_update()
        ).one_or_none()
        if head is None:
            head = AuditHead(id=1, seq=0, hash=GENESIS_HASH)
            session.add(head)
        event = AuditEvent(
            seq=head.seq + 1,
            event_id=secrets.token_hex(16),
            at=utcnow().isoformat(),
            action=action,
            actor=actor,
            site_id=site_id,
            outcome=outcome,
            details=dict(details or {}),
            prev_hash=head.hash,
        )
        event.hash = chain_hash(head.hash, _payload(event))
        session.add(event)
        head.seq = event.seq
        head.hash = event.hash
        session.flush()
    return event


@dataclass(frozen=True)
class AuditVerification:
    """Result of checking the audit chain.

    Attributes:
        ok: True when every event and the head are intact.
        events: Number of events checked.
        problems: One sentence per defect found (first few only).
    """

    ok: bool
    events: int
    problems: list[str]


def verify_chain(session: Session, *, max_problems: int = 20) -> AuditVerification:
    """Recompute the whole chain and report every edited or missing event."""
    problems: list[str] = []
    expected_prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    for event in session.scalars(select(AuditEvent).order_by(AuditEvent.seq)):
        count += 1
        if event.seq != expected_seq:
            problems.append(
                f"Events {expected_seq} to {event.seq - 1} are missing before "
                f"event {event.seq}."
            )
        if event.prev_hash != expected_prev:
            problems.append(
                f"Event {event.seq} does not chain from the event before it."
            )
        if chain_hash(event.prev_hash, _payload(event)) != event.hash:
            problems.append(f"Event {event.seq} was edited: its hash does not match.")
        expected_prev = event.hash
        expected_seq = event.seq + 1
    head = session.get(AuditHead, 1)
    last_seq = expected_seq - 1
    if head is not None and (head.seq != last_seq or head.hash != expected_prev):
        problems.append(
            f"The chain head says {head.seq} events but the log ends at event "
            f"{last_seq}: events were removed from the end."
        )
    if head is None and count:
        problems.append("The chain head is missing.")
    return AuditVerification(
        ok=not problems, events=count, problems=problems[:max_problems]
    )
