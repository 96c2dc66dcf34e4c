"""The config sections' base: frozen, unknown keys refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "Section"]


class ConfigError(ValueError):
    """A user's config mistake (YAML syntax, malformed override): the CLI prints it, no traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
