"""Noise schedulers by name, built from the base model's scheduler config."""

from __future__ import annotations

from typing import Literal

from .errors import InvalidParameter

SchedulerName = Literal["euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc", "lcm", "euler_trailing",
                        "ddim_trailing"]
SCHEDULERS: tuple[str, ...] = ("euler", "euler_a", "dpmpp_2m_karras", "ddim", "unipc", "lcm", "euler_trailing",
                               "ddim_trailing")


def make_scheduler(name: str, base_config):
    """A fresh scheduler (schedulers keep per-run state, so one per call) named ``name``."""
    import diffusers

    config = dict(base_config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m_karras":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(config)
    if name == "lcm":
        return diffusers.LCMScheduler.from_config(config)
    # step-distilled LoRAs (SDXL-Lightning, Hyper-SD) are trained on trailing timesteps
    if name == "euler_trailing":
        return diffusers.EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "ddim_trailing":
        return diffusers.DDIMScheduler.from_config(
            config, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
        )
    raise InvalidParameter("scheduler", f"unknown scheduler {name!r}; choose one of {list(SCHEDULERS)}")
