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

* Qwen-Image (``QwenImagePipeline.__call__``, ``pipelines/qwenimage/pipeline_qwenimage.py``): FLUX's sigmas and
  ``mu`` (its config's ``max_image_seq_len`` 8192, ``max_shift`` 0.9), then the config's ``shift_terminal``:
  ``set_timesteps`` stretches the shifted sigmas so that the last one is ``shift_terminal``
  (``stretch_shift_to_terminal``: ``1 - (1 - sigma) / ((1 - sigma_last) / (1 - shift_terminal))``).
* FLUX.2 (``Flux2Pipeline`` / ``Flux2KleinPipeline.__call__``, diffusers ``pipelines/flux2``): FLUX's sigmas and
  time shift, but ``mu`` is BFL's empirical fit in the token count *and the step count*
  (:func:`empirical_mu`, black-forest-labs/flux2 ``src/flux2/sampling.py`` ``compute_empirical_mu``), computed
  for each ``num_steps`` (``FlowSchedule.mu_of_steps``); the config's base / max shift are not read.

Both time shifts equal the static shift ``s sigma / (1 + (s - 1) sigma)`` with ``s = e^mu`` (linear:
``s = mu``), which :meth:`FlowSchedule.train_shift` gives to the training-time sigma schemes. The
arithmetic follows diffusers' ``scheduling_flow_match_euler_discrete.py`` (numpy, float32 where it
casts) so that the grids match the stock pipelines' exactly; the configs we cannot reproduce
(Karras / exponential / beta sigmas, inverted sigmas, stochastic sampling) are refused. With a
``shift_terminal`` the grid is no static shift: :meth:`FlowSchedule.train_shift` is then that of the unstretched
shift (the training-time sigma schemes do not stretch).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from normguard_core.conventions import shift_sigma, sigma_grid

__all__ = ["FlowSchedule", "calculate_shift", "empirical_mu"]

