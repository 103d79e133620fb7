from pathlib import Path

import pytest

from partdistill.config import ConfigError, load_config, schema
from tests.conftest import DEMO_CONFIG


def test_demo_config_has_every_stage_section():
    cfg = load_config(DEMO_CONFIG)
    assert set(cfg) == set(schema())
    assert cfg["mining"]["k"] == 4 and cfg["mining"]["metric"] == "cosine"
    assert cfg["ranking"]["k"] == 8
    assert cfg["mining"]["crf"]["bilateral"] == {"sxy": 20, "srgb": 13, "compat": 10}


def _leaf(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "recipe.py"
    f.write_text(f"_base_ = [{str(DEMO_CONFIG)!r}]\n{body}\n")
    return f


def test_unknown_key_names_key_and_file(tmp_path):
    f = _leaf(tmp_path, "mining = dict(kk=6)")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "mining.kk" in msg and "did you mean 'mining.k'" in msg and str(f) in msg


def test_unknown_key_in_nested_section(tmp_path):
    f = _leaf(tmp_path, "mining = dict(crf=dict(bilateral=dict(srbg=13)))")
    with pytest.raises(ConfigError, match=r"mining\.crf\.bilateral\.srbg.*did you mean 'mining\.crf\.bilateral\.srgb'"):
        load_config(f)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'minig'.*did you mean 'mining'"):
        load_config(_leaf(tmp_path, "minig = dict(k=3)"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'mining\.k' should be an int .* got str 'four'"):
        load_config(_leaf(tmp_path, "mining = dict(k='four')"))
    with pytest.raises(ConfigError, match=r"'mining\.crf\.enabled' should be a bool"):
        load_config(DEMO_CONFIG, {"mining.crf.enabled": 1})


def test_float_setting_accepts_int():
    assert load_config(DEMO_CONFIG, ["mining.crf.gt_prob=1"])["mining"]["crf"]["gt_prob"] == 1


def test_command_line_override_and_its_errors():
    cfg = load_config(DEMO_CONFIG, ["mining.k=6", "mining.metric=l2"])
    assert cfg["mining"]["k"] == 6 and cfg["mining"]["metric"] == "l2"
    with pytest.raises(ConfigError, match="mining.kk.*--cfg-options"):
        load_config(DEMO_CONFIG, ["mining.kk=6"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DEMO_CONFIG, ["mining.k"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("mining = dict(k=\n")
    with pytest.raises(ConfigError, match="could not read config"):
        load_config(bad)


def test_command_line_dict_replaces_the_setting():
    cfg = load_config(DEMO_CONFIG, ["features.reduction={'type': 'random_projection', 'dim': 8}"])
    assert cfg["features"]["reduction"] == {"type": "random_projection", "dim": 8}
    with pytest.raises(ConfigError, match="features.reduction.dimm"):
        load_config(DEMO_CONFIG, ["features.reduction={'type': 'random_projection', 'dimm': 8}"])


def test_helper_variables_are_allowed_and_kept_out_of_the_config(tmp_path):
    f = _leaf(tmp_path, "TEACHER = '/models/teacher.pth'\nnorm = dict(type='BN')\nK = 6\n"
                        "teacher = dict(source='checkpoint', checkpoint=TEACHER)\nmining = dict(k=K)")
    cfg = load_config(f)
    assert cfg["teacher"]["checkpoint"] == "/models/teacher.pth" and cfg["mining"]["k"] == 6
    assert set(cfg) == set(schema())  # the helpers enter no section and no version
    # a dict named like a section is a typo, and on the command line every key is a setting
    with pytest.raises(ConfigError, match="unknown key 'minig'"):
        load_config(_leaf(tmp_path, "K = 3\nminig = dict(k=K)"))
    with pytest.raises(ConfigError, match="unknown key 'TEACHER'.*--cfg-options"):
        load_config(f, ["TEACHER=x"])


def test_per_split_coco_files_in_a_recipe(tmp_path):
    """mmengine refuses to merge a dict over a None: the per-split settings default to dict()."""
    f = _leaf(tmp_path, "data = dict(source='coco', coco=dict(instances=dict(train='t.json', val='v.json'), "
                        "parts=dict(val='p.json'), root=dict(train='/a', val='/b')))")
    coco = load_config(f)["data"]["coco"]
    assert coco["instances"] == {"train": "t.json", "val": "v.json"} and coco["root"] == {"train": "/a", "val": "/b"}
    single = load_config(_leaf(tmp_path, "data = dict(source='coco', coco=dict(instances='x.json', root='/r'))"))
    assert single["data"]["coco"]["instances"] == "x.json" and single["data"]["coco"]["parts"] == {}
