"""Request LoRAs: loaded once per file, switched on (with their scale) or off between renders.

A LoRA lives on the unfused attention projections, so with ``fuse_qkv`` the fused ones are
switched off while a LoRA is on (and on again after); with ``compile`` as well, the fused
projections are compiled in and stay on, so LoRAs are refused."""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidParameter
from .optimize import RenderSettings, set_fused_projections


class LoraSwitch:
    def __init__(self, sdxl, settings: RenderSettings) -> None:
        self.sdxl, self.settings = sdxl, settings
        self.loaded: dict[str, str] = {}  # file -> adapter name
        self.fused = settings.fused_projections  # whether the fused projections are in use now

    def check(self, lora: str | None) -> None:
        """Refuse a request LoRA this pipeline cannot use (see the module docstring)."""
        if lora is not None and not self.settings.lora_allowed:
            raise InvalidParameter("lora", "this pipeline was loaded with compile and fuse_qkv: its fused projections "
                                           "are compiled in, and a LoRA needs the unfused ones (load without "
                                           "fuse_qkv to serve LoRAs)")

    def activate(self, lora: str | None, scale: float) -> None:
        """``lora`` on at ``scale`` (loaded on first use), or every LoRA off (None)."""
        self.check(lora)
        if self.settings.fused_projections and not self.settings.compiled:
            fused = lora is None  # a LoRA lives on the unfused projections
            if fused != self.fused:
                set_fused_projections(self.sdxl.unet, self.sdxl.controlnet, on=fused)
                self.fused = fused
        if lora is None:
            if self.loaded:
                self.sdxl.disable_lora()
            return
        if lora not in self.loaded:
            path = Path(lora)
            if not path.exists():
                raise InvalidParameter("lora", f"no LoRA file at {lora}")
            name = f"lora{len(self.loaded)}"
            try:
                self.sdxl.load_lora_weights(str(path), adapter_name=name)
            except Exception as error:  # diffusers/peft raise many kinds for a bad file
                raise InvalidParameter("lora", f"cannot load {path.name}: {error}") from None
            self.loaded[lora] = name
        self.sdxl.enable_lora()
        self.sdxl.set_adapters([self.loaded[lora]], adapter_weights=[scale])
