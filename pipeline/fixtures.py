"""Fixture weights: tiny random models in exactly the published layout and formats.

``write_fixtures(root)`` writes::

    sdxl/                       diffusers folder: tiny SDXL-shaped UNet (text_time), two tiny
                                CLIP text encoders, tokenizers from a generated vocabulary,
                                a small VAE (8x), an Euler scheduler config, model_index.json
    instantid/ControlNetModel/  config.json + diffusion_pytorch_model.safetensors
    instantid/ip-adapter.bin    {"image_proj": ..., "ip_adapter": ...} with the published keys
    antelopev2/                 scrfd_10g_bnkps.onnx (an SCRFD-signature detector) and
                                glintr100.onnx (an ArcFace-signature recogniser)
    controlnets/{pose,canny,depth}/  extra SDXL ControlNets (diffusers layout, IdentityNet's topology)
    annotators/depth/           a tiny DPT depth estimator (transformers layout)
    annotators/openpose/body_pose_model.pth  OpenPose's body network at tiny widths (published keys)
    safety_checker/, feature_extractor/  the Stable Diffusion safety checker (a CLIP vision tower,
                                17 screened concepts, 3 special-care ones) at tiny widths, with
                                its CLIPImageProcessor; its thresholds flag no picture
    eval/face/arcface_r100.onnx a second ArcFace-signature recogniser (another seed), and
    eval/clip/                  a tiny CLIPModel + CLIPProcessor: what ``instantid eval`` scores with

``write_sdxl_single_file(root / "sdxl", path)`` writes that SDXL again as one .safetensors
checkpoint in the original Stability (SGM) key layout, as single-file fine-tunes are published.

The fixture detector "sees" a face where the picture has a bright blob on a darker
surround, with a box sized by the blob and five keypoints inside the box; a black
picture has no face. The recogniser is a fixed random projection of the aligned crop,
so different pictures give different embeddings. Everything is seeded: the same call
writes the same bytes. Nothing outside this module knows these weights are fixtures.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

FIXTURE_SEED = 20231212
TEXT_WIDTH = 32  # hidden size of the tiny CLIP-L-shaped text encoder
# The OpenCLIP-bigG-shaped second encoder is wider than the first (as 1280 vs 768 in SDXL):
# single-file loaders tell the two apart by width. It has 10 layers because they recognise
# an SDXL checkpoint by a key of the OpenCLIP encoder's resblocks.9.
TEXT_WIDTH_2 = 64
TEXT_LAYERS_2 = 10
CROSS_ATTENTION_DIM = TEXT_WIDTH + TEXT_WIDTH_2
TIME_EMBED_DIM = 8
RESAMPLER_WIDTH = 128  # 2 heads of 64
NUM_FACE_TOKENS = 16

# Detector: per stride, a centre window of 4*stride against the ring around it.
DETECTOR_STRIDES = (8, 16, 32)
DETECTOR_GAIN = 12.0
DETECTOR_CONTRAST = 0.5
# Keypoints relative to the box centre, in box sides: eyes, nose, mouth corners.
KEYPOINT_LAYOUT = ((-0.2, -0.15), (0.2, -0.15), (0.0, 0.05), (-0.15, 0.25), (0.15, 0.25))

_CORPUS = """
a photo of a person portrait woman man face closeup studio lighting high quality detailed
watercolor painting film noir black and white neon lights jungle mars snow line art vibrant
color cinematic dramatic soft natural light background smiling looking at the camera
blurry lowres ugly deformed bad anatomy text watermark signature cartoon 3d render
""".split()


def write_fixtures(root: str | Path) -> Path:
    """Write the whole fixture weights tree under ``root`` and return it."""
    root = Path(root)
    torch.manual_seed(FIXTURE_SEED)
    unet = write_sdxl(root / "sdxl")
    write_identitynet(unet, root / "instantid" / "ControlNetModel")
    write_ip_adapter(unet, root / "instantid" / "ip-adapter.bin")
    (root / "antelopev2").mkdir(parents=True, exist_ok=True)
    write_detector(root / "antelopev2" / "scrfd_10g_bnkps.onnx")
    write_recognizer(root / "antelopev2" / "glintr100.onnx")
    for name in EXTRA_CONTROLNETS:  # the reference's multi-ControlNet set, same topology as IdentityNet
        write_identitynet(unet, root / "controlnets" / name, dtype=torch.float16)  # as published: fp16
    write_depth_annotator(root / "annotators" / "depth")
    write_openpose_annotator(root / "annotators" / "openpose" / "body_pose_model.pth")
    write_safety_checker(root)
    write_eval_models(root)
    return root


EVAL_RECOGNIZER = "arcface_r100.onnx"


def write_eval_models(root: str | Path) -> None:
    """What ``instantid eval`` scores with besides antelopev2: ``eval/face/arcface_r100.onnx``,
    a second recogniser (the glintr100 fixture's topology, another seed: an independent
    model) and ``eval/clip/``, a CLIPModel (ViT layout at tiny widths: 32 px input in 8 px
    patches, 16-wide projection) with its CLIPProcessor (CLIPImageProcessor and a CLIP
    tokenizer built offline from the fixture vocabulary), loadable with ``from_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = Path(root)
    write_recognizer(root / "eval" / "face" / EVAL_RECOGNIZER, seed=FIXTURE_SEED + 1)
    tokenizer = _tokenizer("<|endoftext|>")
    special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
               (("bos_token_id", "<|startoftext|>"), ("eos_token_id", "<|endoftext|>"),
                ("pad_token_id", "<|endoftext|>"))}
    config = CLIPConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": len(tokenizer), "max_position_embeddings": 77, **special},
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):  # the same bytes on every call, whatever ran before
        torch.manual_seed(FIXTURE_SEED + 1)
        model = CLIPModel(config).eval()
    folder = root / "eval" / "clip"
    model.save_pretrained(str(folder))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(folder))


