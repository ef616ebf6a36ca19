"""Regenerate tests/data/lfw/dlib_embeddings.npz with dlib's own reference network.

dlib is the reference the project's embedding network is checked against
(DESIGN.md), so its descriptors of the 156 test photos serve as a fixed set of
real embeddings for the privacy tests without running the face pipeline in
every test. Run: .venv/bin/python tests/privacy/make_lfw_embeddings.py
"""

import csv
from pathlib import Path

import dlib
import face_recognition_models as frm
import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"


def main() -> None:
    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    network = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    with open(DATA / "lfw" / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths, identities, vectors = [], [], []
    for row in rows:
        image = dlib.load_rgb_image(str(DATA / row["path"]))
        faces = detector(image, 1)
        if not faces:
            # LFW photos are centred on the face: fall back to the central box.
            faces = [dlib.rectangle(70, 70, 180, 180)]
        face = max(faces, key=lambda r: r.area())
        descriptor = network.compute_face_descriptor(image, shapes(image, face))
        vector = np.asarray(descriptor, dtype=np.float32)
        paths.append(row["path"])
        identities.append(row["identity"])
        vectors.append(vector / np.linalg.norm(vector))
    np.savez_compressed(
        DATA / "lfw" / "dlib_embeddings.npz",
        paths=np.asarray(paths),
        identities=np.asarray(identities),
        embeddings=np.stack(vectors),
    )


if __name__ == "__main__":
    main()
