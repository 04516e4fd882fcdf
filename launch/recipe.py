"""Recipes: a geno-train config plus a `launch` section (phase, token budget, warmup fraction)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from megatron_geno.config import (ConfigError, TrainConfig, build_section, load_config,
                                  read_yaml_file)

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
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: launch is a section; give it as a mapping")
    try:
        launch = build_section(LaunchSection, {"name": path.stem, **raw}, "launch.")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if launch.token_budget is not None and not (math.isfinite(launch.token_budget)
                                                and launch.token_budget > 0):
        raise ConfigError(f"{path}: launch.token_budget must be a positive number of tokens, got "
                          f"{launch.token_budget!r}")
    launch.token_budget = launch.token_budget or None
    if launch.warmup_fraction is not None and not 0 <= launch.warmup_fraction < 1:
        raise ConfigError(f"{path}: launch.warmup_fraction must be in [0, 1), got "
                          f"{launch.warmup_fraction}")
    if launch.phase < 1:
        raise ConfigError(f"{path}: launch.phase must be >= 1, got {launch.phase}")
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
