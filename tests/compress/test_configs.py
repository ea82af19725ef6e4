"""Typed method configs: both forms of `compress()` build one, unknown options and ill-typed
values are errors naming the valid ones, and the checkpoint records what the config held."""

import copy
import inspect

import pytest

import curkernels as ck
from curkernels.compress import CONFIGS, METHODS
from curkernels.compress.configs import option_from_text


def test_every_method_has_a_config_whose_options_are_its_keywords():
    """The options reach each method function as its typed keyword arguments, no catch-all."""
    assert set(CONFIGS) == set(METHODS)
    for method, (run, _) in METHODS.items():
        parameters = inspect.signature(run).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values()), method
        keywords = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert keywords - {"calib", "rank_multiple"} == set(CONFIGS[method].option_names())


def test_a_misspelled_option_names_the_valid_ones(tiny_bert, batches):
    with pytest.raises(ValueError, match=r"unknown option \['alhpa'\] for method 'svd'"):
        ck.compress(tiny_bert, "svd", 0.5, alhpa=0.7)
    with pytest.raises(ValueError, match=r"\['selction'\].*'selection', 'max_rank'"):
        ck.compress(tiny_bert, "curing", 0.5, batches, selction="qdeim")
    with pytest.raises(ValueError, match=r"\['alhpa'\].*\['alpha'\]"):
        ck.ASVDConfig(alhpa=0.7)
    assert not hasattr(tiny_bert.config, "compression_config")


@pytest.mark.parametrize("config, option", [
    (lambda: ck.CURingConfig(max_rank="abc"), "max_rank"),
    (lambda: ck.CURingConfig(max_rank=0), "max_rank"),
    (lambda: ck.CURingConfig(max_rank=True), "max_rank"),
    (lambda: ck.CURingConfig(selection="random"), "selection"),
    (lambda: ck.CURingConfig(energy=1.5), "energy"),
    (lambda: ck.ASVDConfig(alpha=float("nan")), "alpha"),
    (lambda: ck.SVDLLMConfig(sequential="yes"), "sequential"),
    (lambda: ck.SVDLLMConfig(encoder_target="pooled"), "encoder_target"),
    (lambda: ck.LPAFConfig(sparsity=1.0), "sparsity"),
    (lambda: ck.LPAFConfig(teacher="dense"), "teacher"),
    (lambda: ck.SVDConfig(keep=1.5), "keep"),
    (lambda: ck.SVDConfig(targets=["q_proj", 3]), "targets"),
    (lambda: ck.ROMConfig(preset="50%", keep=0.4), "preset"),
])
def test_option_values_are_type_and_range_checked(config, option):
    with pytest.raises(ValueError, match=option):
        config()


def test_config_form_matches_the_string_form(tiny_bert, batches):
    by_name = copy.deepcopy(tiny_bert)
    a = ck.compress(by_name, "svdllm", 0.4, batches, allocation="global", targets="query")
    config = ck.SVDLLMConfig(keep=0.4, allocation="global", targets="query")
    b = ck.compress(tiny_bert, config, calib=batches)
    assert [m.rank for m in a.modules] == [m.rank for m in b.modules]
    assert by_name.config.compression_config == tiny_bert.config.compression_config
    recorded = tiny_bert.config.compression_config
    assert recorded["options"] == config.options() and recorded["options"]["damping"] == 1e-4
    assert recorded["targets"] == ["query"]


def test_config_form_takes_nothing_beside_the_config(tiny_bert):
    with pytest.raises(ValueError, match=r"\['keep', 'alpha'\] from the config"):
        ck.compress(tiny_bert, ck.SVDConfig(), 0.5, alpha=0.3)


def test_configs_are_frozen_and_normalised():
    config = ck.LPAFConfig(lr=1, layers=[2, 1], targets="q_proj")
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.layers == (2, 1) and config.targets == ("q_proj",)
    with pytest.raises(AttributeError):
        config.lr = 2.0


def test_lpaf_takes_a_teacher_model(tiny_bert):
    teacher = copy.deepcopy(tiny_bert)
    assert ck.LPAFConfig(teacher=teacher, mixed_rank_steps=2).options()["teacher"] is teacher


def test_option_text_is_parsed_by_the_field_type():
    assert option_from_text("curing", "max_rank", "128") == 128
    assert option_from_text("curing", "max_rank", "None") is None
    assert option_from_text("curing", "energy", "0.9") == 0.9
    assert option_from_text("svdllm", "sequential", "true") is True
    assert option_from_text("svdllm", "weighting", "fisher") == "fisher"
    for method, name, text, message in (
            ("curing", "max_rank", "abc", "max_rank must be an integer"),
            ("svdllm", "sequential", "maybe", "sequential must be True or False"),
            ("lpaf", "teacher", "model", "cannot be given on the command line"),
            ("svd", "keep", "0.5", "its own argument"),
            ("svd", "alpha", "0.5", "unknown option"),
            ("qr", "alpha", "0.5", "method must be one of")):
        with pytest.raises(ValueError, match=message):
            option_from_text(method, name, text)


def test_the_configs_are_exported():
    assert ck.SVDLLMConfig is CONFIGS["svdllm"] and ck.CURingConfig is CONFIGS["curing"]
    assert {ck.SVDConfig, ck.ASVDConfig, ck.ROMConfig, ck.LPAFConfig} <= set(CONFIGS.values())
