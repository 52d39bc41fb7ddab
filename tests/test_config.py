"""The strict config loader shared by write_ffcv.py and train_coss.py."""
import glob
import os
import re

import pytest
import yaml

from config import ConfigError, as_dict, load_config
from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"fmnist.yaml", "in100.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_strictly(path):
    cfg = load_config(path)
    assert cfg["data.name"] and cfg["data.source"]
    text = open(path).read()
    assert text.startswith("#"), "each config starts with a header: purpose, command, expected result"


def test_base_file_is_read_first_and_overridden(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  epochs: 7\n  lr: 0.5\nmodel:\n  backbone: resnet50\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\noptim:\n  lr: 0.2\n")
    cfg = load_config(str(tmp_path / "sub" / "b.yaml"))
    assert (cfg["optim.epochs"], cfg["optim.lr"], cfg["model.backbone"]) == (7, 0.2, "resnet50")
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "d.yaml"))


@pytest.mark.parametrize("name", ["in100_r50", "in100_byol", "in100_simclr", "in100_co_simclr", "in100_logo",
                                  "in100_multicrop", "in100_moco_v3", "in100_co_moco_v3",
                                  "in100_dino", "in100_co_dino", "in100_moco_v2"])
def test_imagenet100_variants_hold_only_what_they_change(name):
    """Each variant is `base: in100.yaml` plus its own keys; resolved, it differs from in100.yaml in those alone."""
    path = os.path.join(REPO, "configs", f"{name}.yaml")
    tree = yaml.safe_load(open(path))
    assert tree.pop("base") == "in100.yaml"
    own = {(section, key) for section, keys in tree.items() for key in keys}
    variant, main = as_dict(load_config(path)), as_dict(load_config(os.path.join(REPO, "configs", "in100.yaml")))
    differ = {(s, k) for s in main for k in main[s] if main[s][k] != variant[s][k]}
    assert differ and differ <= own


