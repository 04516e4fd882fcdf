"""Recipes: a geno-train config plus a `launch` section (phase, token budget, warmup fraction)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from megatron_geno.config import ConfigError, TrainConfig, load_config, read_yaml_file

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class LaunchSection:
    name: str = ""
    phase: int = 1
    token_budget: Optional[float] = None  # tokens for this phase; sets schedule.train_iters
    warmup_fraction: Optional[float] = None  # of the phase's steps; sets schedule.warmup_iters
    previous: Optional[str] = None  # recipe whose checkpoint this phase starts from (weights only)


def recipe_path(name_or_path: str) -> Path:
    """Returns a recipe file: a path, or a name from launch/recipes (genos-1.2b-8k, ...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = RECIPE_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if bundled.exists():
        return bundled
    known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
    raise ConfigError(f"recipe {name_or_path!r} is neither a file nor one of: {known}")


def load_recipe(name_or_path: str, overrides: list[str]) -> tuple[TrainConfig, LaunchSection, Path]:
    """Returns (config, launch section, recipe file). train_iters and warmup_iters come from the
    token budget and warmup fraction unless given as overrides."""
    path = recipe_path(name_or_path)
    tree = read_yaml_file(path, "recipe") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level")
    raw = tree.get("launch") or {}
    fields = {f.name for f in dataclasses.fields(LaunchSection)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown launch key(s) {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(fields))})")
    launch = LaunchSection(**{"name": path.stem, **raw})
    try:
        launch.token_budget = float(launch.token_budget) if launch.token_budget else None
        launch.warmup_fraction = (None if launch.warmup_fraction is None
                                  else float(launch.warmup_fraction))
    except ValueError:
        raise ConfigError(f"{path}: launch.token_budget and launch.warmup_fraction must be "
                          f"numbers") from None
    if launch.warmup_fraction is not None and not 0 <= launch.warmup_fraction < 1:
        raise ConfigError(f"{path}: launch.warmup_fraction must be in [0, 1), got "
                          f"{launch.warmup_fraction}")
    cfg = load_config(path, list(overrides))
    if launch.token_budget:
        iters = math.ceil(launch.token_budget / (cfg.data.global_batch_size *
                                                        cfg.data.seq_length))
        given = {o.split("=", 1)[0] for o in overrides}
        derived = [] if "schedule.train_iters" in given else [f"schedule.train_iters={iters}"]
        steps = cfg.schedule.train_iters if "schedule.train_iters" in given else iters
        if launch.warmup_fraction is not None and "schedule.warmup_iters" not in given:
            # of the steps that will run: the budget's, or a schedule.train_iters override
            derived.append(f"schedule.warmup_iters={max(1, round(launch.warmup_fraction * steps))}")
        cfg = load_config(path, derived + list(overrides))
    return cfg, launch, path
