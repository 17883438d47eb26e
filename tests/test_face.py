import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InvalidParameter, NoFaceDetected, ProviderUnavailable, WeightsNotFound
from pipeline.face import FaceAnalyzer, FaceRequest, combine_embeddings, select_providers
from tests.conftest import face_photo


@pytest.fixture(scope="module")
def analyzer(weights_dir):
    return FaceAnalyzer(weights_dir / "antelopev2")


def test_runs_on_cpu_here_and_says_so(analyzer):
    assert analyzer.providers == ["CPUExecutionProvider"]
    assert analyzer.active_providers == ["CPUExecutionProvider"]


def test_the_face_models_threads_sleep_when_out_of_work(analyzer):
    """ONNX Runtime's threads spin by default: on this 2-core machine a detection then takes
    twice the CPU time for the same wall time (pipeline.face.session_options)."""
    for model in (analyzer._detector, analyzer._recognizer):
        options = model.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


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


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def outcome(fn):
    try:
        return fn()
    except Exception as error:  # the error is the outcome being compared
        return error


def assert_same(expected, got) -> None:
    if isinstance(expected, Exception):
        assert type(got) is type(expected) and str(got) == str(expected)
        assert getattr(got, "field", None) == getattr(expected, "field", None)
    else:
        assert (got.bbox, got.kps, got.image_size, got.det_score) == (expected.bbox, expected.kps,
                                                                       expected.image_size, expected.det_score)
        assert np.allclose(got.embedding, expected.embedding, rtol=1e-5, atol=1e-5)


def test_several_requests_together_equal_each_alone_with_one_recognition_call(analyzer, monkeypatch):
    one, two = face_photo(), face_photo(color=(255, 240, 170))
    pose = face_photo(size=(512, 256), blobs=((400, 128, 60),))
    black = Image.new("RGB", (200, 200))
    requests = [
        FaceRequest([one, two], pose=pose),  # several photos and a pose photo
        FaceRequest([black], names=["mine[0]"]),  # no face
        FaceRequest([two, one], combine="norm_mean"),
        FaceRequest([b"not an image", one]),  # not an image
        FaceRequest([]),  # no photo
        FaceRequest([one, two], combine="median"),  # unknown combine mode
        FaceRequest([one], pose=black, pose_name="their_pose"),  # a pose photo without a face
        FaceRequest([png(two)]),  # encoded bytes, as served requests send them
    ]
    alone = [outcome(lambda r=r: analyzer.analyze_many(r.images, pose=r.pose, combine=r.combine, names=r.names,
                                                        pose_name=r.pose_name)) for r in requests]
    runs = []
    session = analyzer._recognizer.session
    original = session.run
    monkeypatch.setattr(session, "run", lambda *a, **k: runs.append(a[1]) or original(*a, **k))
    together = analyzer.analyze_requests(requests)
    assert len(runs) == 1  # one recognition call for the faces of every request
    assert [type(r).__name__ for r in together] == ["FaceInfo", "NoFaceDetected", "FaceInfo", "InvalidImage",
                                                    "InvalidParameter", "InvalidParameter", "NoFaceDetected",
                                                    "FaceInfo"]
    for expected, got in zip(alone, together):
        assert_same(expected, got)
    assert together[1].field == "mine[0]" and together[6].field == "their_pose"


def test_the_served_face_stage_analyses_its_batch_together(weights_dir, analyzer):
    """FaceEmbedder's batch method: each request its own result or error."""
    from deployments.face import FaceEmbedder, FaceJob

    embedder = FaceEmbedder.func_or_class(str(weights_dir))
    good = FaceJob(images=[png(face_photo()), png(face_photo(color=(255, 240, 170)))])
    posed = FaceJob(images=[png(face_photo())], pose=png(face_photo(size=(512, 256), blobs=((400, 128, 60),))))
    faceless = FaceJob(images=[png(Image.new("RGB", (64, 64)))])
    results = embedder._analyze([good, FaceJob(images=[b"junk"]), posed, faceless])
    assert_same(analyzer.analyze_many([face_photo(), face_photo(color=(255, 240, 170))]), results[0])
    assert results[1].code == "invalid_image" and results[1].field == "face_images[0]"
    assert_same(analyzer.analyze_many([face_photo()], pose=face_photo(size=(512, 256), blobs=((400, 128, 60),))),
                results[2])
    assert isinstance(results[3], NoFaceDetected)