def test_embedded_default_config_equals_builtin_defaults():
    assert as_dict(load_config(os.path.join(REPO, "configs", "fmnist.yaml"))) == as_dict(load_config(None))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_unknown_yaml_key_fails_naming_it(tmp_path, path):
    tree = yaml.safe_load(open(path))
    tree.setdefault("writer", {})["jpeg_qualty"] = 80  # a typo
    if "base" in tree:  # keep the base reachable from the copy
        tree["base"] = os.path.join(os.path.dirname(path), tree["base"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match="unknown config file key 'writer.jpeg_qualty'"):
        load_config(bad)


def test_unknown_section_and_cli_key_fail(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dta:\n  name: x\n")
    with pytest.raises(ConfigError, match="'dta.name'.*known sections: analysis, augment, co, data, dino, eval, linear, logo, method, moco, model, optim, robust, training, writer"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown command line key 'data.nam'"):
        load_config(None, ["--data.nam=x"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        load_config(None, ["--verbose"])


@pytest.mark.parametrize("text,value", [("False", False), ("false", False), ("0", False), ("no", False),
                                        ("True", True), ("1", True), ("yes", True)])
def test_booleans_parse_safely_from_cli(text, value):
    assert load_config(None, [f"--writer.overwrite={text}"])["writer.overwrite"] is value


@pytest.mark.parametrize("yaml_value,value", [("false", False), ("False", False), ("0", False), ("true", True),
                                              ("1", True)])
def test_booleans_parse_safely_from_yaml(tmp_path, yaml_value, value):
    f = tmp_path / "c.yaml"
    f.write_text(f"writer:\n  overwrite: {yaml_value}\n")
    assert load_config(f)["writer.overwrite"] is value


@pytest.mark.parametrize("key,bad", [("writer.overwrite", "2"), ("writer.overwrite", "maybe"),
                                     ("writer.workers", "0.5"), ("writer.workers", "2.0"),
                                     ("writer.workers", "two"), ("writer.workers", "0"),
                                     ("writer.compress_probability", "abc"),
                                     ("writer.compress_probability", "1.5"),
                                     ("writer.compress_probability", "nan"),
                                     ("writer.write_mode", "png"), ("data.source", "cifar")])
def test_bad_values_fail_naming_key(key, bad):
    with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
        load_config(None, [f"--{key}={bad}"])


def test_yaml_types_are_not_coerced_silently(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("writer:\n  workers: 0.5\n")
    with pytest.raises(ConfigError, match="writer.workers"):
        load_config(f)
    f.write_text("writer:\n  workers: true\n")
    with pytest.raises(ConfigError, match="writer.workers"):
        load_config(f)
    f.write_text("writer:\n  compress_probability: 1\n")
    assert load_config(f)["writer.compress_probability"] == 1.0  # an int is a fine float
    assert load_config(None, ["--writer.compress_probability=0.25"])["writer.compress_probability"] == 0.25


def test_cli_overrides_yaml_and_accepts_both_forms(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("writer:\n  workers: 3\n  jpeg_quality: 70\n")
    cfg = load_config(f, ["--writer.workers=5", "--writer.jpeg_quality", "80"])
    assert (cfg["writer.workers"], cfg["writer.jpeg_quality"]) == (5, 80)


@pytest.mark.parametrize("text,match", [("- a\n- b\n", "must hold sections"), ("writer: [1\n", "not valid YAML"),
                                        ("writer:\n  workers:\n", "has no value")])
def test_malformed_files_fail(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_missing_file_fails():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_page_size_must_be_power_of_two(tmp_path):
    from write_ffcv import write_split
    cfg = load_config(None, ["--data.source=synthetic", f"--data.beton_dir={tmp_path}", "--writer.page_size_mib=3"])
    with pytest.raises(ConfigError, match="power of 2"):
        write_split(cfg, "train", log=lambda *_: None)


@pytest.mark.parametrize("content,key,lines", [
    ("method:\n  name: dino\noptim:\n  lr: 0.1\nmethod:\n  w_s: 0.3\n", "method", "lines 1 and 5"),
    ("optim:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "lr", "lines 2 and 4"),
])
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, content, key, lines):
    """yaml keeps the last of two equal keys silently (a second `method:` block dropped `name: dino` and the run
    trained co_byol): refused, with the key and both lines."""
    path = tmp_path / "twice.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"'{key}' appears twice in one block \\({lines}\\)"):
        load_config(str(path))


@pytest.mark.parametrize("content", ["method.name: dino\nmethod:\n  name: byol\n",
                                     "method:\n  name: byol\nmethod.name: dino\n"])
def test_a_key_given_as_section_dot_key_beside_its_block_is_refused(tmp_path, content):
    """`method.name:` and a `method:` block that also sets name used to merge silently, the later one kept (found
    by the property test)."""
    path = tmp_path / "twice.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match="'method.name' is given twice"):
        load_config(str(path))
    path.write_text("co.w_s: 0.3\nmethod:\n  name: byol\n")  # two different keys of one section: fine
    cfg = load_config(str(path))
    assert cfg["co.w_s"] == 0.3 and cfg["method.name"] == "byol"


def test_an_unknown_backbone_is_a_bad_value_naming_the_presets():
    """It used to pass the config and end in rf_resnet's ValueError traceback (found by the property test)."""
    with pytest.raises(ConfigError, match="bad value for 'model.backbone': 'resnet19' .*resnet18/.*bagnet33"):
        load_config(None, ["--model.backbone=resnet19"])


@pytest.mark.parametrize("old,new", sorted(__import__("config").RENAMED.items()))
def test_each_key_that_moved_to_its_methods_section_is_refused_naming_the_new_one(tmp_path, old, new):
    """0.8.0 moved the method-specific keys into the sections the methods declare (co.*, logo.*, moco.*, dino.*)."""
    with pytest.raises(ConfigError, match=f"key '{re.escape(old)}' is now '{re.escape(new)}' \\(renamed in version "
                                          f"0.8.0\\)"):
        load_config(None, [f"--{old}=1"])
    section, key = old.split(".", 1)
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=f"is now '{re.escape(new)}'"):
        load_config(str(path))


def test_an_old_checkpoints_config_reads_with_the_new_names():
    from config import upgrade
    old = {"method": {"name": "co_dino", "w_s": 0.3, "logo": False, "dino_out_dim": 64, "queue_size": 99},
           "optim": {"lr": 0.1}}
    new = upgrade(old)
    assert new["method"] == {"name": "co_dino"} and new["co"] == {"w_s": 0.3} and new["logo"] == {"enabled": False}
    assert new["dino"] == {"out_dim": 64} and new["moco"] == {"queue_size": 99} and new["optim"] == {"lr": 0.1}
    assert old["method"]["w_s"] == 0.3  # the stored dict is left as it was


def test_a_renamed_key_is_refused_naming_its_new_name(tmp_path, monkeypatch):
    import config
    monkeypatch.setitem(config.RENAMED, "method.dino_teacher_t", "dino.teacher_temp")
    monkeypatch.setitem(config.RENAMED_IN, "method.dino_teacher_t", "0.7.0")
    (tmp_path / "old.yaml").write_text("method:\n  dino_teacher_t: 0.05\n")
    with pytest.raises(ConfigError, match="'method.dino_teacher_t' is now 'dino.teacher_temp' \\(renamed in "
                                          "version 0.7.0\\)"):
        load_config(str(tmp_path / "old.yaml"))
    with pytest.raises(ConfigError, match="command line key 'method.dino_teacher_t' is now"):
        load_config(None, ["--method.dino_teacher_t=0.05"])
