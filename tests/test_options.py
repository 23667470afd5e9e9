"""Options in owned sections: the store key they make, the flat syntax on top, a strategy's own config."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from clip_benchmark_diffusion import option_sections
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.options import (
    OPTIONS_ENV,
    PRESETS,
    SECTIONS,
    ScoringOptions,
    env_overrides,
    option_owners,
    parse_option_source,
)
from clip_benchmark_diffusion.scoring import strategy_options
from clip_benchmark_diffusion.scoring.strategies import (
    AnytimeStrategy,
    FullStrategy,
    Strategy,
    TTestStrategy,
    make_strategy,
)
from clip_benchmark_diffusion.scoring.strategy_options import (
    STRATEGY_CONFIGS,
    FullConfig,
    StrategyConfig,
    TTestConfig,
    switch_defaults,
)


def _sha(fingerprint: dict) -> str:
    """sha256 of the fingerprint as the store's run key serialises it (store.run_key)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


# sha256 of each fingerprint as main's single-dataclass ScoringOptions made it, before the sections:
# stored scores are found again only if these bytes stay the same.
KEYS_BEFORE_SECTIONS = {
    "default": "124ed5808efd08d6d3e4c9f7b6bb4899ae75c10fc7d9e63c7137f5cd7c9e0b5a",
    "fast": "04fef3247680a5c80c8fac4b8a58ed8c3947aac2a9f3bdda91ae59ba0e69f530",
    "anytime": "99728573d17eb0d75990d924e3ba777e0804a9d7354a63b49b2fb4a4b514991c",
    "full": "c4e96e6de25a218bcf68751dae14fac66699ee339fdeff40e0648e7d94718e2d",
    "li2023": "f21bbfc56a194330e57ced8be82993d228a1302f1eb15d9bd2dc9c58cfe63da4",
    "hybrid, sample_norm mean": "982036bd0de7f65e62d2f25753a8541410a0a5d281c3b6679ac067a51bf9bf74",
}


@pytest.mark.parametrize("name", sorted(KEYS_BEFORE_SECTIONS))
def test_store_keys_are_the_bytes_they_were_before_the_sections(name):
    base = ScoringOptions()
    if name in PRESETS:
        base = base.replace(**PRESETS[name])
    elif name != "default":
        base = base.replace(shortlist_model="RN50", shortlist_pretrained="openai", sample_norm="mean")
    assert _sha(base.fingerprint_dict()) == KEYS_BEFORE_SECTIONS[name]


def test_the_default_fingerprint_field_by_field():
    assert ScoringOptions().fingerprint_dict() == {
        "strategy": "anytime", "n_samples": [50], "to_keep": [], "min_samples": 4, "max_samples": 100,
        "p_value": 0.002, "alpha": 0.05, "survivors": 1, "guarantee": "full", "tightest_at": 12.0,
        "loss": "l2", "weighting": "uniform", "seed": 0, "dtype": "auto", "template_ensemble": "error_mean",
        "resolution": 0, "max_sequence_length": 0, "guidance": 3.5}


# A valid value other than the default for every option of a section (strategy fields apart).
OTHER_VALUE = {"loss": "l1", "weighting": "elbo", "sample_norm": "mean", "seed": 3, "dtype": "float16",
               "template_ensemble": "embedding_mean", "resolution": 16, "max_sequence_length": 7, "guidance": 2.0,
               "batch_size": 8, "lookahead": 2, "max_classes": 10, "cpu_workers": 2, "shortlist_model": "ViT-B-32",
               "shortlist_pretrained": "laion2b", "shortlist_k": 3, "temperature": 0.01, "temperature_power": 0.7,
               "caption_normalisation": "ratio", "prior_correction": "class_mean", "compile": "on", "channels_last": "on",
               "attention": "classic"}


def test_a_section_that_does_not_affect_scores_never_reaches_the_key_and_one_that_does_always_does():
    assert {attr for attr, cls in SECTIONS.items() if not cls.affects_scores} == {"runtime", "calibration"}
    base = ScoringOptions().replace(strategy="full")                   # prior_correction needs it
    hybrid = base.replace(shortlist_model="RN50", shortlist_pretrained="openai")
    for attr, cls in SECTIONS.items():
        start = hybrid if attr == "shortlist" else base
        for f in dataclasses.fields(cls):
            changed = start.replace(**{f.name: OTHER_VALUE[f.name]})
            assert (changed.fingerprint_dict() != start.fingerprint_dict()) == cls.affects_scores, f.name
    # Pure diffusion: the shortlist section is off and keys nothing, as before shortlists existed.
    assert base.replace(shortlist_k=3).fingerprint_dict() == base.fingerprint_dict()
    assert hybrid.fingerprint_dict() != base.fingerprint_dict()


def test_a_legacy_value_stays_out_of_the_key_as_the_field_declares():
    assert "sample_norm" not in ScoringOptions().fingerprint_dict()
    assert ScoringOptions().replace(sample_norm="mean").fingerprint_dict()["sample_norm"] == "mean"
    expected = ScoringOptions().replace(guarantee="expected")
    assert "guarantee" not in expected.fingerprint_dict() and expected.guarantee == "expected"
    fields = {f.name: f for f in dataclasses.fields(option_sections.ErrorOptions)}
    assert fields["sample_norm"].metadata["legacy"] == "none"


