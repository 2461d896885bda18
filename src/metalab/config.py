"""What every method's settings share: a dataclass config copied with changes by name, and named
recipes (the episodic methods' ``MethodConfig``, the model-based RL methods' ``RLConfig`` and
Meta-Q-Learning's ``MQLConfig`` all build on these)."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

from metalab.errors import ConfigError

C = TypeVar("C", bound="Settings")


class Settings:
    """Mixed into a method's config dataclass."""

    def updated(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied; unknown names are a ConfigError."""
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown} for {type(self).__name__}")
        return replace(self, **changes)  # type: ignore[type-var]


def recipe_of(method: type, name: str) -> Any:
    """``method.recipes[name]``: the paper's (or our documented) settings by name, or a
    ConfigError listing the recipes there are."""
    if name not in method.recipes:
        raise ConfigError(
            f"unknown recipe {name!r} for {method.name}: use one of {sorted(method.recipes)}"
        )
    return method.recipes[name]
