"""IdentityNet's inputs: its window over the steps, its keypoint condition as a tensor, the
face-region mask, and its residuals scaled per image (and masked) before the UNet adds them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def window_keeps(num_steps: int, start: float, end: float) -> list[bool]:
    """Whether IdentityNet runs at each step (diffusers' rule for control_guidance_start/end)."""
    return [not (i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)]


@dataclass
class ControlInputs:
    """What IdentityNet takes besides the latents (whole CFG batch, or its second half)."""

    face_tokens: torch.Tensor
    condition: torch.Tensor
    added: dict
    scale: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def per_person(cls, face_tokens: torch.Tensor, conditions: list[torch.Tensor], added: dict, scale: torch.Tensor,
                   mask: torch.Tensor | None) -> list["ControlInputs"]:
        """One IdentityNet input per person: their block of face tokens (``face_tokens`` holds
        P blocks), their keypoint image, their region's mask channel."""
        tokens = face_tokens.shape[1] // len(conditions)
        return [cls(face_tokens[:, p * tokens:(p + 1) * tokens], condition, added, scale,
                    mask[:, p:p + 1] if mask is not None else None) for p, condition in enumerate(conditions)]

    def second_half(self) -> "ControlInputs":
        def half(tensor):
            return tensor[tensor.shape[0] // 2 :] if tensor is not None else None

        return ControlInputs(half(self.face_tokens), half(self.condition),
                              {k: half(v) for k, v in self.added.items()}, half(self.scale), half(self.mask))


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def box_mask(box, size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    mask = torch.zeros(1, height, width)
    if box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        mask[:, max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = 1.0
    return mask


def scale_residual(residual: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    residual = residual * scale
    if mask is not None:
        small = torch.nn.functional.interpolate(mask, size=residual.shape[-2:], mode="bilinear", align_corners=False)
        residual = residual * small
    return residual
