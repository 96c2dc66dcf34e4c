"""Each model family's sampling grid, built from its diffusers scheduler config as its pipeline builds it.

* SD3 / SD3.5 (``StableDiffusion3Pipeline.__call__`` -> ``retrieve_timesteps(scheduler, N)``): the
  grid of ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)`` at the config's static ``shift``
  (``normguard_core.conventions.sigma_grid``, bit for bit). The embedded digits model uses the same
  grid at shift 1.
* FLUX (``FluxPipeline.__call__``, diffusers ``pipelines/flux/pipeline_flux.py``): the pipeline passes
  ``sigmas = linspace(1, 1/N, N)`` and ``mu = calculate_shift(image_seq_len, ...)`` (linear in the
  packed image token count between ``base_image_seq_len`` / ``base_shift`` and ``max_image_seq_len`` /
  ``max_shift``); ``set_timesteps`` then applies ``time_shift(mu, 1, sigma)`` when the config sets
  ``use_dynamic_shifting`` (``time_shift_type`` exponential: ``e^mu / (e^mu + 1/sigma - 1)``, linear:
  ``mu / (mu + 1/sigma - 1)``), otherwise the static shift.

Both time shifts equal the static shift ``s sigma / (1 + (s - 1) sigma)`` with ``s = e^mu`` (linear:
``s = mu``), which :meth:`FlowSchedule.train_shift` gives to the training-time sigma schemes. The
arithmetic follows diffusers' ``scheduling_flow_match_euler_discrete.py`` (numpy, float32 where it
casts) so that the grids match the stock pipelines' exactly; the configs we cannot reproduce
(Karras / exponential / beta sigmas, ``shift_terminal``, inverted sigmas, stochastic sampling) are refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from normguard_core.conventions import sigma_grid

__all__ = ["FlowSchedule", "calculate_shift"]

_UNSUPPORTED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "shift_terminal",
    "invert_sigmas",
    "stochastic_sampling",
)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent ``mu``: linear in the image token count (diffusers ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


@dataclass(frozen=True)
class FlowSchedule:
    """A family's sampling grid (see the module docstring).

    Attributes:
        base: ``"scheduler"``: the sigmas ``set_timesteps(N)`` makes itself (SD3, digits); ``"flux"``:
            ``linspace(1, 1/N, N)`` as FluxPipeline passes them.
        shift: the config's static shift (used when ``mu`` is ``None``).
        mu: the dynamic shift for this generator's image size (``use_dynamic_shifting``), or ``None``.
        time_shift_type: ``"exponential"`` or ``"linear"`` (how ``mu`` shifts).
        num_train_timesteps: the scheduler's training discretisation.
    """

    base: Literal["scheduler", "flux"] = "scheduler"
    shift: float = 1.0
    mu: float | None = None
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler_config(
        cls, config: Mapping, *, base: Literal["scheduler", "flux"], image_seq_len: int
    ) -> FlowSchedule:
        """The schedule a pipeline builds from ``config`` (a FlowMatchEulerDiscreteScheduler's; missing keys
        take the scheduler's defaults, as a loaded scheduler's config holds them) for ``image_seq_len`` image
        tokens."""
        bad = [k for k in _UNSUPPORTED if config.get(k)]
        if bad or config.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            raise NotImplementedError(
                f"scheduler config {dict(config)} sets {bad or config.get('_class_name')}: only "
                "FlowMatchEulerDiscreteScheduler with static or dynamic (mu) shifting is reproduced"
            )
        mu = None
        if config.get("use_dynamic_shifting"):
            mu = calculate_shift(
                image_seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        return cls(
            base=base,
            shift=float(config.get("shift", 1.0)),
            mu=mu,
            time_shift_type=config.get("time_shift_type", "exponential"),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )

    def sigma_grid(self, num_steps: int, shift: float | None = None) -> Tensor:
        """``(T + 1,)`` float32 grid from 1 to a terminal 0 for ``T = num_steps``.

        Args:
            num_steps: Euler steps T >= 1.
            shift: ``None``: the scheduler config's (static or dynamic) shift; a number: that static
                shift on the family's base sigmas, replacing a dynamic one (with a warning).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if shift is not None and self.mu is not None:
            warnings.warn(
                f"a static shift {shift} replaces this scheduler's resolution-dependent shift (mu = {self.mu:.4f}, "
                f"i.e. a static {self.train_shift():.4f}); set rollout.shift: null to sample as the stock pipeline",
                stacklevel=2,
            )
        static = shift if shift is not None else (self.shift if self.mu is None else None)
        if self.base == "scheduler" and static is not None:
            return sigma_grid(num_steps, shift=static, num_train_timesteps=self.num_train_timesteps)
        if self.base == "flux":  # FluxPipeline's sigmas, cast to float32 as set_timesteps does
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
        else:  # set_timesteps(N) of a dynamic-shifting scheduler: its unshifted training sigmas' range
            sigma_min = float(np.float32(1.0) / np.float32(self.num_train_timesteps))
            t = np.linspace(self.num_train_timesteps, sigma_min * self.num_train_timesteps, num_steps)
            sigmas = t / self.num_train_timesteps
        sigmas = self._shifted(sigmas, static)
        out = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        return torch.cat([out, out.new_zeros(1)])

    def _shifted(self, sigmas: np.ndarray, static: float | None) -> np.ndarray:
        if static is not None:
            return static * sigmas / (1 + (static - 1) * sigmas)
        assert self.mu is not None, "sigma_grid passes static=None only for a dynamic (mu) schedule"
        if self.time_shift_type == "exponential":
            return math.exp(self.mu) / (math.exp(self.mu) + (1 / sigmas - 1) ** 1.0)
        return self.mu / (self.mu + (1 / sigmas - 1) ** 1.0)

    def train_shift(self, shift: float | None = None) -> float:
        """The static shift equal to this schedule's (for shifted training-sigma schemes): ``shift`` when
        given, else the config's static shift, or ``e^mu`` (exponential) / ``mu`` (linear)."""
        if shift is not None:
            return shift
        if self.mu is None:
            return self.shift
        return math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu
