"""InstantID's image adapter: the Resampler and decoupled cross-attention.

* The Resampler (perceiver) that maps the 512-d ArcFace embedding to face tokens is
  diffusers' :class:`~diffusers.models.embeddings.IPAdapterPlusImageProjection`; this
  module maps the published ``image_proj`` key names onto it (``to_kv`` is split into
  ``to_k``/``to_v``), inferring every size from the tensors.
* The UNet's cross-attention layers get :class:`IdentityAttnProcessor`:
  ``out = Attn(q, K_text, V_text) + scale * Attn(q, K_face, V_face)`` with
  ``K_face = to_k_ip(face tokens)``, ``V_face = to_v_ip(face tokens)``, where the face
  tokens are the last ``num_tokens`` of ``encoder_hidden_states``. diffusers' own
  IP-Adapter processor takes one scale per adapter; here ``ip_adapter_scale`` may be
  one value per sample of the batch, and an optional face-region mask
  (:class:`FaceRegionMask`, at each level's real token grid) may limit where face
  attention applies. Both use SDPA and keep nothing between calls.
* Fused projections (an opt-in speed setting, :mod:`pipeline.optimize`): when
  ``attn.fused_projections`` is set (diffusers' ``Attention.fuse_projections``), the
  processors take q|k|v (self-attention) or k|v (cross-attention) from one matrix product
  (``attn.to_qkv`` / ``attn.to_kv``); :meth:`IdentityAttnProcessor.fuse` does the same for
  the face k|v (``to_kv_ip``). Same numbers within float tolerance.

The published ``ip_adapter`` keys are ``{i}.to_k_ip.weight`` / ``{i}.to_v_ip.weight``
where ``i`` is the position of a cross-attention processor in ``unet.attn_processors``
order.
"""

from __future__ import annotations

import inspect
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidWeights, WeightsNotFound

RESAMPLER_DIM_HEAD = 64
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")

# published sub-key of a Resampler layer -> diffusers sub-key(s) of IPAdapterPlusImageProjectionBlock
_BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "0.norm1.weight": ("ln0.weight",),
    "0.norm1.bias": ("ln0.bias",),
    "0.norm2.weight": ("ln1.weight",),
    "0.norm2.bias": ("ln1.bias",),
    "0.to_q.weight": ("attn.to_q.weight",),
    "0.to_kv.weight": ("attn.to_k.weight", "attn.to_v.weight"),  # fused k|v along dim 0
    "0.to_out.weight": ("attn.to_out.0.weight",),
    "1.0.weight": ("ff.0.weight",),
    "1.0.bias": ("ff.0.bias",),
    "1.1.weight": ("ff.1.net.0.proj.weight",),
    "1.3.weight": ("ff.1.net.2.weight",),
}
_TOP_KEYS = (
    "latents",
    "proj_in.weight",
    "proj_in.bias",
    "proj_out.weight",
    "proj_out.bias",
    "norm_out.weight",
    "norm_out.bias",
)


class AdapterWeightsError(InvalidWeights):
    """An ip-adapter file whose keys or shapes do not fit the model."""

    code = "invalid_weights"


@dataclass(frozen=True)
class ResamplerConfig:
    embed_dims: int
    hidden_dims: int
    output_dims: int
    depth: int
    heads: int
    num_queries: int
    ffn_ratio: float

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "ResamplerConfig":
        missing = [k for k in _TOP_KEYS if k not in state]
        if missing:
            raise AdapterWeightsError(f"image_proj is missing {missing}")
        depth = 1 + max((int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))), default=-1)
        if depth == 0:
            raise AdapterWeightsError("image_proj has no layers.{i} keys")
        _, num_queries, hidden = state["latents"].shape
        if hidden % RESAMPLER_DIM_HEAD:
            raise AdapterWeightsError(f"image_proj width {hidden} is not a multiple of {RESAMPLER_DIM_HEAD}")
        return cls(
            embed_dims=int(state["proj_in.weight"].shape[1]),
            hidden_dims=int(hidden),
            output_dims=int(state["proj_out.weight"].shape[0]),
            depth=depth,
            heads=int(state["layers.0.0.to_q.weight"].shape[0]) // RESAMPLER_DIM_HEAD,
            num_queries=int(num_queries),
            ffn_ratio=state["layers.0.1.1.weight"].shape[0] / hidden,
        )

    def build(self) -> nn.Module:
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        return IPAdapterPlusImageProjection(
            embed_dims=self.embed_dims,
            output_dims=self.output_dims,
            hidden_dims=self.hidden_dims,
            depth=self.depth,
            dim_head=RESAMPLER_DIM_HEAD,
            heads=self.heads,
            num_queries=self.num_queries,
            ffn_ratio=self.ffn_ratio,
        )