_UNSUPPORTED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
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


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's ``mu`` (black-forest-labs/flux2 ``src/flux2/sampling.py``, diffusers ``compute_empirical_mu``): two
    lines in the token count, fitted at 10 and 200 steps, interpolated linearly in the step count; above 4300
    tokens the 200-step line alone."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    at_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = a1 * image_seq_len + b1
    slope = (at_200 - at_10) / 190.0
    return float(slope * num_steps + (at_200 - 200.0 * slope))


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
        shift_terminal: the last non-zero sigma the shifted grid is stretched to (Qwen-Image 0.02), or ``None``.
        mu_of_steps: a dynamic shift that depends on the step count (FLUX.2: ``partial(empirical_mu, tokens)``),
            used instead of ``mu``; None = ``mu`` at every step count.
    """

    base: Literal["scheduler", "flux"] = "scheduler"
    shift: float = 1.0
    mu: float | None = None
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    num_train_timesteps: int = 1000
    shift_terminal: float | None = None
    mu_of_steps: Callable[[int], float] | None = None

    @classmethod
    def from_scheduler_config(
        cls,
        config: Mapping,
        *,
        base: Literal["scheduler", "flux"],
        image_seq_len: int,
        mu_of_steps: Callable[[int], float] | None = None,
    ) -> FlowSchedule:
        """The schedule a pipeline builds from ``config`` (a FlowMatchEulerDiscreteScheduler's; missing keys
        take the scheduler's defaults, as a loaded scheduler's config holds them) for ``image_seq_len`` image
        tokens; ``mu_of_steps``: the pipeline's own step-dependent ``mu`` (used when the config shifts
        dynamically)."""
        bad = [k for k in _UNSUPPORTED if config.get(k)]
        if bad or config.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            raise NotImplementedError(
                f"scheduler config {dict(config)} sets {bad or config.get('_class_name')}: only "
                "FlowMatchEulerDiscreteScheduler with static or dynamic (mu) shifting is reproduced"
            )
        mu, dynamic = None, bool(config.get("use_dynamic_shifting"))
        if dynamic and mu_of_steps is None:
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
            shift_terminal=float(config["shift_terminal"]) if config.get("shift_terminal") else None,
            mu_of_steps=mu_of_steps if dynamic else None,
        )

    def mu_at(self, num_steps: int | None) -> float | None:
        """The dynamic shift at ``num_steps`` steps (``mu_of_steps``, or ``mu``); None = the static shift."""
        if self.mu_of_steps is not None and num_steps is not None:
            return self.mu_of_steps(num_steps)
        return self.mu

    def sigma_grid(self, num_steps: int, shift: float | None = None) -> Tensor:
        """``(T + 1,)`` float32 grid from 1 to a terminal 0 for ``T = num_steps``.

        Args:
            num_steps: Euler steps T >= 1.
            shift: ``None``: the scheduler config's (static or dynamic) shift; a number: that static
                shift on the family's base sigmas, replacing a dynamic one (with a warning).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        mu = self.mu_at(num_steps)
        if shift is not None and mu is not None:
            warnings.warn(
                f"a static shift {shift} replaces this scheduler's resolution-dependent shift (mu = {mu:.4f}, "
                f"i.e. a static {self.train_shift(num_steps=num_steps):.4f}); set rollout.shift: null to sample as "
                "the stock pipeline",
                stacklevel=2,
            )
        static = shift if shift is not None else (self.shift if mu is None else None)
        if self.base == "scheduler" and static is not None:
            if self.shift_terminal is None:
                return sigma_grid(num_steps, shift=static, num_train_timesteps=self.num_train_timesteps)
            # sigma_grid's float64 sigmas, stretched before the float32 cast as set_timesteps does
            lo = shift_sigma(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64), static)
            base = shift_sigma(torch.linspace(1.0, float(lo), num_steps, dtype=torch.float64), static)
            out = torch.from_numpy(self._stretched(base.numpy())).to(torch.float32)
            return torch.cat([out, out.new_zeros(1)])
        if self.base == "flux":  # FluxPipeline's sigmas, cast to float32 as set_timesteps does
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
        else:  # set_timesteps(N) of a dynamic-shifting scheduler: its unshifted training sigmas' range
            sigma_min = float(np.float32(1.0) / np.float32(self.num_train_timesteps))
            t = np.linspace(self.num_train_timesteps, sigma_min * self.num_train_timesteps, num_steps)
            sigmas = t / self.num_train_timesteps
        sigmas = self._stretched(self._shifted(sigmas, static, mu))
        out = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        return torch.cat([out, out.new_zeros(1)])

    def _shifted(self, sigmas: np.ndarray, static: float | None, mu: float | None) -> np.ndarray:
        if static is not None:
            return static * sigmas / (1 + (static - 1) * sigmas)
        assert mu is not None, "sigma_grid passes static=None only for a dynamic (mu) schedule"
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        return mu / (mu + (1 / sigmas - 1) ** 1.0)

    def _stretched(self, sigmas: np.ndarray) -> np.ndarray:
        """``set_timesteps``' ``stretch_shift_to_terminal`` (float32 as there), or ``sigmas`` without one."""
        if self.shift_terminal is None:
            return sigmas
        if len(sigmas) < 2:  # the stretch divides by 1 - sigma_last = 0: the stock scheduler returns NaN
            raise ValueError(f"a grid stretched to shift_terminal={self.shift_terminal} needs >= 2 steps")
        one_minus = 1 - sigmas
        return 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))

    def train_shift(self, shift: float | None = None, *, num_steps: int | None = None) -> float:
        """The static shift equal to this schedule's (for shifted training-sigma schemes): ``shift`` when
        given, else the config's static shift, or ``e^mu`` (exponential) / ``mu`` (linear), ``mu`` at
        ``num_steps`` where it depends on the step count (``mu_of_steps``; None there: refused)."""
        if shift is not None:
            return shift
        if self.mu_of_steps is not None and num_steps is None:
            raise ValueError("this schedule's mu depends on the step count: pass num_steps")
        mu = self.mu_at(num_steps)
        if mu is None:
            return self.shift
        return math.exp(mu) if self.time_shift_type == "exponential" else mu
