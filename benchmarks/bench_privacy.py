"""Encrypted matching (CKKS) and template protection timings, beside plaintext.

Run: `.venv/bin/python -m benchmarks.bench_privacy [--repeats N] [--sizes ...]`.

TenSEAL runs with 2 threads (the issue's budget of 2 cores); numpy and Faiss
with 2 threads as well. For each operation the plaintext reference (numpy /
Faiss inner product over the same unit templates) is timed in the same run.
Galleries are random unit 128-d vectors: HE cost does not depend on their
values. Writes benchmarks/results/privacy.{json,md} and the privacy section
of BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.report import load_note, replace_section

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DIM = 128
THREADS = 2


def _time(function: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds over `repeats` calls (after one warm-up)."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    matrix = rng.standard_normal((n, DIM)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def bench_he(sizes: list[int], repeats: int) -> dict[str, object]:
    import faiss

    from facefed.privacy.he import ServerHEScorer, SiteHEContext

    faiss.omp_set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    probe = _unit(rng, 1)[0]
    results: dict[str, object] = {}

    start = time.perf_counter()
    site = SiteHEContext.create(galois_keys=True, n_threads=THREADS)
    results["context_create_s"] = time.perf_counter() - start
    public = site.public_bytes()
    results["public_context_bytes"] = len(public)
    results["public_context_no_galois_bytes"] = len(
        SiteHEContext.create(galois_keys=False, n_threads=THREADS).public_bytes()
    )
    scorer = ServerHEScorer(public)

    columns = site.encrypt_probe(probe, layout="columns")
    packed = site.encrypt_probe(probe, layout="packed")
    results["probe_columns_bytes"] = len(columns)
    results["probe_packed_bytes"] = len(packed)
    results["encrypt_columns_s"] = _time(lambda: site.encrypt_probe(probe), repeats)
    results["encrypt_packed_s"] = _time(
        lambda: site.encrypt_probe(probe, layout="packed"), repeats
    )

    template = _unit(rng, 1)[0]
    results["one_packed_s"] = _time(lambda: scorer.score_one(packed, template), repeats)
    results["one_columns_s"] = _time(
        lambda: scorer.score_one(columns, template), repeats
    )
    results["one_plain_s"] = _time(lambda: float(template @ probe), repeats)
    one = scorer.score_one(packed, template)
    results["one_score_bytes"] = len(one)
    results["one_abs_error"] = abs(
        float(site.decrypt_scores(one, 1)[0]) - float(template @ probe)
    )

    many = []
    for size in sizes:
        gallery = _unit(rng, size)
        index = faiss.IndexFlatIP(DIM)
        index.add(gallery)
        few = max(1, repeats // 2) if size >= 100_000 else repeats
        encrypted_s = _time(lambda g=gallery: scorer.score_many(columns, g), few)
        scores = scorer.score_many(columns, gallery)
        decrypt_s = _time(lambda s=scores, n=size: site.decrypt_scores(s, n), few)
        decrypted = site.decrypt_scores(scores, size)
        plain = gallery @ probe
        many.append(
            {
                "n": size,
                "encrypted_s": encrypted_s,
                "decrypt_s": decrypt_s,
                "scores_bytes": len(scores),
                "numpy_s": _time(lambda g=gallery: g @ probe, repeats),
                "faiss_flat_ip_s": _time(
                    lambda i=index: i.search(probe[None, :], 10), repeats
                ),
                "max_abs_error": float(np.abs(decrypted - plain).max()),
                "rank1_identical": bool(np.argmax(decrypted) == np.argmax(plain)),
            }
        )
        print(f"1:N {size}: encrypted {encrypted_s:.3f} s", flush=True)
    results["one_to_many"] = many
    return results


def bench_protection(repeats: int) -> dict[str, float]:
    from facefed.privacy.protection import generate_key, protect

    rng = np.random.default_rng(1)
    embeddings = _unit(rng, 10_000)
    results = {
        "normalise_only_s": _time(
            lambda: embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True),
            repeats,
        )
    }
    for scheme in ("orthonormal-v1", "biohash-v1"):
        key = generate_key(scheme, 1, rng=random.Random(0))
        results[f"{scheme}_10k_s"] = _time(
            lambda k=key: protect(embeddings, k), repeats
        )
    return results


def render_markdown(report: dict[str, object]) -> str:
    he = report["he"]
    assert isinstance(he, dict)
    lines = [
        f"Measured {report['date']} on {report['machine']}, TenSEAL/numpy/Faiss "
        f"with {THREADS} threads; {report['load_note']}",
        "",
        "CKKS, poly modulus 8192, moduli (60, 40, 60), scale 2^40:",
        "",
        "| operation | encrypted | plaintext reference | size |",
        "| --- | --- | --- | --- |",
        f"| context creation (with Galois keys) | {he['context_create_s']:.2f} s | - "
        f"| public context {he['public_context_bytes'] / 1e6:.1f} MB "
        f"({he['public_context_no_galois_bytes'] / 1e6:.2f} MB without Galois keys) |",
        f"| encrypt probe, columns (1:N) | {he['encrypt_columns_s'] * 1e3:.0f} ms | - "
        f"| {he['probe_columns_bytes'] / 1e6:.1f} MB |",
        f"| encrypt probe, packed (1:1) | {he['encrypt_packed_s'] * 1e3:.1f} ms | - "
        f"| {he['probe_packed_bytes'] / 1e3:.0f} KB |",
        f"| 1:1, packed probe | {he['one_packed_s'] * 1e3:.1f} ms "
        f"| {he['one_plain_s'] * 1e6:.1f} us "
        f"| scores {he['one_score_bytes'] / 1e3:.0f} KB |",
        f"| 1:1, columns probe | {he['one_columns_s'] * 1e3:.1f} ms | - | - |",
    ]
    for row in he["one_to_many"]:
        lines.append(
            f"| 1:N, N = {row['n']:,} | {row['encrypted_s']:.2f} s "
            f"(+ decrypt {row['decrypt_s']:.2f} s) "
            f"| numpy {row['numpy_s'] * 1e3:.2f} ms, "
            f"Faiss flat {row['faiss_flat_ip_s'] * 1e3:.2f} ms "
            f"| scores {row['scores_bytes'] / 1e6:.2f} MB; "
            f"max error {row['max_abs_error']:.1e}, "
            f"rank-1 {'same' if row['rank1_identical'] else 'DIFFERENT'} |"
        )
    protection = report["protection"]
    assert isinstance(protection, dict)
    lines += [
        "",
        "Template protection of 10,000 embeddings (128-d): "
        f"orthonormal-v1 {protection['orthonormal-v1_10k_s'] * 1e3:.1f} ms, "
        f"biohash-v1 {protection['biohash-v1_10k_s'] * 1e3:.1f} ms "
        f"(normalisation alone {protection['normalise_only_s'] * 1e3:.1f} ms).",
        "",
        "Targets: 1:1 under 20 ms, 1:N over 10,000 under 1 s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000]
    )
    parser.add_argument(
        "--load-note",
        default=load_note(),
        help="How busy the machine was (default: its measured load average).",
    )
    arguments = parser.parse_args()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_note": arguments.load_note,
        "he": bench_he(arguments.sizes, arguments.repeats),
        "protection": bench_protection(arguments.repeats),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "privacy.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report)
    (RESULTS / "privacy.md").write_text(markdown)
    replace_section(
        "privacy", "## Privacy: encrypted matching and protection\n\n" + markdown
    )
    print(markdown)


if __name__ == "__main__":
    main()
