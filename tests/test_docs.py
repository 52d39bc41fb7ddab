"""The front page stays a front page and says what the code does: README.md at most 15 KB, its methods table is
the registry's (python train_coss.py --methods), each method's config exists and runs that method, and the files it
points to exist."""
import os
import re

import methods
from config import load_config
from conftest import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def test_readme_is_a_front_page():
    assert len(README.encode()) <= 15_000, f"README.md is {len(README.encode())} bytes; move details to docs/"


def test_the_methods_table_is_the_registrys():
    assert methods.table() in README, "README's methods table differs from `python train_coss.py --methods`"


def test_each_methods_config_runs_that_method():
    for m in methods.REGISTRY.values():
        cfg = load_config(os.path.join(REPO, "configs", m.config))
        assert cfg["method.name"] == m.name, (m.name, m.config)


def test_every_file_the_readme_names_exists():
    named = set(re.findall(r"`((?:docs|configs|methods|tests|bench)/[\w./-]+\.(?:md|yaml|py))`", README))
    assert named, "no file paths found"
    missing = [p for p in sorted(named) if not os.path.isfile(os.path.join(REPO, p))]
    assert not missing, missing