def test_every_option_has_one_owner_and_reads_through_flat():
    options = ScoringOptions().replace(**PRESETS["li2023"], batch_size=8, temperature=0.01)
    owners = option_owners()
    assert list(owners) == list(options.to_dict())
    assert len(owners) == 36 and owners["variance"] == owners["sift_threshold"] == owners["strategy"] == owners["to_keep"] == "strategy_section"
    assert (owners["batch_size"], owners["temperature"], owners["loss"]) == ("runtime", "calibration", "error")
    assert options.runtime.batch_size == options.batch_size == 8
    assert options.strategy_config == strategy_options.StagedConfig(n_samples=(50, 500), to_keep=(5, 1))
    assert ScoringOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.to_dict().items()}) == options
    with pytest.raises(AttributeError):
        options.no_such_option  # noqa: B018
    with pytest.raises(UserError, match="unknown scoring option 'n_sample'; valid: strategy, n_samples"):
        options.replace(n_sample=5)


def test_a_change_of_strategy_resets_only_the_defaults_the_strategies_disagree_on():
    # What STRATEGY_DEFAULTS listed by hand, now read from the config classes.
    assert {name: switch_defaults(name) for name in STRATEGY_CONFIGS} == {
        "full": {}, "staged": {}, "ttest": {"min_samples": 20}, "anytime": {"min_samples": 4}, "sift_refine": {}}
    # Other strategies' values stay in the pool: a preset's samples survive strategy=full from the environment.
    options = env_overrides(parse_option_source("li2023", ScoringOptions()), {OPTIONS_ENV: "strategy=full"})
    assert (options.strategy, options.n_samples, options.max_sample_count) == ("full", (50, 500), 500)


def test_only_the_selected_strategy_validates_its_cross_field_rules():
    # to_keep=() is no staged schedule, but it is no mistake while staged does not run.
    assert ScoringOptions().replace(to_keep=()).strategy == "anytime"
    with pytest.raises(UserError, match="as many to_keep entries"):
        ScoringOptions().replace(strategy="staged")
    # A field check runs whichever strategy is selected (the value is in every key).
    with pytest.raises(UserError, match="p_value=0.0 must lie strictly between 0 and 1"):
        ScoringOptions().replace(p_value=0.0)


def test_a_strategy_registers_its_own_config_and_the_syntax_store_key_and_engine_follow(monkeypatch):
    monkeypatch.setattr(strategy_options, "STRATEGY_CONFIGS", dict(STRATEGY_CONFIGS))
    monkeypatch.setattr(Strategy, "by_name", dict(Strategy.by_name))

    @strategy_options.register_strategy
    @dataclass(frozen=True)
    class FirstKConfig(StrategyConfig):
        name: ClassVar[str] = "first_k"
        # How many samples, all candidates.
        first_k: int = 6

        @property
        def max_sample_count(self) -> int:
            return self.first_k

        def validate(self) -> None:
            if self.first_k < 1:
                raise UserError(f"first_k needs first_k >= 1, got {self.first_k}")

    class FirstKStrategy(FullStrategy):
        Config = FirstKConfig

        @classmethod
        def _build(cls, config, num_candidates):
            return cls(num_candidates, config.first_k)

    options = env_overrides(ScoringOptions(), {OPTIONS_ENV: "strategy=first_k,first_k=9"})
    assert (options.strategy, options.first_k, options.max_sample_count) == ("first_k", 9, 9)
    assert options.fingerprint_dict()["first_k"] == 9 and "alpha" not in options.fingerprint_dict()
    assert "first_k" not in ScoringOptions().fingerprint_dict()          # keyed only where it runs
    assert _sha(ScoringOptions().fingerprint_dict()) == KEYS_BEFORE_SECTIONS["default"]
    assert type(make_strategy(options, 3)) is FirstKStrategy and make_strategy(options, 3).err.shape == (3, 9)
    with pytest.raises(UserError, match="first_k needs first_k >= 1, got 0"):
        options.replace(first_k=0)


def test_a_strategy_is_built_from_its_own_config_only():
    assert isinstance(make_strategy(ScoringOptions().replace(strategy="ttest"), 4), TTestStrategy)
    with pytest.raises(TypeError, match="AnytimeStrategy is built from AnytimeConfig, got TTestConfig"):
        AnytimeStrategy.from_config(TTestConfig(), 4)
    built = FullStrategy.from_config(FullConfig(n_samples=(5,)), 3, sample_norm="mean",
                                     allowed=torch.tensor([True, False, True]))
    assert built.normalize and built.alive.tolist() == [True, False, True] and built.err.shape == (3, 5)


def test_record_keeps_what_is_known():
    # The engine hands a strategy every computed entry each round; an entry it knows is never replaced.
    st = FullStrategy(2, 3)
    first = torch.tensor([[True, False, False], [True, True, False]])
    st.record(first, torch.ones(2, 3))
    st.record(torch.ones(2, 3, dtype=torch.bool), torch.full((2, 3), 5.0))
    assert st.err.tolist() == [[1.0, 5.0, 5.0], [1.0, 1.0, 5.0]] and bool(st.known.all())
