from __future__ import annotations

from pathlib import Path

import pytest

from dist_llm_train.config import RunConfig, available_presets, load_config
from dist_llm_train.errors import ConfigError


def test_defaults_are_the_embedded_corpus_and_tiny_model() -> None:
    cfg = load_config()
    assert cfg.data.corpus == "python-stdlib"
    assert cfg.model.preset == "gpt-tiny"
    assert cfg.data.tokenizer == "byte"


def test_yaml_then_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  lr: 0.01\n  max_steps: 7\nmodel:\n  preset: gpt-small\n")
    cfg = load_config(path, ["training.lr=3e-4", "training.lr=5e-4", "aggregation.pre=[nnm, clip]"])
    assert cfg.training.lr == pytest.approx(5e-4)
    assert cfg.training.max_steps == 7
    assert cfg.model.preset == "gpt-small"
    assert cfg.aggregation.pre == ["nnm", "clip"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.lrr=1", "unknown key 'training.lrr'"),
        ("trainin.lr=1", "unknown key 'trainin'"),
        ("training.lr=-1", "training.lr=-1"),
        ("training.lr=fast", "training.lr='fast'"),
        ("model.preset=gpt-huge", "model.preset='gpt-huge'"),
        ("training.min_lr=1", "must not exceed training.lr"),
        ("cluster.speeds=[1, 2]", "cluster.speeds has 2 entries"),
        ("scheduling.min_workers=5", "scheduling.min_workers (5) exceeds cluster.workers (4)"),
        ("scheduling.min_workers=0", "scheduling.min_workers=0"),
        ("data.val_fraction=0.9", "data.val_fraction=0.9"),
    ],
)
def test_bad_values_name_field_value_and_rule(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_rejection_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match="gpt-tiny"):
        load_config(None, ["model.preset=gpt-huge"])


@pytest.mark.parametrize("bad", ["no-equals", "=3", "training.lr=[unclosed"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [bad])


def test_override_into_a_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["training.lr=1e-3", "training.lr.x=1"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(notmap)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config(tmp_path / "absent.yaml")


def test_every_shipped_preset_validates() -> None:
    names = available_presets()
    assert {"stdlib-tiny", "shakespeare-char", "wikitext2-bpe"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), RunConfig)


def test_custom_model_needs_all_shapes() -> None:
    with pytest.raises(ConfigError, match="custom"):
        load_config(None, ["model.preset=custom", "model.n_layer=2"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["model.n_embd=130", "model.n_head=4"])