def write_safety_checker(root: Path, threshold: float = 1.01) -> None:
    """``safety_checker/`` + ``feature_extractor/``: diffusers' StableDiffusionSafetyChecker
    (CLIP ViT's layout at tiny widths: 2 layers, 224 px input in 32 px patches) with random
    concept embeddings; every concept's ``threshold`` above any cosine (1.01) flags nothing."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 224, "patch_size": 32},
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):  # the same bytes on every call, whatever ran before
        torch.manual_seed(FIXTURE_SEED)
        checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.linspace(-1, 1, checker.concept_embeds.numel()).reshape(17, -1))
        checker.special_care_embeds.copy_(torch.linspace(1, -1, checker.special_care_embeds.numel()).reshape(3, -1))
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(str(root / "safety_checker"))
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        str(root / "feature_extractor"))


EXTRA_CONTROLNETS = ("pose", "canny", "depth")


def write_depth_annotator(folder: Path) -> None:
    """A tiny DPT depth estimator (the reference's annotator family) in transformers layout."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       image_size=64, patch_size=16, neck_hidden_sizes=[8, 16, 32, 64], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False)
    DPTForDepthEstimation(config).eval().save_pretrained(str(folder))
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(str(folder))


def write_openpose_annotator(path: Path) -> None:
    """OpenPose's body network (VGG front end, six two-branch stages, 38 field and 19 heatmap
    channels, the published kernel sizes and key names) with every hidden width 8, saved as
    the published ``.pth`` state dict."""
    from torch import nn

    from .openpose import _stages

    width, fields, heat = 8, 38, 19
    state = {}
    for block, names in _stages():
        convs = [n for n in names if n != "pool"]
        for k, name in enumerate(convs):
            last = k == len(convs) - 1
            inputs = 3 if name == "conv1_1" else (fields + heat + width if name.startswith("Mconv1_") else width)
            outputs = (fields if block.endswith("L1") else heat) if last and block != "front" else width
            kernel = 7 if name.startswith("Mconv") and int(name[5]) <= 5 else 1 if (
                name.startswith("Mconv") or name.startswith(("conv5_4", "conv5_5"))) else 3
            conv = nn.Conv2d(inputs, outputs, kernel)
            state[f"{name}.weight"], state[f"{name}.bias"] = conv.weight.detach(), conv.bias.detach()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))


# --------------------------------------------------------------------------- SDXL


def _tokenizer(pad_token: str):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges = _learn_merges(_CORPUS, rounds=300)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _learn_merges(words: list[str], rounds: int) -> list[tuple[str, str]]:
    """A few byte-pair merges learned from a small built-in corpus."""
    corpus = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges: list[tuple[str, str]] = []
    for _ in range(rounds):
        pairs: Counter = Counter()
        for word, count in corpus.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged: Counter = Counter()
        for word, count in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged
    return merges


