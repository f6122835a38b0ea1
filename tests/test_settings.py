"""The config blocks as dataclasses (``branchlens.settings``): one home for each default and
check, the non-artifact marks behind ``NON_ARTIFACT``, presets as data checked against the
classes, the stages' defaults read from them, and the old homes still answering."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import subprocess
import sys

import pytest

from branchlens import settings
from branchlens.config import BLOCKS, ConfigError, fields_of
from branchlens.presets import PRESETS, check_preset
from branchlens.schema import check_block, validate_config
from branchlens.settings import BLOCK_CLASSES, NON_ARTIFACT, block_fields


def test_one_dataclass_per_block_in_block_order():
    assert tuple(BLOCK_CLASSES) == BLOCKS
    assert all(dataclasses.is_dataclass(c) for c in BLOCK_CLASSES.values())
    for block in BLOCKS:
        BLOCK_CLASSES[block]()  # the defaults pass their own checks
        check_block(block, {})


def test_non_artifact_is_read_from_the_field_marks():
    assert {b: set(k) for b, k in NON_ARTIFACT.items()} == {
        "train": {"progress", "plot", "device", "keep_optimizer", "threads"},
        "report": {"cards_per_layer"}}
    from branchlens.config import NON_ARTIFACT as old_home
    from branchlens.pipeline import NON_ARTIFACT as runner
    from branchlens.train.config import NON_ARTIFACT_KEYS

    assert old_home is NON_ARTIFACT and runner is NON_ARTIFACT
    assert NON_ARTIFACT_KEYS == NON_ARTIFACT["train"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    assert check_preset(name) is PRESETS[name]
    cfg = {**PRESETS[name], "preset": name, "source": PRESETS[name]["source"] or "embedded:4"}
    validate_config(cfg)  # with the libraries' checks and the variant's layers


@pytest.mark.parametrize(("change", "words"), [
    ({"train": {"stepz": 3}}, ["unknown setting train.stepz", "valid: batch_size, lr"]),
    ({"trian": {"steps": 3}}, ["preset 'demo'", "unknown key 'trian'"]),
    ({"examples": {"n_top": "12"}}, ["examples.n_top must be int"]),
    ({"analyze": {"q": 2.0}}, ["analyze.q must be in"]),
    ({"visualize": {"n_latents": 0}}, ["visualize.n_latents must be >= 1"]),
    ({"report": {"log": None}}, ["unknown setting report.log; valid: cards_per_layer"]),
])
def test_a_preset_with_an_unknown_key_or_bad_value_fails(change, words):
    bad = copy.deepcopy(PRESETS["demo"])
    for key, values in change.items():
        bad[key] = {**bad.get(key, {}), **values}
    with pytest.raises(ConfigError) as e:
        check_preset("demo", bad)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_valid_keys_are_listed_in_field_order_without_run_owned_ones():
    for block, cls in BLOCK_CLASSES.items():
        names = [f.name for f in dataclasses.fields(cls) if f.name in block_fields(block)]
        assert list(block_fields(block)) == names
        with pytest.raises(ConfigError, match=f"valid: {', '.join(names)}$"):
            check_block(block, {"no_such_key": 1})
    assert "seed" not in block_fields("train") and "device" not in block_fields("visualize")


@pytest.mark.parametrize(("block", "stage"), [
    ("visualize", "branchlens.stages.visualize:visualize_stage"),
    ("examples", "branchlens.stages.examples:examples_stage"),
    ("circuits", "branchlens.stages.circuits:circuits_stage"),
    ("report", "branchlens.stages.report:build_report"),
])
def test_stage_parameters_are_their_blocks_fields(block, stage):
    from branchlens.cli.defaults import resolve

    fn, cls = resolve(stage), BLOCK_CLASSES[block]
    assert list(fields_of(fn)) == list(block_fields(block))  # same keys, same order
    assert fields_of(fn) == block_fields(block)  # and the same types
    params = inspect.signature(fn).parameters
    for f in dataclasses.fields(cls):
        assert params[f.name].default == f.default, f.name


def test_the_libraries_checks_still_refuse_up_front():
    with pytest.raises(ConfigError, match="harvest.sampling must be one of"):
        check_block("harvest", {"sampling": "every"})
    with pytest.raises(ConfigError, match="harvest.dtype must be one of"):
        check_block("harvest", {"dtype": "int8"})
    with pytest.raises(ConfigError, match="harvest: need a non-empty list"):
        check_block("harvest", {"layers": []})
    with pytest.raises(ConfigError, match="^sae: decoder must be"):
        check_block("sae", {"decoder": "both"})
    with pytest.raises(ConfigError, match="^train: lr must be finite"):
        check_block("train", {"lr": -1.0})


def test_old_homes_hand_out_the_same_classes():
    import branchlens.config as config
    from branchlens import pipeline, presets, schema
    from branchlens.analysis.config import AnalysisConfig
    from branchlens.analysis.driver import AnalysisConfig as driver_cfg
    from branchlens.train import TrainConfig
    from branchlens.train.config import TrainConfig as train_cfg

    assert schema.HarvestConfig is config.HarvestConfig is settings.HarvestConfig
    assert schema.SAEOptions is settings.SAEOptions
    assert TrainConfig is train_cfg is settings.TrainConfig
    assert AnalysisConfig is driver_cfg is settings.AnalysisConfig
    assert pipeline.PRESETS is presets.PRESETS and pipeline.PRESET_NOTES is presets.PRESET_NOTES
    assert config.check_block is schema.check_block


def test_the_ground_floor_imports_nothing_heavy():
    code = ("import sys, branchlens.settings, branchlens.presets, branchlens.config\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')\n"
            "         or m.startswith(('branchlens.train', 'branchlens.analysis', "
            "'branchlens.stages', 'branchlens.schema', 'branchlens.pipeline'))]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
