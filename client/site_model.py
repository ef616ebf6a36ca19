"""Which embedding model a site embeds with, and opening it.

A collection serves one model at a time and accepts the templates of the
models it served before (`GET /v1/collections/{id}`). After an admin promotes
a new model, each site switches when it has the model: by default a site
embeds with the collection's serving model; `FACEFED_EMBEDDING_MODEL` (or a
command's `--model`) pins one model id instead, for a site that keeps the
previous model while the new one is rolled out. Either way the model must be
one the collection accepts and one this site holds: the shipped dlib model,
or a version registered in the site's model folder (`facefed runs register`).
"""

from typing import TYPE_CHECKING

from facefed.client.gallery import CollectionModels
from facefed.core.errors import ConfigurationError, NotFoundError

if TYPE_CHECKING:
    from facefed.core.embedding import OnnxEmbedder

# The setting's value that follows the collection's serving model.
SERVING = "serving"


def choose_model(choice: str, models: CollectionModels, *, collection: str) -> str:
    """The model id a site embeds with.

    Args:
        choice: `serving`, or a model id.
        models: The collection's serving and accepted models.
        collection: The collection's name, for the message.

    Raises:
        ConfigurationError: The collection does not accept that model's
            templates (nothing would match them).
    """
    model_id = models.serving_model_id if choice == SERVING else choice
    if model_id not in models.accepted_model_ids:
        raise ConfigurationError(
            f"Collection {collection!r} does not accept templates of model "
            f"{model_id!r}; it serves {models.serving_model_id} and accepts "
            f"{', '.join(models.accepted_model_ids)}. Set FACEFED_EMBEDDING_MODEL "
            f"(or --model) to one of them, or to {SERVING!r}."
        )
    return model_id


def load_site_embedder(model_id: str) -> "OnnxEmbedder":
    """Open the embedder of `model_id`: dlib's shipped model or a registered one.

    Raises:
        ConfigurationError: This site holds no such model; the message says
            how to register it.
    """
    from facefed.core.embedding import OnnxEmbedder, load_metadata
    from facefed.core.settings import get_core_settings
    from facefed.models.registry import ModelRegistry
    from facefed.models.zoo import ensure_dlib_resnet_onnx

    shipped = ensure_dlib_resnet_onnx()
    if load_metadata(shipped).model_id == model_id:
        return OnnxEmbedder.from_metadata_file(shipped)
    try:
        return ModelRegistry().load_embedder(model_id)
    except NotFoundError:
        folder = get_core_settings().model_dir
        raise ConfigurationError(
            f"The embedding model {model_id} is not registered at this site "
            f"(model folder {folder}). Register it there first: "
            f"`facefed runs register {model_id}` where it was trained, or copy "
            "its .onnx and .json files into the model folder "
            "(FACEFED_MODEL_CACHE)."
        ) from None