def _text_encoders(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(projection: bool) -> CLIPTextConfig:
        width = TEXT_WIDTH_2 if projection else TEXT_WIDTH
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=TEXT_LAYERS_2 if projection else 2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if projection else "quick_gelu",
            projection_dim=width,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids(tokenizer.pad_token),
        )

    return CLIPTextModel(config(False)).eval(), CLIPTextModelWithProjection(config(True)).eval()


# SDXL's UNet topology (three levels: DownBlock2D then two CrossAttnDownBlock2D, two
# resnets per down block, so nine down residuals; transformer depth rising per level, the
# mid block as deep as the last level) at tiny widths. SDXL: channels 320/640/1280, heads
# 5/10/20 (of 64), transformer depths 1/2/10; here channels 32/64/64, heads of 16.
FIXTURE_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=CROSS_ATTENTION_DIM,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH_2,
    norm_num_groups=32,
)
# SDXL's VAE has four levels (128/256/512/512 channels, two resnets per level).
FIXTURE_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=128,
    scaling_factor=0.13025,
    force_upcast=True,
)


def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**FIXTURE_UNET, **overrides}).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**FIXTURE_VAE).eval()


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _randomise_zeros(module: torch.nn.Module, std: float = 0.02) -> None:
    """Random models should not have the zero-initialised layers of fresh training
    runs (ControlNet's zero convs), or they would have no effect at all."""
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() > 0 and not param.any():
                param.normal_(0.0, std)


def write_sdxl(folder: Path):
    """A tiny SDXL base in diffusers layout; returns its UNet (needed by the others)."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = _tokenizer("<|endoftext|>"), _tokenizer("!")
    text_encoder, text_encoder_2 = _text_encoders(tokenizer)
    unet, vae = _unet(), _vae()
    _randomise_zeros(unet)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        _save_slow_tokenizer_files(tok, folder / name)
    return unet


def _save_slow_tokenizer_files(tokenizer, folder: Path) -> None:
    """Publish tokenizers as SDXL does: vocab.json + merges.txt (no tokenizer.json)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False, sort_keys=True))
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- SDXL as one file

# Where each model lives in an original Stability (SGM) SDXL checkpoint.
SGM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",  # CLIP-L, with Hugging Face names
    "text_encoder_2": "conditioner.embedders.1.model.",  # OpenCLIP-bigG, with open_clip names
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def write_sdxl_single_file(sdxl_folder: Path, out_file: Path) -> Path:
    """Write the SDXL of a diffusers folder (unet, vae, text_encoder, text_encoder_2) as one
    ``.safetensors`` checkpoint in the original Stability (SGM) key layout, as fine-tunes are
    published. Every tensor is written (an unknown one is an error), unchanged but for the
    layout changes of the original format (fused q|k|v, transposed text projection, 1x1
    convolutions in the VAE's attention). Returns ``out_file``."""
    from safetensors.torch import save_file

    folder, out_file = Path(sdxl_folder), Path(out_file)
    converters = {
        "unet": sgm_unet_state,
        "vae": sgm_vae_state,
        "text_encoder": lambda state, _config: sgm_clip_l_state(state),
        "text_encoder_2": sgm_open_clip_state,
    }
    checkpoint: dict[str, torch.Tensor] = {}
    for component, convert in converters.items():
        config = json.loads((folder / component / "config.json").read_text())
        for key, tensor in convert(_read_weights(folder / component), config).items():
            checkpoint[SGM_PREFIXES[component] + key] = tensor.contiguous()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, str(out_file), metadata={"format": "pt"})
    return out_file


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [p for p in sorted(folder.glob("*.safetensors")) if len(p.suffixes) == 1]  # no *.fp16.* variants
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:  # one file, or the shards of one
        state.update(load_file(str(path)))
    return state


