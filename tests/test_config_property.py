"""Property test over config files (hypothesis): every YAML shape and value the generator writes either loads or
ends `train_coss.py --print-config` with exit 2 and one line; never a traceback, and never a silent merge (a key
given twice, in one block, as two blocks, or as `section.key` beside a `section:` block, is refused; a file that
loads holds every value it wrote, and what --print-config prints loads again to the same config).

The examples are derandomised (the same ~300 files on every run, no example database written to the repo) and
run in-process through train_coss.main (conftest.run_main), the command's own error handling, so the test costs
seconds."""
import math
import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train_coss
from config import Choice, FloatList, NameList, StrictFloat, StrictInt, load_config, new_config
from conftest import run_main

ENTRIES = new_config().entries
SECTIONS = sorted({k[0] for k in ENTRIES})
KEYS = {s: sorted(k[1] for k in ENTRIES if k[0] == s) for s in SECTIONS}
BASE_TEXT = "optim:\n  lr: 0.25\n  epochs: 3\nmethod:\n  name: byol\n"


def _scalar_text(value):
    """A Python value as YAML flow text (json for strings: valid YAML, and any character survives)."""
    import json
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _fitting_values(param):
    """Values a key's checker is likely to accept, with its edges, so many files get past the types to the
    trainer's own refusals (the combinations check_options rejects)."""
    c, out = param.checker, [param.default]
    if isinstance(c, Choice):
        out += list(c.choices)
    if isinstance(c, (StrictInt, StrictFloat)):
        for edge in (c.min, c.max):
            if edge is not None:
                out += [edge, edge - 1, edge + 1]
    if isinstance(c, FloatList) and param.default is not None:
        out += [",".join(str(v) for v in param.default) if isinstance(param.default, tuple) else param.default]
    if isinstance(c, NameList):
        out += list(c.choices) + [""]
    return [v for v in out if v is not None]


ODD = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=12), st.just("auto"), st.just("1e308"), st.just("-0"),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.sampled_from(["a", "name"]), st.integers(0, 2),
                                                              max_size=2))


@st.composite
def value_text(draw, section, key):
    if (section, key) in ENTRIES and draw(st.integers(0, 9)) < 8:
        value = draw(st.sampled_from(_fitting_values(ENTRIES[(section, key)])))
    else:
        value = draw(ODD)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar_text(v)}" for k, v in value.items()) + "}"
    if value is None:
        return draw(st.sampled_from(["null", "~", ""]))
    return _scalar_text(value)


def _rarely(draw, one_in=8):
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def config_file(draw):
    """(YAML text, its entries as (section, key, value text) in order, duplicated?, whether it has a base,
    whether a line of random text was put in; that line may join a neighbour, so only the one-line promise holds).

    Mostly well-formed files of known keys with plausible values (so many reach the trainer's own refusals of
    combinations), each bent now and then: a block or key given twice, `section.key` beside its block, an unknown
    section or key, a section given a scalar or nothing, a `base:` file, a line of random text."""
    blocks = [[s, [(k, draw(value_text(s, k))) for k in draw(st.lists(st.sampled_from(KEYS[s]), min_size=1,
                                                                        max_size=5, unique=True))]]
              for s in draw(st.lists(st.sampled_from(SECTIONS), max_size=4, unique=True))]
    if blocks and _rarely(draw):  # a key given twice in one block
        section, keys = draw(st.sampled_from(blocks))
        keys.append((keys[0][0], draw(value_text(section, keys[0][0]))))
    if _rarely(draw):  # an unknown key, or an unknown section
        section = draw(st.sampled_from(SECTIONS + ["unknown"]))
        blocks.append([section, [(draw(st.sampled_from(["nope", "Name", "LR", "1", "name.x"])), "1")]])
    lines, written, top = [], [], []
    for section, keys in blocks:
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in keys]
        written += [(section, k, v) for k, v in keys]
        top.append(section)
    if blocks and _rarely(draw):  # the same block twice
        section, keys = draw(st.sampled_from(blocks))
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in keys]
        written += [(section, k, v) for k, v in keys]
        top.append(section)
    if _rarely(draw, 4):  # `section.key: value` at the top level, perhaps beside a block that sets the same key
        section = draw(st.sampled_from(SECTIONS))
        key = draw(st.sampled_from(KEYS[section]))
        text = draw(value_text(section, key))
        lines.append(f"{section}.{key}: {text}")
        written.append((section, key, text))
        top.append(f"{section}.{key}")
    if _rarely(draw, 16):  # a section given a scalar, or nothing
        section = draw(st.sampled_from(SECTIONS))
        lines.append(f"{section}: {draw(st.sampled_from(['{}', '', '3', 'byol']))}")
        top.append(section)
    paths = [(s, k) for s, k, _ in written]
    dup = len(set(top)) != len(top) or len(set(paths)) != len(paths)
    has_base = _rarely(draw, 5)
    if has_base:
        lines.insert(0, "base: base.yaml")
    garbage = _rarely(draw, 12)
    if garbage:  # now and then a line of random text
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=10)))
    return "\n".join(lines) + "\n", written, dup, has_base, garbage


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config_file())
def test_every_config_file_loads_or_is_one_line_and_never_merges_silently(case):
    text, written, dup, has_base, garbage = case
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "base.yaml"), "w") as f:
            f.write(BASE_TEXT)
        path = os.path.join(d, "c.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        res = run_main("train_coss.py", "--config", path, "--print-config")  # an exception fails the test
        code, out, err = res.returncode, res.stdout, res.stderr
        assert code in (0, 2), (code, text, err)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("train_coss.py: error: "), (text, err)
            if dup and not garbage:
                assert "twice" in lines[0], (text, lines[0])
            return
        assert "Traceback" not in err, err
        if garbage:
            return
        assert not dup, f"a key given twice loaded silently:\n{text}"
        cfg = load_config(path)
        expected = {}
        if has_base:
            expected.update({("optim", "lr"): 0.25, ("optim", "epochs"): 3, ("method", "name"): "byol"})
        for section, key, value in written:
            expected[(section, key)] = ENTRIES[(section, key)].checker.check(yaml.safe_load(value))
        for key, value in expected.items():
            assert cfg[key] == value, (key, cfg[key], value, text)
        again = os.path.join(d, "again.yaml")
        with open(again, "w") as f:
            f.write(out)
        reloaded = load_config(again)
        printed = [k for k in ENTRIES if k[0] in train_coss.CONFIG_SECTIONS]  # the sections train_coss reads
        assert {k: reloaded[k] for k in printed} == {k: cfg[k] for k in printed}, out
