"""Property tests (issue 22, item 8): whatever config document and overrides a user writes,
load_config either returns a config whose every field has its declared type, or raises one
ConfigError of one line. Never another exception, never a hang."""

from __future__ import annotations

import dataclasses
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_geno.config import CHOICES, ConfigError, TrainConfig, load_config

SECTIONS = {f.name: [g.name for g in dataclasses.fields(getattr(TrainConfig(), f.name))]
            for f in dataclasses.fields(TrainConfig())
            if dataclasses.is_dataclass(getattr(TrainConfig(), f.name))}
KEYS = [f"{s}.{n}" for s, names in SECTIONS.items() for n in names if (s, n) != ("model", "preset")]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["tiny", "genos-1.2b", "auto", "on", "off", "sdpa", "bf16",
                                     "cosine", "1e-3", "8", "[1, 2]", "{a: 1}", "zarr"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner,
                                                                       max_size=3)),
                      max_leaves=6)


def plausible(key: str):
    """Values near what the field takes: its type, its choices, small numbers, edge numbers."""
    section, name = key.split(".")
    default = getattr(getattr(TrainConfig(), section), name)
    if key in CHOICES:
        return st.sampled_from(list(CHOICES[key]) + [True, False])
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, (int, float)) or default is None:
        return st.one_of(st.integers(-2, 4096), st.floats(-1, 2),
                         st.sampled_from([0, 1, 2, 0.5, 1e-9, 1e30, "1e-4"]))
    if isinstance(default, list):
        return st.lists(st.one_of(st.text(max_size=5), st.floats(-1, 3)), max_size=4)
    return st.text(max_size=8)


def key_and_value():
    return st.sampled_from(KEYS).flatmap(
        lambda key: st.tuples(st.just(key), st.one_of(plausible(key), plausible(key), values)))


def documents():
    """Mostly mappings of known sections and fields with plausible or arbitrary values; some
    that are not mappings or hold unknown keys."""
    return st.one_of(
        st.lists(key_and_value(), max_size=8).map(_nest),
        st.lists(key_and_value(), max_size=8).map(_nest),
        st.lists(key_and_value(), max_size=8).map(_nest),
        values,
        st.dictionaries(st.text(max_size=8), values, max_size=3))


def _nest(entries) -> dict:
    tree: dict = {}
    for key, value in entries:
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


def _override(kv) -> str:
    return f"{kv[0]}={yaml.safe_dump(kv[1], default_flow_style=True).strip().removesuffix('...').strip()}"


overrides = st.lists(st.one_of(key_and_value().map(_override), key_and_value().map(_override),
                               st.text(max_size=20)), max_size=3)


def _matches(value, annotation) -> bool:
    """Whether value has the type a TrainConfig field declares (as the dataclass spells it)."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check(document, extra: list[str], tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        cfg = load_config(path, ["model.preset=tiny", *extra])
    except ConfigError as err:
        assert "\n" not in str(err).strip(), str(err)
        assert str(err).strip(), "an empty error message"
        return
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        holders = [(value, section.name)] if dataclasses.is_dataclass(value) else []
        for holder, name in holders:
            for field in dataclasses.fields(holder):
                got = getattr(holder, field.name)
                assert _matches(got, field.type), (f"{name}.{field.name}", got, field.type)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(document=documents(), extra=overrides)
def test_any_document_and_overrides_load_or_are_one_line(document, extra, tmp_path):
    check(document, extra, tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(launch=st.one_of(values, st.dictionaries(
    st.sampled_from(["phase", "token_budget", "warmup_fraction", "previous", "name", "other"]),
    st.one_of(values, st.floats(-1, 1e12), st.integers(-3, 10**12)), max_size=4)),
    extra=overrides)
def test_any_recipe_launch_section_loads_or_is_one_line(launch, extra, tmp_path):
    from launch.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "launch": launch}))
    try:
        _, section, _ = load_recipe(str(path), extra)
    except ConfigError as err:
        assert "\n" not in str(err).strip() and str(err).strip(), str(err)
        return
    assert isinstance(section.phase, int) and section.phase >= 1
    assert section.token_budget is None or section.token_budget > 0
