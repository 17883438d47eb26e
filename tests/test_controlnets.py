"""Extra ControlNets beside IdentityNet on fixture weights: each changes the result, a zero
strength or a closed window gives the pixels of a render without it, IdentityNet gets the
face tokens and the others the text tokens, each is called only inside its window, batch
invariance, annotators, and errors that name the field and the folder."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.controlnets import Annotators, ExtraControlNets, canny
from pipeline.errors import InvalidParameter
from pipeline.identitynet import window_keeps
from pipeline.params import GenerationParams
from pipeline.pipeline import RenderItem
from pipeline.weights import ExtraWeights
from tests.conftest import face_photo, pixels

SMALL = dict(width=64, height=64, num_inference_steps=4, seed=3)


@pytest.fixture(scope="module")
def scene():
    return face_photo(size=(200, 160), blobs=((100, 70, 40), (40, 130, 15)), color=(200, 240, 90))


def render(pipe, face, **kwargs):
    return pixels(pipe(face, "a portrait", **{**SMALL, **kwargs}).images[0])


class Calls:
    """encoder_hidden_states of every call of a module."""

    def __init__(self, module):
        self.tokens = []
        self.handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: self.tokens.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("kind,preprocessed", [("canny", False), ("depth", False), ("pose", False), ("pose", True)])
def test_each_extra_controlnet_changes_the_result_and_zero_strength_does_not(pipe, face, scene, kind, preprocessed):
    plain = render(pipe, face)
    entry = {"type": kind, "image": scene, "preprocessed": preprocessed}
    assert np.abs(render(pipe, face, controlnets=[{**entry, "scale": 0.8}]) - plain).max() > 2
    assert np.abs(render(pipe, face, controlnets=[{**entry, "scale": 0.0}]) - plain).max() == 0


def test_a_closed_window_gives_the_pixels_without_it_and_the_net_is_never_called(pipe, face, scene):
    plain = render(pipe, face)
    net = pipe.extra_controlnets.get("canny")
    with Calls(net) as calls:
        closed = render(pipe, face, controlnets=[{"type": "canny", "image": scene, "scale": 1.0,
                                                  "control_guidance_start": 0.9, "control_guidance_end": 1.0}])
    assert not calls.tokens and sum(window_keeps(4, 0.9, 1.0)) == 0
    assert np.abs(closed - plain).max() == 0


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.25, 0.75), (0.5, 1.0), (0.0, 0.5)])
def test_identitynet_gets_face_tokens_the_others_text_tokens_each_inside_its_own_window(pipe, face, scene, start,
                                                                                        end):
    canny_net, depth_net = pipe.extra_controlnets.get("canny"), pipe.extra_controlnets.get("depth")
    with Calls(pipe.sdxl.controlnet) as identity, Calls(canny_net) as edges, Calls(depth_net) as depth, \
            Calls(pipe.sdxl.unet) as unet:
        pipe(face, "a portrait", controlnets=[
            {"type": "canny", "image": scene, "control_guidance_start": start, "control_guidance_end": end},
            {"type": "depth", "image": scene, "control_guidance_start": 0.0, "control_guidance_end": 0.5}],
            control_guidance_start=0.25, control_guidance_end=1.0, **SMALL)
    assert len(identity.tokens) == sum(window_keeps(4, 0.25, 1.0))
    assert len(edges.tokens) == sum(window_keeps(4, start, end))
    assert len(depth.tokens) == sum(window_keeps(4, 0.0, 0.5))
    faces, text = pipe.num_face_tokens, unet.tokens[0].shape[1] - pipe.num_face_tokens
    assert all(t.shape[1] == faces for t in identity.tokens)
    assert all(torch.equal(t, unet.tokens[0][:, :text]) for t in edges.tokens + depth.tokens)
    assert torch.equal(identity.tokens[0], unet.tokens[0][:, text:])  # IdentityNet: the UNet's face tokens


def test_an_image_is_the_same_alone_or_in_a_batch_with_its_own_strengths(pipe, face, scene):
    spec = GenerationParams(controlnets=[{"type": "canny"}, {"type": "depth", "control_guidance_end": 0.5}], **SMALL)
    options, items = pipe.plan(spec, face, control_images=[scene, scene])
    other = pipe.plan(spec, face, control_images=[face_photo(), scene])[1][0]
    batch = [RenderItem(**{**vars(items[0]), "seed": 1, "control_scales": (0.2, 1.0)}),
             RenderItem(**{**vars(other), "seed": 2, "control_scales": (0.9, 0.0)}),
             RenderItem(**{**vars(items[0]), "seed": 3, "control_scales": (0.5, 0.5)})]
    together, _ = pipe.render(batch, options)
    for k, item in enumerate(batch):
        alone, _ = pipe.render([item], options)
        assert np.abs(pixels(alone[0]) - pixels(together[k])).max() <= 1, k


@pytest.mark.parametrize("width,height", [(64, 64), (96, 64), (64, 96), (72, 64)])
def test_every_shape_class_renders_with_an_extra_controlnet(pipe, face, scene, width, height):
    out = render(pipe, face, width=width, height=height, num_inference_steps=2,
                 controlnets=[{"type": "canny", "image": scene, "scale": 0.7}])
    assert out.shape == (height, width, 3)


def test_the_set_of_controlnets_is_part_of_the_batch_key(pipe, face, scene):
    def options(*entries):
        spec = GenerationParams(controlnets=list(entries), **SMALL)
        return pipe.plan(spec, face, control_images=[scene] * len(entries))[0]

    keys = {options(), options({"type": "canny"}), options({"type": "depth"}),
            options({"type": "canny"}, {"type": "depth"}), options({"type": "canny", "control_guidance_end": 0.5})}
    assert len(keys) == 5
    assert options({"type": "canny", "scale": 0.2}) == options({"type": "canny", "scale": 0.9})  # strengths per image


def test_canny_is_opencv_with_the_reference_thresholds_and_depth_is_a_full_range_grey_map(pipe, scene):
    edges = np.asarray(canny(scene))
    expected = cv2.Canny(cv2.cvtColor(np.asarray(scene), cv2.COLOR_RGB2BGR), 100, 200)
    assert edges.shape == (160, 200, 3) and (edges[..., 0] == expected).all() and expected.any()
    depth = np.asarray(pipe.annotators.depth(scene))
    assert depth.shape == (160, 200, 3) and (depth[..., 0] == depth[..., 2]).all()
    assert depth.min() == 0 and depth.max() == 255


@pytest.mark.parametrize("entries,field,needle", [
    ([{"type": "sketch", "image": "SCENE"}], "controlnets[0].type", "no controlnets/sketch/"),
    ([{"type": "canny"}], "controlnets[0].image", "is required"),
    ([{"type": "../sdxl", "image": "SCENE"}], "controlnets[0].type", "folder name"),
    ([{"type": "canny", "image": "SCENE", "control_guidance_start": 0.5, "control_guidance_end": 0.5}],
     "controlnets[0].control_guidance_end", "above control_guidance_start"),
    ([{"type": "canny", "image": "SCENE", "scale": 3}], "controlnets[0].scale", "2"),
    ([{"type": "canny", "image": "SCENE"}] * 5, "controlnets", "at most 4"),
    ([{"type": "canny", "image": b"not an image"}], "controlnets[0].image", "not an image"),
])
def test_bad_controlnet_entries_are_refused_before_any_work_naming_the_field(pipe, face, scene, entries, field,
                                                                             needle):
    entries = [{k: scene if v == "SCENE" else v for k, v in e.items()} for e in entries]
    calls = []
    handle = pipe.sdxl.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(Exception) as info:
            pipe(face, "x", controlnets=entries, **SMALL)
    finally:
        handle.remove()
    assert getattr(info.value, "field", None) == field, info.value
    assert needle in str(info.value) and not calls


def test_missing_weights_name_their_folder(tmp_path, scene):
    with pytest.raises(InvalidParameter) as info:
        ExtraControlNets(ExtraWeights(tmp_path), "cpu", torch.float32, 96).get("canny", "controlnets[1].type")
    assert info.value.field == "controlnets[1].type" and "controlnets/canny/" in str(info.value)
    with pytest.raises(InvalidParameter) as info:
        Annotators(ExtraWeights(tmp_path), "cpu", torch.float32).control_image("depth", scene, "controlnets[0].preprocessed")
    assert info.value.field == "controlnets[0].preprocessed" and "annotators/depth/" in str(info.value)
    with pytest.raises(InvalidParameter) as info:  # a type no annotator makes
        Annotators(ExtraWeights(tmp_path), "cpu", torch.float32).control_image("lineart", scene, "controlnets[3].preprocessed")
    assert info.value.field == "controlnets[3].preprocessed" and "preprocessed: true" in str(info.value)


def test_the_published_names_and_a_preprocessed_image_are_used_as_given(pipe, face):
    assert {"pose", "canny", "depth"} <= set(pipe.extra_controlnets.available())
    ready = Image.new("RGB", (64, 64))
    spec = GenerationParams(controlnets=[{"type": "canny", "preprocessed": True}], **SMALL)
    _, items = pipe.plan(spec, face, control_images=[ready])
    assert (items[0].controls[0] == 0).all()  # no annotator ran on it
