"""The key service as sites see it: the protection key of a collection."""

from typing import Annotated

from fastapi import APIRouter, Query

from facefed.server.api.deps import KeyHolder, Service
from facefed.server.api.schemas import (
    MAX_DB_INT,
    CollectionPublic,
    ProtectionKeySecret,
)

router = APIRouter(tags=["keys"])


@router.get("/keys/protection", response_model=ProtectionKeySecret)
def protection_key(
    service: Service,
    caller: KeyHolder,
    collection: Annotated[str, Query(max_length=64)] = "default",
    scheme: Annotated[str | None, Query(max_length=64)] = None,
    version: Annotated[int | None, Query(ge=1, le=MAX_DB_INT)] = None,
) -> ProtectionKeySecret:
    """The protection key a collection's templates are made with (site key).

    With `scheme` (and optionally `version`) instead: that scheme's newest (or
    given) key, e.g. for an admin computing a rotation transform.
    """
    key = service.protection_key(
        caller, collection_id=collection, scheme=scheme, version=version
    )
    return ProtectionKeySecret(**key.to_dict())


@router.get("/collections", response_model=list[CollectionPublic])
def collections(service: Service, caller: KeyHolder) -> list[CollectionPublic]:
    """The collections, with models, scheme, key version and size."""
    return [CollectionPublic.of(row, size) for row, size in service.list_collections()]


@router.get("/collections/{collection_id}", response_model=CollectionPublic)
def collection(
    collection_id: str, service: Service, caller: KeyHolder
) -> CollectionPublic:
    """One collection: the model to embed with now and the models it accepts."""
    row, size = service.collection(collection_id)
    return CollectionPublic.of(row, size)