def image_proj_key_map(depth: int) -> dict[str, tuple[str, ...]]:
    """Published ``image_proj`` key -> the diffusers parameter(s) it fills."""
    mapping = {key: (key,) for key in _TOP_KEYS}
    for layer in range(depth):
        for published, ours in _BLOCK_KEYS.items():
            mapping[f"layers.{layer}.{published}"] = tuple(f"layers.{layer}.{k}" for k in ours)
    return mapping


def image_proj_from_published(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published ``image_proj`` state dict to diffusers' names."""
    depth = ResamplerConfig.from_state_dict(state).depth
    mapping = image_proj_key_map(depth)
    unexpected = sorted(set(state) - set(mapping))
    missing = sorted(set(mapping) - set(state))
    if unexpected or missing:
        raise AdapterWeightsError(f"image_proj keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out: dict[str, torch.Tensor] = {}
    for published, targets in mapping.items():
        parts = state[published].chunk(len(targets), dim=0) if len(targets) > 1 else (state[published],)
        out.update(zip(targets, parts))
    return out


def image_proj_to_published(state: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffusers Resampler state dict -> the published names (fused ``to_kv``)."""
    return {
        published: torch.cat([state[t] for t in targets], dim=0) if len(targets) > 1 else state[targets[0]]
        for published, targets in image_proj_key_map(depth).items()
    }


def load_image_proj(state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build the Resampler for a published ``image_proj`` state dict and load it (strict)."""
    config = ResamplerConfig.from_state_dict(state)
    with torch.device("meta"):
        module = config.build()
    converted = image_proj_from_published(state)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, tensor in converted.items():
        if tuple(tensor.shape) != expected[key]:
            raise AdapterWeightsError(f"image_proj {key}: shape {tuple(tensor.shape)}, expected {expected[key]}")
    module.load_state_dict(converted, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _sdpa(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)


def _per_sample(value, batch: int, like: torch.Tensor) -> torch.Tensor | float:
    if value is None:
        return 1.0
    if isinstance(value, (int, float)):
        return float(value)
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype).reshape(-1)
    if value.numel() == 1:
        return value.reshape(1, 1, 1)
    if value.numel() != batch:
        raise ValueError(f"ip_adapter_scale has {value.numel()} values for a batch of {batch}")
    return value.reshape(batch, 1, 1)


def token_grids(unet, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The (rows, cols) of the feature map at each level of ``unet`` for latents of
    ``latent_size`` (rows, cols), following its downsampling layers: SDXL's stride-2
    convolution with padding 1 maps n to ceil(n / 2). The up levels reuse these grids
    (diffusers upsamples to the size of the matching skip connection)."""
    from torch.nn.modules.utils import _pair

    grids = [tuple(int(n) for n in latent_size)]
    for block in unet.down_blocks:
        for down in getattr(block, "downsamplers", None) or []:
            layer = down.conv  # a Conv2d, or an AvgPool2d when the block does not use a convolution
            extra = 1 if getattr(down, "use_conv", False) and down.padding == 0 else 0  # padded right/bottom by one
            kernel, stride, padding = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)
            grids.append(tuple((n + extra + 2 * p - k) // s + 1
                               for n, k, s, p in zip(grids[-1], kernel, stride, padding)))
    return grids


class FaceRegionMask:
    """Face-region masks at each token grid of the UNet: the output-resolution masks
    (B, P, H, W), one channel per person (:mod:`pipeline.people`; P = 1 for one face),
    resized once per grid to (B, rows * cols, P), looked up by sequence length. With P
    people the UNet's token sequence ends with P blocks of face tokens, person by person.

    The grids come from the real feature-map shapes (:func:`token_grids`), never from
    sqrt(area / tokens): with SDXL's three levels that guess is wrong for about one size in
    ten (384x264: 9x12 tokens at the third level, where the guess gives 9x13). diffusers'
    ``IPAdapterMaskProcessor.downsample`` does not fit for the same reason: it guesses the
    grid from the mask's aspect ratio and the token count, then pads or crops the flattened
    mask to the token count, which shifts rows when the guess is off."""

    def __init__(self, mask: torch.Tensor, grids: list[tuple[int, int]]) -> None:
        if mask.dim() != 4 or mask.shape[1] < 1:
            raise ValueError(f"ip_adapter_mask must be (batch, people, height, width), got {tuple(mask.shape)}")
        self.people = int(mask.shape[1])
        self.grids = list(dict.fromkeys(tuple(g) for g in grids))
        self._by_sequence: dict[int, torch.Tensor] = {}
        for rows, cols in self.grids:
            if rows * cols in self._by_sequence:
                raise ValueError(f"ip_adapter_mask: two token grids of {rows * cols} tokens in {self.grids}")
            small = F.interpolate(mask, size=(rows, cols), mode="bilinear", align_corners=False)
            self._by_sequence[rows * cols] = small.flatten(2).transpose(1, 2)

    def for_sequence(self, sequence: int) -> torch.Tensor:
        """(B, sequence, P) for the layer whose feature map has ``sequence`` tokens."""
        try:
            return self._by_sequence[sequence]
        except KeyError:
            raise ValueError(f"ip_adapter_mask: no token grid of {sequence} tokens (grids {self.grids})") from None


class AttnProcessor:
    """Plain SDPA attention that accepts (and ignores) the adapter's per-call kwargs, so
    self-attention layers can share one ``cross_attention_kwargs`` with the adapter layers."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_scale=None,
        ip_adapter_mask: FaceRegionMask | None = None,
    ) -> torch.Tensor:
        return _attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, None)


class IdentityAttnProcessor(nn.Module):
    """Decoupled cross-attention with face tokens (see the module docstring)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, dtype=dtype)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, dtype=dtype)
        self.to_kv_ip: nn.Linear | None = None  # set by fuse(): k|v of the face tokens in one product

    @torch.no_grad()
    def fuse(self) -> None:
        """Make ``to_kv_ip`` (``to_k_ip`` and ``to_v_ip`` stacked) and use it from now on.
        ``to_k_ip``/``to_v_ip`` keep the published weights (as diffusers keeps ``to_q`` etc.)."""
        weight = torch.cat([self.to_k_ip.weight, self.to_v_ip.weight])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        self.to_kv_ip = fused.requires_grad_(False)

    def face_key_value(self, face_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.to_kv_ip is not None:
            return self.to_kv_ip(face_tokens).chunk(2, dim=-1)
        return self.to_k_ip(face_tokens), self.to_v_ip(face_tokens)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_scale=None,
        ip_adapter_mask: FaceRegionMask | None = None,
    ) -> torch.Tensor:
        return _attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, (self, ip_adapter_scale, ip_adapter_mask)
        )


# diffusers' ``Attention.forward`` reads its processor's signature (``inspect.signature``) on
# every call to sort the keyword arguments; a precomputed ``__signature__`` makes that a
# lookup instead of a parse (a noticeable share of a small model's step time).
for _processor in (AttnProcessor, IdentityAttnProcessor):
    _processor.__call__.__signature__ = inspect.signature(_processor.__call__)


def _attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, adapter) -> torch.Tensor:
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]

    face_tokens = None
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif adapter is not None:
        processor, mask = adapter[0], adapter[2]
        people = mask.people if mask is not None else 1  # P blocks of face tokens, one per person
        split = encoder_hidden_states.shape[1] - people * processor.num_tokens
        encoder_hidden_states, face_tokens = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
    if encoder_hidden_states is not hidden_states and attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
    head_dim = query.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)

    out = _sdpa(attn, query, key, value, attention_mask)
    if face_tokens is not None:
        # each person's tokens attended apart, weighted by their own region (one person: the face box)
        processor, scale, mask = adapter
        keys, values = processor.face_key_value(face_tokens)
        weights = mask.for_sequence(query.shape[2]).to(query.dtype) if mask is not None else None
        tokens = processor.num_tokens
        for person in range(face_tokens.shape[1] // tokens):
            part = slice(person * tokens, (person + 1) * tokens)
            face = _sdpa(attn, query, keys[:, part], values[:, part], None)
            face = face * _per_sample(scale, batch, face)
            if weights is not None:
                face = face * weights[..., person : person + 1]
            out = out + face
    out = out.to(query.dtype)

    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _projections(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    """q, k, v: from the fused layers when ``attn.fused_projections`` is set (q|k|v for
    self-attention, q and k|v for cross-attention), else from ``to_q``/``to_k``/``to_v``."""
    if getattr(attn, "fused_projections", False):
        if context is hidden_states and getattr(attn, "to_qkv", None) is not None:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if getattr(attn, "to_kv", None) is not None:
            key, value = attn.to_kv(context).chunk(2, dim=-1)
            return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def cross_attention_layers(unet) -> list[tuple[int, str, nn.Module]]:
    """``(position, processor name, Attention module)`` of every cross-attention layer,
    position counted in ``unet.attn_processors`` order (the published key index)."""
    layers = []
    for position, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            layers.append((position, name, unet.get_submodule(name.removesuffix(".processor"))))
    return layers


def install_adapter_processors(unet, num_tokens: int) -> dict[str, IdentityAttnProcessor]:
    """Give ``unet`` our processors (adapter layers created on the UNet's device and
    dtype, uninitialised). Returns the adapter processors by published index."""
    param = next(unet.parameters())
    processors: dict[str, nn.Module | AttnProcessor] = {}
    adapters: dict[str, IdentityAttnProcessor] = {}
    cross = {name: (position, attn) for position, name, attn in cross_attention_layers(unet)}
    for name in unet.attn_processors:
        if name in cross:
            position, attn = cross[name]
            with torch.device("meta"):  # no random init: load_adapter_layers fills them
                processor = IdentityAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, num_tokens,
                                                  dtype=param.dtype)
            processor.to_empty(device=param.device)
            processors[name] = adapters[str(position)] = processor
        else:
            processors[name] = AttnProcessor()
    unet.set_attn_processor(processors)
    return adapters


def adapter_key_layout(adapters: Mapping[str, IdentityAttnProcessor]) -> dict[str, tuple[int, ...]]:
    """The published ``ip_adapter`` key names and shapes these processors take."""
    layout = {}
    for index, processor in adapters.items():
        layout[f"{index}.to_k_ip.weight"] = tuple(processor.to_k_ip.weight.shape)
        layout[f"{index}.to_v_ip.weight"] = tuple(processor.to_v_ip.weight.shape)
    return layout


def load_adapter_layers(adapters: Mapping[str, IdentityAttnProcessor], state: Mapping[str, torch.Tensor]) -> None:
    """Load published ``ip_adapter`` weights into installed processors (strict)."""
    expected = adapter_key_layout(adapters)
    missing = sorted(set(expected) - set(state), key=_index_order)
    unexpected = sorted(set(state) - set(expected), key=_index_order)
    if missing or unexpected:
        raise AdapterWeightsError(
            f"ip_adapter keys do not fit this UNet ({len(expected) // 2} cross-attention layers): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise AdapterWeightsError(f"ip_adapter {key}: shape {tuple(state[key].shape)}, expected {shape}")
    for index, processor in adapters.items():
        weights = {f"{part}.weight": state[f"{index}.{part}.weight"] for part in ("to_k_ip", "to_v_ip")}
        target = processor.to_k_ip.weight
        # tensors already in the layers' dtype and device are taken as they are (no copy: a
        # mapped file's tensors stay mapped); others are converted into the layers
        same = all(w.dtype == target.dtype and w.device == target.device for w in weights.values())
        processor.load_state_dict(weights, strict=True, assign=target.is_meta or same)
        processor.requires_grad_(False)


def _index_order(key: str) -> tuple[int, str]:
    head = key.split(".", 1)[0]
    return (int(head) if head.isdigit() else -1, key)


def read_adapter_file(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``ip-adapter.bin`` (torch pickle, loaded with ``weights_only=True``) or its
    ``.safetensors`` form (keys prefixed ``image_proj.`` / ``ip_adapter.``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(path.name, str(path.parent))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, tensor in flat.items():
            group, _, rest = key.partition(".")
            if group not in state or not rest:
                raise AdapterWeightsError(f"{path.name}: key {key!r} has no image_proj./ip_adapter. prefix")
            state[group][rest] = tensor
    else:
        try:  # mapped, not read into memory, when the file is in torch.save's zip format (as published)
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:  # unpickling refuses anything but tensors and containers
            raise AdapterWeightsError(f"{path.name}: not a loadable weights file ({error})") from None
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise AdapterWeightsError(f"{path.name}: expected the groups 'image_proj' and 'ip_adapter'")
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}
