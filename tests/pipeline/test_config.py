"""RunConfig: the one source of defaults, what identifies a run, and the CLI built from it."""

from __future__ import annotations

import dataclasses

import click
import pytest

from pipeline.cli.certify import certify
from pipeline.cli.options import load_preset, option_names
from pipeline.config import RunConfig, differing_fields, option_fields
from workers.errors import UserError


def test_fingerprint_ignores_where_and_how_fast_but_not_what():
    base = RunConfig(out="/a")
    assert base.fingerprint() == RunConfig(out="s3://b/c", workers=4, batch_size=64, device="cpu",
                                           compile=True, progress=False, overwrite=True).fingerprint()
    for change in [dict(n=1001), dict(seed=1), dict(sigmas=[0.25]), dict(data="cifar10:/x"), dict(votes=[1, 2, 4])]:
        assert RunConfig(out="/a", **change).fingerprint() != base.fingerprint(), change


def test_differing_fields_names_only_result_fields():
    a = RunConfig(out="/a").to_dict()
    b = RunConfig(out="/b", workers=3, n=5000, alpha=0.01).to_dict()
    assert differing_fields(a, b) == ["alpha", "n"]
    assert differing_fields(a, a) == []


def test_sequential_only_options_do_not_tell_fixed_runs_apart():
    fixed = RunConfig(out="/a").to_dict()
    assert differing_fields(fixed, RunConfig(out="/a", first_look=50, look_growth=2.0, futility=0.2).to_dict()) == []
    # A fixed folder written before --futility existed resumes.
    older = {k: v for k, v in fixed.items() if k != "futility"}
    assert differing_fields(older, fixed) == []
    seq = RunConfig(out="/a", sampling="sequential", radii=[0.25]).to_dict()
    assert differing_fields(seq, {**seq, "futility": 0.2}) == ["futility"]
    # A sequential folder from before --futility stopped under another rule: not resumed as is.
    assert differing_fields({k: v for k, v in seq.items() if k != "futility"}, seq) == ["futility"]
    assert differing_fields(fixed, seq) == ["radii", "sampling"]


def test_unknown_options_are_named():
    with pytest.raises(UserError, match="unknown config option.*bogus"):
        RunConfig.from_dict({"out": "/a", "bogus": 1})


def test_every_field_is_a_cli_option_with_the_fields_default():
    params = {p.name: p for p in certify.params if isinstance(p, click.Option)}
    for f in option_fields():
        assert f.name in params, f.name
        if f.default is not dataclasses.MISSING and f.default is not None and not isinstance(f.default, bool):
            assert params[f.name].default == f.default, f.name
        if f.default_factory is not dataclasses.MISSING:  # list defaults are shown as comma lists
            assert params[f.name].default == ",".join(map(str, f.default_factory())), f.name


def test_option_spellings_resolve_to_the_field():
    names = option_names(certify)
    assert names["max"] == names["max-images"] == names["max_images"] == "max_images"
    assert names["data"] == "data" and names["model-flags"] == "model_flags"


def test_the_jobs_presets_are_valid_configs():
    for preset in ("digits", "cifar10", "imagenet"):
        values = load_preset(preset, certify)
        assert set(values) <= {f.name for f in option_fields()}, preset
    assert load_preset("digits", certify)["max_images"] == 40