def _rename(state: dict[str, torch.Tensor], names: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    """Rename each key by its longest matching prefix in ``names``; every key must match one."""
    by_length = sorted(names, key=lambda pair: len(pair[0]), reverse=True)
    out, unknown = {}, []
    for key, tensor in state.items():
        for old, new in by_length:
            if key.startswith(old):
                out[new + key[len(old):]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{what}: no original name for {len(unknown)} tensors, e.g. {sorted(unknown)[:5]}")
    return out


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def sgm_unet_state(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict with SGM names (``input_blocks``,
    ``middle_block``, ``output_blocks``...), without the ``model.diffusion_model.`` prefix."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("only a UNet with one layers_per_block for all blocks has an original layout")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid block {config['mid_block_type']!r} has no original layout")
    names = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ]

    def resnet(old: str, new: str) -> None:
        names.extend((f"{old}.{a}.", f"{new}.{b}.") for a, b in _UNET_RESNET.items())

    # Each down level is per_block (resnet[, transformer]) entries, then one downsampler
    # entry except on the last level; input_blocks.0 is conv_in.
    down = config["down_block_types"]
    for level, kind in enumerate(down):
        first = 1 + level * (per_block + 1)
        for j in range(per_block):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{first + j}.0")
            if _has_attention(kind):
                names.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{first + j}.1."))
        if level < len(down) - 1:
            names.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{first + per_block}.0.op."))
    # resnet, transformer, resnet
    resnet("mid_block.resnets.0", "middle_block.0")
    names.append(("mid_block.attentions.0.", "middle_block.1."))
    resnet("mid_block.resnets.1", "middle_block.2")
    # Each up level is per_block + 1 entries (resnet[, transformer]); its last entry also
    # holds the upsampler, after the transformer when there is one.
    up = config["up_block_types"]
    for level, kind in enumerate(up):
        first = level * (per_block + 1)
        for j in range(per_block + 1):
            resnet(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{first + j}.0")
            if _has_attention(kind):
                names.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{first + j}.1."))
        if level < len(up) - 1:
            slot = 2 if _has_attention(kind) else 1
            names.append((f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{first + per_block}.{slot}.conv."))
    return _rename(state, names, "unet")


def sgm_vae_state(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict with SGM names (``encoder.down.{i}.block.{j}``,
    ``decoder.up.{i}``, ``mid.attn_1``...), without the ``first_stage_model.`` prefix."""
    per_block = config["layers_per_block"]
    names = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        names += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.")]

    def resnet(old: str, new: str) -> None:
        names.extend((f"{old}.{a}.", f"{new}.{b}.") for a, b in _VAE_RESNET.items())

    levels = len(config["down_block_types"])
    for level in range(levels):
        for j in range(per_block):
            resnet(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}")
        if level < levels - 1:
            names.append((f"encoder.down_blocks.{level}.downsamplers.0.conv.", f"encoder.down.{level}.downsample.conv."))
    levels = len(config["up_block_types"])
    for level in range(levels):
        original = levels - 1 - level  # the original decoder numbers its levels from the full resolution up
        for j in range(per_block + 1):
            resnet(f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{original}.block.{j}")
        if level < levels - 1:
            names.append((f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"decoder.up.{original}.upsample.conv."))
    for part in ("encoder", "decoder"):
        for j in range(2):
            resnet(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}")
        names.extend((f"{part}.mid_block.attentions.0.{a}.", f"{part}.mid.attn_1.{b}.") for a, b in _VAE_ATTENTION.items())
    out = _rename(state, names, "vae")
    for key, tensor in out.items():  # the original attention projections are 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")):
            out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def sgm_clip_l_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP-L text encoder keeps its Hugging Face names, under ``text_model.``."""
    return {
        key if key.startswith("text_model.") else "text_model." + key: tensor
        for key, tensor in state.items()
        if not key.endswith("position_ids")
    }


def sgm_open_clip_state(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPTextModelWithProjection`` state dict with open_clip names
    (``transformer.resblocks.{i}`` with fused ``attn.in_proj``, ``ln_final``,
    ``text_projection`` as ``hidden x projection``)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    for i in range(config["num_hidden_layers"]):
        old, new = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{new}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{old}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for a, b in _OPEN_CLIP_LAYER.items():
                out[f"{new}{b}.{kind}"] = state.pop(f"{old}{a}.{kind}")
    if state:
        raise ValueError(f"text_encoder_2: no original name for {len(state)} tensors, e.g. {sorted(state)[:5]}")
    return out


def write_identitynet(unet, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    _randomise_zeros(controlnet)
    controlnet.to(dtype).save_pretrained(str(folder), safe_serialization=True)


def write_ip_adapter(unet, path: Path) -> None:
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from .adapter import cross_attention_layers, image_proj_to_published

    depth = 4
    resampler = IPAdapterPlusImageProjection(
        embed_dims=512,
        output_dims=CROSS_ATTENTION_DIM,
        hidden_dims=RESAMPLER_WIDTH,
        depth=depth,
        dim_head=64,
        heads=RESAMPLER_WIDTH // 64,
        num_queries=NUM_FACE_TOKENS,
        ffn_ratio=4,
    )
    image_proj = image_proj_to_published(resampler.state_dict(), depth)
    ip_adapter = {}
    for position, _name, attn in cross_attention_layers(unet):
        hidden, cross = attn.to_k.out_features, attn.to_k.in_features
        for kind in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{position}.{kind}.weight"] = torch.randn(hidden, cross) * cross**-0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "image_proj": {k: v.detach().clone().contiguous() for k, v in image_proj.items()},
        "ip_adapter": ip_adapter,
    }
    torch.save(state, str(path))


# --------------------------------------------------------------------------- published sizes

# The SDXL base 1.0 configs (stabilityai/stable-diffusion-xl-base-1.0), as published.
PUBLISHED_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048, "down_block_types": [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
PUBLISHED_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# CLIP ViT-L/14 text tower and OpenCLIP ViT-bigG/14 text tower (with projection)
PUBLISHED_TEXT = {
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
    "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280},
}
CLIP_VOCAB = 49408
PUBLISHED_RESAMPLER = {"embed_dims": 512, "output_dims": 2048, "hidden_dims": 1280, "depth": 4, "dim_head": 64,
                       "heads": 20, "num_queries": 16, "ffn_ratio": 4}


def write_published_size_fixtures(root: str | Path) -> Path:
    """The fixture tree with every model at its published size (SDXL base UNet, VAE and
    both text encoders, InstantID's IdentityNet and ip-adapter), random weights stored
    in fp16 (about 10 GB): for measuring weight loading at real sizes. Tokenizers,
    scheduler and the two face models are the small fixture ones. Never commit it."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = write_fixtures(root)
    sdxl = root / "sdxl"
    generator = torch.Generator().manual_seed(FIXTURE_SEED)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(PUBLISHED_UNET)
        vae = AutoencoderKL.from_config(PUBLISHED_VAE)
        controlnet = ControlNetModel.from_unet(unet)
    for folder, model in ((sdxl / "unet", unet), (sdxl / "vae", vae), (root / "instantid" / "ControlNetModel",
                                                                      controlnet)):
        _replace_weights(folder, "diffusion_pytorch_model.safetensors", model, generator)
        model.save_config(str(folder))
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(str(sdxl / ("tokenizer" if name == "text_encoder" else
                                                              "tokenizer_2")))
        config = CLIPTextConfig(
            vocab_size=CLIP_VOCAB, max_position_embeddings=77, **PUBLISHED_TEXT[name],
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids(tokenizer.pad_token),
        )
        with torch.device("meta"):
            model = cls(config)
        _replace_weights(sdxl / name, "model.safetensors", model, generator)
        config.save_pretrained(str(sdxl / name))
    _write_published_ip_adapter(unet, root / "instantid" / "ip-adapter.bin", generator)
    return root


def _random_state(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """fp16 random tensors for every entry of ``model``'s state dict (which may be on the
    meta device): weights ~ N(0, 1/fan_in), norm scales 1, biases 0."""
    state = {}
    for key, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if key.endswith("bias") or meta.dim() == 0:
            tensor = torch.zeros(shape, dtype=torch.float16)
        elif meta.dim() == 1:  # norm scales
            tensor = torch.ones(shape, dtype=torch.float16)
        else:
            fan_in = int(np.prod(shape[1:]))
            std = 0.02 if "embedding" in key else fan_in**-0.5
            tensor = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).half()
        state[key] = tensor
    return state


def _replace_weights(folder: Path, filename: str, model: torch.nn.Module, generator: torch.Generator) -> None:
    from safetensors.torch import save_file

    for old in folder.glob("*.safetensors"):
        old.unlink()
    for old in folder.glob("*.safetensors.index.json"):
        old.unlink()
    state = _random_state(model, generator)
    save_file(state, str(folder / filename), metadata={"format": "pt"})
    del state


def _write_published_ip_adapter(unet, path: Path, generator: torch.Generator) -> None:
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from .adapter import cross_attention_layers, image_proj_to_published

    with torch.device("meta"):
        resampler = IPAdapterPlusImageProjection(**PUBLISHED_RESAMPLER)
    image_proj = image_proj_to_published(_random_state(resampler, generator), PUBLISHED_RESAMPLER["depth"])
    ip_adapter = {}
    for position, _name, attn in cross_attention_layers(unet):
        hidden, cross = attn.to_k.out_features, attn.to_k.in_features
        for kind in ("to_k_ip", "to_v_ip"):
            weight = torch.empty(hidden, cross).normal_(0.0, cross**-0.5, generator=generator)
            ip_adapter[f"{position}.{kind}.weight"] = weight.half()
    torch.save({"image_proj": {k: v.contiguous() for k, v in image_proj.items()}, "ip_adapter": ip_adapter},
               str(path))


# --------------------------------------------------------------------------- ONNX face models


def write_detector(path: Path) -> None:
    """An ONNX model with SCRFD's signature (9 outputs: scores, boxes, keypoints for
    strides 8/16/32, two anchors per cell) that finds bright blobs."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], []

    def const(name: str, values, dtype=np.float32) -> str:
        inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{op.lower()}_{output}", **attrs))
        return output

    # The input arrives as (pixel - 127.5) / 128; brightness in [0, 1].
    gray = node("ReduceMean", ["input.1", const("channel_axis", [1], np.int64)], "gray", keepdims=1)
    bright = node("Mul", [node("Add", [gray, const("one", [1.0])], "gray1"), const("half", [0.5])], "bright")
    layout = np.asarray(KEYPOINT_LAYOUT, dtype=np.float32).reshape(-1)
    outputs = {"score": [], "bbox": [], "kps": []}
    for s in DETECTOR_STRIDES:
        inner = node("AveragePool", [bright], f"inner{s}", kernel_shape=[4 * s, 4 * s], strides=[s, s],
                     pads=[2 * s, 2 * s, s, s], count_include_pad=1)
        outer = node("AveragePool", [bright], f"outer{s}", kernel_shape=[8 * s, 8 * s], strides=[s, s],
                     pads=[4 * s, 4 * s, 3 * s, 3 * s], count_include_pad=1)
        # mean of the ring = (4 * outer - inner) / 3; contrast = inner - ring
        ring = node("Div", [node("Sub", [node("Mul", [outer, const(f"four{s}", [4.0])], f"o4_{s}"), inner],
                                     f"ring3_{s}"), const(f"three{s}", [3.0])], f"ring{s}")
        contrast = node("Sub", [inner, ring], f"contrast{s}")
        logit = node("Mul", [node("Sub", [contrast, const(f"t{s}", [DETECTOR_CONTRAST])], f"ct{s}"),
                             const(f"gain{s}", [DETECTOR_GAIN])], f"logit{s}")
        score = node("Sigmoid", [logit], f"score_map{s}")
        # box side = 4 * stride * sqrt(inner): the side of a square with the blob's area
        root = node("Sqrt", [node("Max", [inner, const(f"eps{s}", [1e-6])], f"inner_pos{s}")], f"root{s}")
        bbox = node("Mul", [root, const(f"box{s}", np.full((1, 4, 1, 1), 2.0))], f"bbox_map{s}")
        kps = node("Mul", [root, const(f"kps{s}", (4.0 * layout).reshape(1, 10, 1, 1))], f"kps_map{s}")
        for kind, tensor, width in (("score", score, 1), ("bbox", bbox, 4), ("kps", kps, 10)):
            hwc = node("Transpose", [tensor], f"{kind}_hwc{s}", perm=[0, 2, 3, 1])
            one = node("Unsqueeze", [hwc, const(f"{kind}_axis{s}", [3], np.int64)], f"{kind}_a{s}")
            two = node("Concat", [one, one], f"{kind}_anchors{s}", axis=3)  # two anchors per cell
            outputs[kind].append(node("Reshape", [two, const(f"{kind}_shape{s}", [-1, width], np.int64)],
                                      f"{kind}_{s}"))
    graph_outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name}", width])
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10))
        for name in outputs[kind]
    ]
    graph = helper.make_graph(
        nodes,
        "fixture_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        graph_outputs,
        inits,
    )
    _save_onnx(graph, path)


def write_recognizer(path: Path, seed: int = FIXTURE_SEED) -> None:
    """An ONNX model with ArcFace's signature (1x3x112x112 in, one 512-d output): a
    fixed random projection (drawn from ``seed``) of the 8x8-pooled aligned crop."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    projection = (rng.standard_normal((3 * 14 * 14, 512)) * 0.06).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["683"], name="project"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixture_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])],
        [numpy_helper.from_array(projection, "projection")],
    )
    _save_onnx(graph, path)


def _save_onnx(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="instantid-fixtures")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def fixture_summary(root: Path) -> dict:
    """Sizes of what :func:`write_fixtures` wrote (for the CLI)."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    return {"root": str(root), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(fixture_summary(write_fixtures(sys.argv[1]))))
