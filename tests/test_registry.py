"""Recipes, names, options and third-party plugins through the entry-point group."""
from __future__ import annotations

import json
import textwrap

import pytest

from cli_helpers import console
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import OPTIONS_ENV, PRESETS, ScoringOptions
from clip_benchmark_diffusion.registry import get_recipe, is_diffusion_model, list_models, parse_model_spec


def test_builtin_recipes_and_wildcards():
    assert list_models("*sd2*") == ["diffusion_sd2", "diffusion_sd2_768"]
    assert {"diffusion_sd15", "diffusion_tiny"} <= set(list_models())
    sd2 = get_recipe("diffusion_sd2")
    assert sd2.resolve_weights("laion400m_e32") == "stabilityai/stable-diffusion-2-base"  # clip_benchmark's default
    assert sd2.resolve_weights("sd21-base") == "stabilityai/stable-diffusion-2-1-base"
    assert sd2.resolve_weights("me/my-model") == "me/my-model"
    assert get_recipe("diffusion_sd2_768").prediction_type == "v_prediction"


def test_unknown_name_suggests():
    with pytest.raises(UserError, match=r"did you mean .*diffusion_sd2\b"):
        get_recipe("diffusion_sd")


def test_names_route_to_us():
    assert is_diffusion_model("diffusion_sd2@fast")
    assert is_diffusion_model("diffusion_nonexistent")   # reserved prefix: our error, not open_clip's
    assert not is_diffusion_model("ViT-B-32")


def test_model_spec_presets_files_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    assert parse_model_spec("diffusion_sd2").options == ScoringOptions()
    staged = parse_model_spec("diffusion_sd2@li2023").options
    assert (staged.strategy, staged.n_samples, staged.to_keep, staged.loss) == ("staged", (50, 500), (5, 1), "l1")
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"_comment": "ignored", "scoring": {"loss": "huber", "n_samples": [7]}}))
    spec = parse_model_spec(f"diffusion_sd2@{path}")
    assert (spec.options.loss, spec.options.n_samples, spec.option_source) == ("huber", (7,), str(path))
    monkeypatch.setenv(OPTIONS_ENV, "batch_size=8,dtype=bfloat16")
    spec = parse_model_spec("diffusion_sd2@fast")
    assert (spec.options.batch_size, spec.options.dtype) == (8, "bfloat16")


def test_keyword_options_come_after_the_model_name_and_the_environment(monkeypatch):
    monkeypatch.setenv(OPTIONS_ENV, "batch_size=7,max_samples=30")
    spec = parse_model_spec("diffusion_tiny@fast", {"max_samples": 40})
    assert (spec.options.strategy, spec.options.batch_size, spec.options.max_samples) == ("ttest", 7, 40)
    assert spec.model_options.max_samples == 40 and spec.model_options.batch_size == 200   # not the environment's
    with pytest.raises(UserError, match="ttest needs 1 < min_samples <= max_samples"):   # checked together
        parse_model_spec("diffusion_tiny@fast", {"max_samples": 12})


def test_options_round_trip_and_fingerprint():
    opts = ScoringOptions().replace(**PRESETS["li2023"])
    assert ScoringOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert "batch_size" not in opts.fingerprint_dict()
    assert opts.replace(batch_size=3).fingerprint_dict() == opts.fingerprint_dict()
    with pytest.raises(UserError, match="as many to_keep"):
        ScoringOptions(strategy="staged", n_samples=(5, 10), to_keep=(1,))


def test_third_party_recipe_and_family_through_an_entry_point(tmp_path):
    """A package with one entry point adds a model family and a recipe of it; the allow-list
    variable can leave it out."""
    (tmp_path / "my_recipes.py").write_text(textwrap.dedent('''
        from clip_benchmark_diffusion import hookimpl, Recipe
        from clip_benchmark_diffusion.families.stable_diffusion import StableDiffusionFamily

        class MyFamily(StableDiffusionFamily):
            name = "my_family"
            time = "flow"

        @hookimpl
        def register_families(register):
            register(MyFamily())

        @hookimpl
        def register_models(register):
            register(Recipe(name="diffusion_mine", family="my_family", default_weights="me/mine",
                            scoring={"loss": "l1"}))
    '''))
    dist = tmp_path / "my_recipes-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-recipes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[clip_benchmark_diffusion]\nmine = my_recipes\n")
    env = {"PYTHONPATH": str(tmp_path)}
    listed = console("clip_benchmark_diffusion", "list-models", "*mine", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    [mine] = json.loads(listed.stdout)
    assert mine["default_weights"] == "me/mine" and mine["scoring"]["loss"] == "l1"
    assert mine["family"] == "my_family" and mine["objective"] == "flow"
    plugins = json.loads(console("clip_benchmark_diffusion", "plugins", cwd=tmp_path, env=env).stdout)
    assert "mine" in plugins and "clip_benchmark_diffusion.builtin_recipes" in plugins
    allowed = console("clip_benchmark_diffusion", "list-models", "*mine", cwd=tmp_path,
                      env={**env, "CLIP_BENCHMARK_DIFFUSION_PLUGINS": "someone_else"})
    assert json.loads(allowed.stdout) == []
