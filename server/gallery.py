"""Faiss galleries of protected templates, one per collection.

Float templates (the orthonormal scheme) are unit vectors searched by inner
product (= cosine): exact with `IndexIDMap2(IndexFlatIP)` by default, and an
inverted file (`IndexIVFFlat`, Jegou et al., 2011) once a collection passes
`ivf_min_size`, trained on the collection's own templates. Binary templates
(irreversible schemes) are searched by Hamming distance in
`IndexBinaryIDMap2(IndexBinaryFlat)` and scored cos(pi * hamming / bits)
(Charikar, 2002), the cosine scale of the float schemes.

The database is the source of truth. The index only ever holds what the
database holds: writes commit to the database before the index add, and
erasures remove from the index before the database delete; the index is
rebuilt from the database at start-up (and after a failed index write), so a
crash between the two steps never leaves them disagreeing after a restart.
Each collection has its own lock; searches and writes on one collection are
serialised, different collections proceed in parallel.

Faiss ids are the templates' random 62-bit ids; a map from template id to
subject id turns template hits into subject candidates.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from facefed.core.errors import ConfigurationError, TemplateError

logger = logging.getLogger(__name__)

IndexKind = Literal["float", "binary"]


@dataclass(frozen=True)
class IndexConfig:
    """How float galleries are indexed.

    Attributes:
        ivf_min_size: Switch from exact search to IVF at this many templates.
        nlist: IVF cells; at least 39 training points per cell are used.
        nprobe: IVF cells visited per query (recall against speed).
        use_gpu: Search on the GPU when faiss has GPU support and a GPU exists.
    """

    ivf_min_size: int = 200_000
    nlist: int = 1024
    nprobe: int = 64
    use_gpu: bool = True


@dataclass(frozen=True)
class Hit:
    """One subject candidate of a search.

    Attributes:
        subject_id: The candidate subject.
        template_id: Its best-scoring template.
        score: Cosine similarity (float) or cos(pi * hamming / bits) (binary).
    """

    subject_id: str
    template_id: int
    score: float


def _hamming_score(distance: float, bits: int) -> float:
    """cos(pi * h / bits): the angle estimate of random hyperplanes (Charikar, 2002)."""
    return float(np.cos(np.pi * distance / bits))


@functools.lru_cache(maxsize=1)
def _gpu_count() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@dataclass
class _Entries:
    subject_of: dict[int, str] = field(default_factory=dict)
    templates_of: dict[str, set[int]] = field(default_factory=dict)
    # Most templates any subject has held; kept up to date on add (an upper
    # bound after removals), so a search never scans every subject.
    most_per_subject: int = 1

    def add(self, subject_id: str, template_id: int) -> None:
        self.subject_of[template_id] = subject_id
        held = self.templates_of.setdefault(subject_id, set())
        held.add(template_id)
        self.most_per_subject = max(self.most_per_subject, len(held))


class CollectionIndex:
    """The Faiss index of one collection, with its own lock.

    Args:
        kind: ``float`` (inner product) or ``binary`` (Hamming).
        dim: Dimensions (float) or bits (binary, a multiple of 8).
        config: Index configuration.
    """

    def __init__(self, kind: IndexKind, dim: int, config: IndexConfig) -> None:
        if kind not in ("float", "binary"):
            raise ConfigurationError(
                f"Unknown index kind {kind!r}; known kinds: 'float', 'binary'."
            )
        if kind == "binary" and dim % 8:
            raise ConfigurationError(
                f"Binary templates need a multiple of 8 bits; got {dim}."
            )
        self.kind: IndexKind = kind
        self.dim = dim
        self.config = config
        self.lock = threading.RLock()
        self._entries = _Entries()
        self._index: Any = self._new_exact()
        self._is_ivf = False
        self._gpu_index: Any = None
        self._gpu_dirty = True

    # -- construction -------------------------------------------------------

    def _new_exact(self) -> Any:
        import faiss

        if self.kind == "binary":
            return faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(self.dim))
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_ivf(self, training: npt.NDArray[np.float32]) -> Any:
        import faiss

        nlist = max(1, min(self.config.nlist, len(training) // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(
            quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT
        )
        index.train(training)
        # A hash-table direct map lets us reconstruct and remove random ids.
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        index.nprobe = min(self.config.nprobe, nlist)
        return index

    @property
    def size(self) -> int:
        """Number of templates in the index."""
        return int(self._index.ntotal)

    @property
    def is_ivf(self) -> bool:
        """Whether the index is an inverted file (approximate)."""
        return self._is_ivf

    # -- writes --------------------------------------------------------------

    def add(self, subject_id: str, ids: list[int], vectors: npt.NDArray[Any]) -> None:
        """Add templates of one subject (after their database commit)."""
        if not ids:
            return
        with self.lock:
            vectors = self._check(vectors, len(ids))
            self._index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            for template_id in ids:
                self._entries.add(subject_id, template_id)
            self._gpu_dirty = True
            if (
                self.kind == "float"
                and not self._is_ivf
                and self.size >= self.config.ivf_min_size
            ):
                self._switch_to_ivf()

    def remove_subject(self, subject_id: str) -> int:
        """Remove every template of a subject; return how many were removed."""
        with self.lock:
            ids = self._entries.templates_of.pop(subject_id, set())
            if ids:
                self._index.remove_ids(np.asarray(sorted(ids), dtype=np.int64))
                for template_id in ids:
                    self._entries.subject_of.pop(template_id, None)
                self._gpu_dirty = True
            return len(ids)

    def replace_all(self, items: Iterable[tuple[str, int, npt.NDArray[Any]]]) -> None:
        """Rebuild the index from (subject id, template id, vector) triples."""
        subjects: list[str] = []
        ids: list[int] = []
        vectors: list[npt.NDArray[Any]] = []
        for subject_id, template_id, vector in items:
            subjects.append(subject_id)
            ids.append(template_id)
            vectors.append(vector)
        with self.lock:
            self._entries = _Entries()
            self._is_ivf = False
            self._index = self._new_exact()
            self._gpu_dirty = True
            if not ids:
                return
            matrix = self._check(np.stack(vectors), len(ids))
            if self.kind == "float" and len(ids) >= self.config.ivf_min_size:
                self._index = self._new_ivf(matrix)
                self._is_ivf = True
            self._index.add_with_ids(matrix, np.asarray(ids, dtype=np.int64))
            for subject_id, template_id in zip(subjects, ids, strict=True):
                self._entries.add(subject_id, template_id)

    def _switch_to_ivf(self) -> None:
        ids = np.fromiter(self._entries.subject_of.keys(), dtype=np.int64)
        vectors = np.vstack([self._index.reconstruct(int(i)) for i in ids]).astype(
            np.float32
        )
        logger.info(
            "Collection reached %d templates: switching to IVF (nlist %d)",
            len(ids),
            self.config.nlist,
        )
        index = self._new_ivf(vectors)
        index.add_with_ids(vectors, ids)
        self._index = index
        self._is_ivf = True

    # -- search --------------------------------------------------------------

    def search(self, probe: npt.NDArray[Any], *, top_k: int) -> list[Hit]:
        """Return up to `top_k` subjects, best first, by their best template."""
        with self.lock:
            if self.size == 0:
                return []
            probe = self._check(probe.reshape(1, -1), 1)
            # A subject may hold several templates: ask for more template hits
            # than subjects wanted, then keep each subject's best one.
            k = min(self.size, top_k * self._entries.most_per_subject)
            scores, ids = self._searcher().search(probe, k)
            return self._to_hits(scores[0], ids[0], top_k)

    def score_subject(
        self, subject_id: str, probe: npt.NDArray[Any]
    ) -> tuple[int, float] | None:
        """Return (template id, score) of a subject's best template, or None."""
        with self.lock:
            ids = self._entries.templates_of.get(subject_id)
            if not ids:
                return None
            probe = self._check(probe.reshape(1, -1), 1)[0]
            best: tuple[int, float] | None = None
            for template_id in ids:
                stored = self._index.reconstruct(int(template_id))
                score = self._similarity(probe, stored)
                if best is None or score > best[1]:
                    best = (template_id, score)
            return best

    def vectors_of(
        self, subject_ids: list[str] | None = None
    ) -> tuple[list[str], list[int], npt.NDArray[Any]]:
        """Return subject ids, template ids and the template matrix, in order.

        Args:
            subject_ids: Only these subjects' templates; every template if None.
        """
        with self.lock:
            chosen = (
                list(self._entries.subject_of.items())
                if subject_ids is None
                else [
                    (tid, sid)
                    for sid in subject_ids
                    for tid in sorted(self._entries.templates_of.get(sid, ()))
                ]
            )
            if not chosen:
                return [], [], np.zeros((0, self.dim), dtype=np.float32)
            matrix = np.vstack([self._index.reconstruct(int(tid)) for tid, _ in chosen])
            return [sid for _, sid in chosen], [tid for tid, _ in chosen], matrix

    def template_ids(self) -> set[int]:
        """Return the ids of every template in the index."""
        with self.lock:
            return set(self._entries.subject_of)

    def _similarity(self, probe: npt.NDArray[Any], stored: npt.NDArray[Any]) -> float:
        if self.kind == "binary":
            differing = int(np.unpackbits(np.bitwise_xor(probe, stored)).sum())
            return _hamming_score(differing, self.dim)
        return float(np.dot(probe, stored))

    def _to_hits(
        self, scores: npt.NDArray[Any], ids: npt.NDArray[np.int64], top_k: int
    ) -> list[Hit]:
        best: dict[str, Hit] = {}
        for raw, template_id in zip(scores, ids, strict=True):
            if template_id < 0:
                continue
            subject_id = self._entries.subject_of.get(int(template_id))
            if subject_id is None:
                continue
            score = (
                _hamming_score(float(raw), self.dim)
                if self.kind == "binary"
                else float(raw)
            )
            if subject_id not in best or score > best[subject_id].score:
                best[subject_id] = Hit(subject_id, int(template_id), score)
        ranked = sorted(best.values(), key=lambda hit: hit.score, reverse=True)
        return ranked[:top_k]

    def _searcher(self) -> Any:
        if self.kind == "binary" or not self.config.use_gpu or _gpu_count() == 0:
            return self._index
        import faiss

        # FIXME: the GPU copy is rebuilt after every write, which is right for
        # read-heavy galleries but slow when enrollments and searches interleave.
        if self._gpu_dirty or self._gpu_index is None:
            resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(resources, 0, self._index)
            self._gpu_dirty = False
        return self._gpu_index

    def _check(self, vectors: npt.NDArray[Any], rows: int) -> npt.NDArray[Any]:
        width = self.dim // 8 if self.kind == "binary" else self.dim
        dtype = np.uint8 if self.kind == "binary" else np.float32
        if vectors.ndim != 2 or vectors.shape != (rows, width):
            raise TemplateError(
                f"Expected {rows} template(s) of width {width}; got shape "
                f"{vectors.shape}."
            )
        return np.ascontiguousarray(vectors, dtype=dtype)


class Gallery:
    """The indexes of every collection.

    Args:
        config: Index configuration shared by the collections.
    """

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._indexes: dict[str, CollectionIndex] = {}
        if config.use_gpu and _gpu_count() == 0:
            logger.info("No GPU available to faiss: gallery searches run on the CPU")

    def ensure(self, collection_id: str, kind: IndexKind, dim: int) -> CollectionIndex:
        """Return a collection's index, creating an empty one if needed."""
        with self._lock:
            index = self._indexes.get(collection_id)
            if index is None:
                index = CollectionIndex(kind, dim, self.config)
                self._indexes[collection_id] = index
            return index

    def get(self, collection_id: str) -> CollectionIndex | None:
        """Return a collection's index, or None when it has none."""
        with self._lock:
            return self._indexes.get(collection_id)

    def collections(self) -> list[str]:
        """Return the ids of the collections with an index."""
        with self._lock:
            return list(self._indexes)
