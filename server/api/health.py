"""Service health (no credential needed)."""

from fastapi import APIRouter

from facefed.server.api.deps import Service
from facefed.server.api.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic)
def health(service: Service) -> HealthPublic:
    """Say the service is up, with gallery sizes (no personal data)."""
    collections = service.list_collections()
    return HealthPublic(
        collections=len(collections), templates=sum(size for _, size in collections)
    )
