"""The detection benchmark's test images."""

import numpy as np

from benchmarks import bench_detection


def test_letterbox_keeps_aspect_and_pads():
    image = np.full((100, 200, 3), 200, np.uint8)
    boxed = bench_detection.letterbox(image, (640, 480))
    assert boxed.shape == (480, 640, 3)
    # 200x100 scales by 3.2 to 640x320, centred with 80 grey rows above and below.
    assert (boxed[:80] == 114).all() and (boxed[-80:] == 114).all()
    assert (boxed[80:400] == 200).all()


def test_benchmark_images_are_real_photos_at_both_sizes():
    images = bench_detection.make_images()
    assert set(images) == {
        f"{scene} @ {size}"
        for scene in ("one face", "many faces")
        for size in ("640x480", "1920x1080")
    }
    assert images["many faces @ 1920x1080"].shape == (1080, 1920, 3)
    assert images["one face @ 640x480"].std() > 20
