"""img2img and inpainting on fixture weights: the schedule's tail as diffusers defines it,
text-to-image's path under a white mask at full strength, an untouched unmasked area,
batch invariance, and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.errors import InstantIDError
from pipeline.img2img import encode_pictures, frame_mask, frame_picture, latent_mask, start_step
from pipeline.schedulers import SCHEDULERS, make_scheduler
from tests.conftest import face_photo, pixels

SMALL = dict(width=64, height=64, num_inference_steps=4)


def picture(size=(64, 64)) -> Image.Image:
    """A picture with structure everywhere (gradients and a few shapes)."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    array = np.stack([x * 255, y * 255, (1 - x) * y * 255], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    draw.rectangle([w // 8, h // 8, w // 3, h // 3], fill=(250, 250, 30))
    draw.ellipse([w // 2, h // 2, w - 4, h - 4], fill=(20, 40, 200))
    return image


def box_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


class Timesteps:
    """The timesteps the UNet is called with (one per step)."""

    def __init__(self, unet):
        self.seen = []
        self.handle = unet.register_forward_pre_hook(lambda m, args: self.seen.append(float(args[1])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("steps,strength", [(10, 0.5), (10, 0.25), (4, 1.0), (12, 0.3), (7, 0.99)])
def test_the_schedule_keeps_the_steps_diffusers_keeps(pipe, face, steps, strength):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    reference = make_scheduler("euler", pipe.sdxl.scheduler.config)
    reference.set_timesteps(steps)
    holder = type("Holder", (), {"scheduler": reference})()
    expected, count = StableDiffusionXLImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
    with Timesteps(pipe.sdxl.unet) as calls:
        pipe(face, "x", image=picture(), seed=1, width=64, height=64, num_inference_steps=steps, strength=strength,
             guidance_scale=1.0)
    assert count == len(calls.seen) == int(steps * strength)
    assert calls.seen == pytest.approx([float(t) for t in expected])
    assert start_step(steps, strength) == steps - count


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_full_strength_under_a_white_mask_is_text_to_image(pipe, face, scheduler):
    white = Image.new("L", (64, 64), 255)
    plain = pipe(face, "a portrait", seed=4, scheduler=scheduler, **SMALL).images[0]
    painted = pipe(face, "a portrait", seed=4, scheduler=scheduler, image=picture(), mask_image=white, strength=1.0,
                   **SMALL).images[0]
    assert np.abs(pixels(plain) - pixels(painted)).max() <= 1


def round_trip(pipe, array: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        latents = encode_pictures(pipe.sdxl.vae, [array], upcast=False, device=pipe.device, dtype=pipe.dtype)
        return pixels(pipe._decode(latents)[0])


@pytest.mark.parametrize("size,box", [((64, 64), (16, 16, 47, 47)), ((96, 64), (8, 8, 40, 56)),
                                      ((64, 96), (24, 40, 63, 95)), ((72, 64), (0, 0, 31, 23))])
def test_inpainting_repaints_the_masked_area_only(pipe, face, size, box):
    source, mask = picture(size), box_mask(size, box)
    decoded = []
    handle = pipe.sdxl.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: decoded.append(args[0].clone()))
    try:
        out = pixels(pipe(face, "a portrait", seed=9, image=source, mask_image=mask, width=size[0], height=size[1],
                          num_inference_steps=4).images[0])
    finally:
        handle.remove()
    framed = frame_picture(source, size)
    assert out.shape == framed.shape == (size[1], size[0], 3)
    # the final latents are the picture's own where the mask (at the latents' size) is 0
    with torch.inference_mode():
        own = encode_pictures(pipe.sdxl.vae, [framed], upcast=False, device=pipe.device, dtype=pipe.dtype)
    small = latent_mask([frame_mask(mask, size, size)], own.shape[-2:], device=pipe.device, dtype=pipe.dtype)
    final = decoded[-1] * pipe.sdxl.vae.config.scaling_factor
    kept = (small == 0).expand_as(own)
    assert kept.any() and (~kept).any()
    assert torch.allclose(final[kept], own[kept], atol=1e-5)
    assert not torch.allclose(final[~kept], own[~kept], atol=1e-2)
    # and the picture's own pixels where the mask is 0; repainted pixels inside
    keep = np.asarray(mask) == 0
    assert (out[keep] == framed[keep]).all()
    assert np.abs(out[~keep] - framed[~keep]).mean() > 5


def test_strength_decides_how_much_of_the_picture_changes(pipe, face):
    source = picture()
    trip = round_trip(pipe, frame_picture(source, (64, 64)))

    def distance(strength):
        out = pipe(face, "a portrait", seed=3, image=source, strength=strength, width=64, height=64,
                   num_inference_steps=10).images[0]
        return np.abs(pixels(out) - trip).mean()

    low, middle, high = distance(0.1), distance(0.5), distance(1.0)
    assert low < middle < high
    assert low > 0


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_an_image_is_the_same_alone_or_in_a_batch(pipe, face, mode):
    extra = dict(image=picture(), strength=0.6)
    if mode == "inpaint":
        extra["mask_image"] = box_mask((64, 64), (10, 20, 50, 60))
    alone = pipe(face, "a portrait", seed=8, **extra, **SMALL).images[0]
    batch = pipe(face, "a portrait", seed=6, num_images=3, **extra, **SMALL).images
    assert np.abs(pixels(alone) - pixels(batch[2])).max() <= 1
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 1


def test_modes_and_strengths_are_part_of_the_batch_key(pipe, face):
    from pipeline.params import GenerationParams

    spec = GenerationParams(seed=1, **SMALL)
    plain, _ = pipe.plan(spec, face)
    img2img, items = pipe.plan(spec, face, image=picture())
    inpaint, _ = pipe.plan(spec, face, image=picture(), mask=box_mask((64, 64), (0, 0, 9, 9)))
    other, _ = pipe.plan(GenerationParams(seed=1, strength=0.5, **SMALL), face, image=picture())
    assert len({plain, img2img, inpaint, other}) == 4
    assert (img2img.strength, inpaint.strength, plain.strength) == (0.8, 1.0, None)
    assert items[0].init_image.shape == (64, 64, 3) and items[0].mask is None


def test_the_keypoints_and_size_come_from_the_picture_when_no_pose_is_given(pipe):
    photo = face_photo()
    scene = face_photo(size=(320, 256), blobs=((240, 90, 40),))
    result = pipe([photo], "x", image=scene, seed=1, width=80, num_inference_steps=2, guidance_scale=1.0)
    assert result.face.image_size == (1280, 1024)  # the scene's frame (the face photo's is 1024x1024)
    assert (result.width, result.height) == (80, 64)  # the picture's aspect (the reference rule on it)


@pytest.mark.parametrize("kwargs,field", [
    (dict(strength=0.5), "strength"),
    (dict(mask_image=Image.new("L", (64, 64), 255)), "mask_image"),
    (dict(image=picture(), mask_image=Image.new("L", (32, 64), 255)), "mask_image"),
    (dict(image=picture(), strength=0.1, num_inference_steps=4), "strength"),
    (dict(image=picture(), strength=1.5), "strength"),
    (dict(image=picture(), strength=0), "strength"),
    (dict(image=b"not an image"), "image"),
])
def test_bad_inputs_are_refused_before_any_work_naming_the_field(pipe, face, kwargs, field):
    calls = []
    handle = pipe.sdxl.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InstantIDError) as info:
            pipe(face, "x", seed=1, width=64, height=64, **{"num_inference_steps": 3, **kwargs})
    finally:
        handle.remove()
    assert info.value.field == field, str(info.value)
    assert not calls


def test_the_mask_is_framed_as_the_picture_and_binarised():
    mask = Image.new("L", (200, 100), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 99, 99), fill=200)  # the left half, light grey
    framed = frame_mask(mask, (200, 100), (64, 64))  # cover: the middle 100x100, scaled
    assert framed.shape == (64, 64) and set(np.unique(framed)) == {0, 255}
    assert framed[:, :30].min() == 255 and framed[:, 34:].max() == 0
    art = frame_picture(picture((200, 100)), (64, 64))
    assert art.shape == (64, 64, 3) and art.dtype == np.uint8


def test_the_keypoints_land_on_the_pictures_face_although_the_face_stage_stretched_it(pipe):
    """250x140 becomes 1280x704 in the face stage (multiples of 64: 1.8% wider); the
    keypoints are mapped back, so they sit where the picture's face is in the output."""
    from pipeline.keypoints import Frame, reference_size
    from pipeline.params import GenerationParams

    scene = face_photo(size=(250, 140), blobs=((212, 70, 25),))  # off centre: the stretch shows
    face = pipe.analyze_faces([face_photo()], pose=scene)
    assert face.image_size == reference_size(250, 140) == (1280, 704)
    _, items = pipe.plan(GenerationParams(width=1024, height=576, seed=1), face, image=scene)
    found = np.asarray(face.kps).mean(axis=0) * np.array([250 / 1280, 140 / 704])  # in the picture's pixels
    expected = Frame((250, 140), (1024, 576)).points(found)[0]
    assert np.abs(items[0].kps.mean(axis=0) - expected).max() < 0.5
    stretched = Frame((1280, 704), (1024, 576)).points(np.asarray(face.kps).mean(axis=0))[0]
    assert np.abs(stretched - expected).max() > 5  # what the keypoints would have been off by
    x, y = (int(v) for v in expected)
    assert items[0].init_image[y, x].min() > 150  # on the face blob of the framed picture
