"""The public key that checks erasure receipts (no credential needed)."""

from fastapi import APIRouter

from facefed.server.api.deps import Service
from facefed.server.api.schemas import PublicKeyPublic

router = APIRouter(tags=["receipts"])


@router.get("/receipts/public-key", response_model=PublicKeyPublic)
def public_key(service: Service) -> PublicKeyPublic:
    """The Ed25519 public key of erasure receipts (see `verify_receipt`)."""
    assert service.signer is not None
    return PublicKeyPublic(public_key_pem=service.signer.public_key_pem)
