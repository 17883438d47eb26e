import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InvalidParameter, NoFaceDetected, ProviderUnavailable, WeightsNotFound
from pipeline.face import FaceAnalyzer, combine_embeddings, select_providers
from tests.conftest import face_photo


@pytest.fixture(scope="module")
def analyzer(weights_dir):
    return FaceAnalyzer(weights_dir / "antelopev2")


def test_runs_on_cpu_here_and_says_so(analyzer):
    assert analyzer.providers == ["CPUExecutionProvider"]
    assert analyzer.active_providers == ["CPUExecutionProvider"]


def test_a_gpu_provider_without_a_gpu_is_an_error_not_a_fallback():
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider"):
        select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailable, match="not in this onnxruntime"):
        select_providers(["NoSuchExecutionProvider"])
    assert select_providers("auto") == ["CPUExecutionProvider"]


def test_black_picture_has_no_face(analyzer):
    with pytest.raises(NoFaceDetected) as info:
        analyzer.analyze(Image.new("RGB", (300, 300)), field="face_images[0]")
    assert info.value.code == "no_face" and "face_images[0]" in str(info.value)


def test_result_is_typed_with_keypoints_inside_the_box(analyzer):
    face = analyzer.analyze(face_photo())
    assert face.image_size == (1024, 1024)  # the reference resize of a 256x256 photo
    x1, y1, x2, y2 = face.bbox
    assert 0 < face.det_score <= 1 and face.area > 0
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face.kps)
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    # the face is where the blob is (centre of the picture)
    assert abs((x1 + x2) / 2 - 512) < 64 and abs((y1 + y2) / 2 - 512) < 64


def test_largest_of_two_faces_is_kept(analyzer):
    photo = face_photo(size=(640, 320), blobs=((150, 160, 30), (450, 160, 70)))
    face = analyzer.analyze(photo, reference_resize=False)
    centre_x = (face.bbox[0] + face.bbox[2]) / 2
    assert abs(centre_x - 450) < 40
    # and the other way round
    photo = face_photo(size=(640, 320), blobs=((150, 160, 70), (450, 160, 30)))
    face = analyzer.analyze(photo, reference_resize=False)
    assert abs((face.bbox[0] + face.bbox[2]) / 2 - 150) < 40


def test_tightly_cropped_face_is_found_by_retrying_smaller_detection_sizes(weights_dir):
    photo = face_photo(size=(300, 300), blobs=((150, 150, 140),))
    only_640 = FaceAnalyzer(weights_dir / "antelopev2", det_sizes=(640,))
    with pytest.raises(NoFaceDetected):
        only_640.analyze(photo, reference_resize=False)
    face = FaceAnalyzer(weights_dir / "antelopev2").analyze(photo, reference_resize=False)
    assert face.area > 100 * 100


def test_exif_orientation_is_applied_before_detection(analyzer):
    upright = face_photo(size=(320, 200), blobs=((80, 100, 40),))  # face on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera would store it
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    face = analyzer.analyze(buffer.getvalue(), reference_resize=False)
    assert face.image_size == (320, 200)
    assert (face.bbox[0] + face.bbox[2]) / 2 < 160


def test_colour_order_reaches_the_recogniser_as_insightface_expects(analyzer):
    """insightface takes BGR; we give it the photo's RGB reversed. A red face and a
    blue face must therefore not give the embedding of each other's channel swap."""
    red = face_photo(color=(255, 200, 150))
    blue = face_photo(color=(150, 200, 255))
    from_pil = analyzer.analyze(red).embedding
    from_array = analyzer.analyze(np.asarray(red)).embedding
    assert np.allclose(from_pil, from_array)
    assert not np.allclose(from_pil, analyzer.analyze(blue).embedding, atol=1e-3)


def test_combining_embeddings():
    a, b = np.array([3.0, 4.0]), np.array([0.0, 10.0])
    assert np.allclose(combine_embeddings([a, b], "mean"), [1.5, 7.0])
    norm_mean = combine_embeddings([a, b], "norm_mean")
    direction = (a / 5 + b / 10) / 2
    assert np.allclose(norm_mean, direction / np.linalg.norm(direction) * 7.5)
    with pytest.raises(InvalidParameter):
        combine_embeddings([a], "median")


def test_several_photos_and_a_separate_pose(analyzer):
    one = face_photo(color=(240, 220, 200))
    two = face_photo(color=(255, 240, 170))
    pose = face_photo(size=(512, 256), blobs=((400, 128, 60),))
    combined = analyzer.analyze_many([one, two], pose=pose)
    expected = (analyzer.analyze(one).embedding + analyzer.analyze(two).embedding) / 2
    assert np.allclose(combined.embedding, expected, atol=1e-4)
    pose_face = analyzer.analyze(pose)
    assert combined.kps == pose_face.kps and combined.image_size == pose_face.image_size
    with pytest.raises(NoFaceDetected, match=r"face_images\[1\]"):
        analyzer.analyze_many([one, Image.new("RGB", (64, 64))])


def test_missing_models_are_named(tmp_path):
    with pytest.raises(WeightsNotFound, match="scrfd_10g_bnkps.onnx"):
        FaceAnalyzer(tmp_path)
