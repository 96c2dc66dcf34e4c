"""Reward scorers behind one protocol, in a registry, with weighted combination."""

from services.rewards.base import *  # noqa: F403 - the package's public names are base's
from services.rewards.base import __all__  # noqa: F401
