import math

import numpy as np
import pytest

from pipeline.keypoints import KEYPOINT_COLORS, Frame, draw_keypoints, reference_size

KPS = np.array([[60.0, 60.0], [140.0, 60.0], [100.0, 110.0], [70.0, 160.0], [130.0, 160.0]])


def test_canvas_is_black_with_the_output_size():
    image = draw_keypoints(KPS, (200, 240))
    assert image.size == (200, 240) and image.mode == "RGB"
    array = np.asarray(image)
    assert (array[5, 190] == 0).all() and (array[230, 5] == 0).all()


def test_each_keypoint_is_a_disc_of_radius_10_in_its_colour():
    array = np.asarray(draw_keypoints(KPS, (200, 200)))
    for (x, y), color in zip(KPS.astype(int), KEYPOINT_COLORS):
        assert tuple(array[y, x]) == color
        assert tuple(array[y - 9, x]) == color  # inside the disc
        assert tuple(array[y, x - 9]) == color


def test_limbs_run_to_the_nose_dimmed_by_0_6_and_4_px_wide():
    array = np.asarray(draw_keypoints(KPS, (200, 200)))
    dim = lambda c: tuple(int(v * 0.6) for v in c)  # noqa: E731
    for start in (0, 1, 3, 4):
        (x0, y0), (x1, y1) = KPS[start], KPS[2]
        mx, my = int((x0 + x1) / 2), int((y0 + y1) / 2)
        assert tuple(array[my, mx]) == dim(KEYPOINT_COLORS[start]), start
        # 7 px away from the segment, perpendicular to it: outside the ellipse
        length = math.hypot(x1 - x0, y1 - y0)
        nx, ny = -(y1 - y0) / length, (x1 - x0) / length
        assert tuple(array[int(round(my + 7 * ny)), int(round(mx + 7 * nx))]) == (0, 0, 0), start


def test_there_is_no_limb_between_the_eyes():
    array = np.asarray(draw_keypoints(KPS, (200, 200)))
    assert tuple(array[60, 100]) == (0, 0, 0)


def test_five_keypoints_are_required():
    with pytest.raises(ValueError):
        draw_keypoints(KPS[:4], (100, 100))


@pytest.mark.parametrize(
    "size,expected",
    [((256, 256), (1024, 1024)), ((640, 480), (1280, 960)), ((480, 640), (960, 1280)), ((1000, 600), (1280, 768)),
     ((3000, 2000), (1280, 832)), ((1024, 1024), (1024, 1024))],
)
def test_reference_size_rule(size, expected):
    width, height = reference_size(*size)
    assert (width, height) == expected
    assert width % 64 == 0 and height % 64 == 0 and max(width, height) <= 1280


def test_frame_maps_points_by_cover_and_centre_crop():
    same = Frame((100, 100), (100, 100))
    assert np.allclose(same.points([[10, 20]]), [[10, 20]])
    double = Frame((100, 100), (200, 200))
    assert np.allclose(double.points([[10, 20]]), [[20, 40]])
    wide = Frame((100, 100), (200, 100))  # scaled x2 to cover, 50 px cropped top and bottom
    assert np.allclose(wide.points([[50, 50], [0, 25]]), [[100, 50], [0, 0]])
    assert np.allclose(wide.box([0, 0, 100, 100]), [0, 0, 200, 100])
