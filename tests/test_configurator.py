"""configurator.apply_overrides: types, strictness, config files, errors that name the key."""
import pytest

from configurator import apply_overrides


def defaults():
    return dict(lr=3e-4, max_steps=100, compile=False, out_dir="out", tags=[1, 2], extra=None, name="x")


def test_overrides_parse_by_type():
    ns = defaults()
    apply_overrides(ns, ["--lr=1", "--max_steps=5", "--compile=true", "--out_dir=runs/lr=1e-3",
                         "--tags=[3, 4]", "--extra=anything"])
    assert ns["lr"] == 1.0 and isinstance(ns["lr"], float)       # an int may become a float
    assert ns["max_steps"] == 5 and ns["compile"] is True
    assert ns["out_dir"] == "runs/lr=1e-3"                         # split on the first '='
    assert ns["tags"] == [3, 4] and ns["extra"] == "anything"


@pytest.mark.parametrize("arg,val", [("--compile=false", False), ("--compile=0", False),
                                     ("--compile", True), ("--compile=yes", True)])
def test_bools(arg, val):
    ns = defaults()
    ns["compile"] = not val
    apply_overrides(ns, [arg])
    assert ns["compile"] is val


@pytest.mark.parametrize("arg,needle", [
    ("--max_step=5", "unknown config key 'max_step' (nearest valid: max_steps"),
    ("--max_steps=1.5", "max_steps=1.5: expected int, got float"),
    ("--max_steps=abc", "--max_steps='abc': expected int"),
    ("--compile=maybe", "--compile='maybe': expected a bool"),
    ("--lr=True", "lr=True: expected float, got bool"),
    ("--tags=5", "tags=5: expected list"),
    ("--max_steps", "--max_steps needs a value"),
    ("--nope", "unknown config key 'nope'"),
])
def test_errors_name_the_key(arg, needle):
    with pytest.raises(SystemExit) as e:
        apply_overrides(defaults(), [arg])
    assert needle in str(e.value)


def test_config_file_then_command_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nlr = 1e-3\nmax_steps = int(math.sqrt(400))\n_private = 3\n")
    ns = defaults()
    apply_overrides(ns, [str(cfg), "--lr=5e-4"])
    assert ns["max_steps"] == 20 and ns["lr"] == 5e-4


def test_config_file_errors(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("learning_rate = 1e-3\n")
    with pytest.raises(SystemExit) as e:
        apply_overrides(defaults(), [str(cfg)])
    assert "unknown config key 'learning_rate'" in str(e.value) and str(cfg) in str(e.value)
    cfg.write_text("compile = 'yes'\n")
    with pytest.raises(SystemExit) as e:
        apply_overrides(defaults(), [str(cfg)])
    assert "compile='yes': expected bool, got str" in str(e.value)
    with pytest.raises(SystemExit) as e:
        apply_overrides(defaults(), [str(tmp_path / "missing.py")])
    assert "config file not found" in str(e.value)


@pytest.mark.parametrize("argv,want", [
    (["--lr", "1", "--max_steps", "5", "--out_dir", "runs/lr=1e-3", "--tags", "[3, 4]", "--extra", "x y"],
     dict(lr=1.0, max_steps=5, out_dir="runs/lr=1e-3", tags=[3, 4], extra="x y")),
    (["--lr", "-0.5", "--max_steps", "-3"], dict(lr=-0.5, max_steps=-3)),     # negative numbers are values
    (["--lr", "-.5"], dict(lr=-0.5)),
    (["--compile", "false"], dict(compile=False)),
    (["--compile", "OFF", "--name", "y"], dict(compile=False, name="y")),
    (["--compile", "--lr", "2"], dict(compile=True, lr=2.0)),                 # a bare flag before another key
    (["--lr=2", "--compile"], dict(compile=True, lr=2.0)),                    # ... or at the end
    (["--out_dir=--odd"], dict(out_dir="--odd")),                             # with '=', any value is taken
])
def test_space_separated_values(argv, want):
    ns = defaults()
    ns["compile"] = not want.get("compile", True)
    keys = apply_overrides(ns, argv)
    assert {k: ns[k] for k in want} == want
    assert keys == set(want)                   # the keys the command line set


def test_bare_flag_leaves_a_config_path_alone(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("max_steps = 7\n")
    ns = defaults()
    apply_overrides(ns, ["--compile", str(cfg), "--lr", "1e-3"])
    assert ns["compile"] is True and ns["max_steps"] == 7 and ns["lr"] == 1e-3


def test_command_line_wins_over_files_wherever_they_stand(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("lr = 1e-3\nmax_steps = 10\nname = 'a'\n")
    b.write_text("max_steps = 20\n")
    ns = defaults()
    apply_overrides(ns, ["--lr", "5e-4", str(a), "--name=cli", str(b)])
    assert ns["lr"] == 5e-4 and ns["name"] == "cli"      # the command line overrides every file
    assert ns["max_steps"] == 20                         # files apply in order


@pytest.mark.parametrize("argv,needle", [
    (["--out_dir", "--lr=3"],
     "--out_dir is followed by '--lr=3', which looks like another key; give --out_dir a value"),
    (["--out_dir", "-x"], "--out_dir is followed by '-x', which looks like another key"),
    (["--max_steps", "--compile"], "--max_steps is followed by '--compile', which looks like another key"),
    (["--lr=1", "--out_dir"], "--out_dir needs a value (--out_dir=... or --out_dir ...)"),
    (["--nope", "3"], "unknown config key 'nope'"),
    (["--max-step", "3"], "unknown config key 'max_step' (nearest valid: max_steps"),
    (["--max_steps", "abc"], "--max_steps='abc': expected int"),
    (["--compile", "maybe"], "config file not found: maybe"),    # not a bool word: a positional argument
])
def test_space_separated_errors(argv, needle):
    with pytest.raises(SystemExit) as e:
        apply_overrides(defaults(), argv)
    assert needle in str(e.value)


def test_upper_case_names_are_constants():
    ns = dict(defaults(), MAX_OPEN=4)
    with pytest.raises(SystemExit) as e:
        apply_overrides(ns, ["--MAX_OPEN=5"])
    assert "unknown config key 'MAX_OPEN'" in str(e.value) and ns["MAX_OPEN"] == 4


SCRIPT = '''"""Do a thing.

    python thing.py --lr 1e-3
"""
import os

HERE = os.path.dirname(__file__)
# ---------------------------------------------------------------------
# I/O
out_dir = "out"     # where results go
# optimizer
lr = 3e-4           # peak learning rate
                    # (continued: per step)
steps = [1,
         2]         # a list over two lines
seed = 0
# ---------------------------------------------------------------------
LIMIT = 3           # a constant, not settable


def main():
    pass
'''

HELP = '''Do a thing.

    python thing.py --lr 1e-3

Settings, with their defaults as thing.py writes them; set them with config files and --key=value
or --key value (a bare --flag sets a bool to true):

# I/O
out_dir = "out"               # where results go

# optimizer
lr = 3e-4  (now 0.001 from the command line)  # peak learning rate
                                              # (continued: per step)
steps = [1, 2]  (now [3] from {cfg})  # a list over two lines
seed = 0

# other settable keys (no default assignment in thing.py)
extra = 'x'
'''


def script_namespace(tmp_path):
    path = tmp_path / "thing.py"
    path.write_text(SCRIPT)
    ns = {"__file__": str(path), "__name__": "__main__", "__doc__": "ignored", "out_dir": "out", "lr": 3e-4,
          "steps": [1, 2], "seed": 0, "HERE": str(tmp_path), "LIMIT": 3, "extra": "x", "main": print}
    return ns


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_reads_the_defaults_block(tmp_path, capsys, flag):
    ns = script_namespace(tmp_path)
    cfg = tmp_path / "c.py"
    cfg.write_text("steps = [3]\nseed = 0\n")                # seed is set to its default: not shown as a change
    with pytest.raises(SystemExit) as e:
        apply_overrides(ns, ["--lr", "1e-3", flag, str(cfg)])  # --help anywhere shows every setting
    assert e.value.code == 0
    assert capsys.readouterr().out == HELP.format(cfg=cfg)


def test_help_after_a_key_that_wants_a_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        apply_overrides(script_namespace(tmp_path), ["--out_dir", "--help"])
    assert e.value.code == 0 and "out_dir = \"out\"  " in capsys.readouterr().out


def test_help_still_reports_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        apply_overrides(script_namespace(tmp_path), ["--lr=abc", "--help"])
    assert "--lr='abc': expected float" in str(e.value)


def test_check_values_names_the_key_the_value_and_what_it_may_be():
    from configurator import check_values
    ns = dict(opt="adamw", lr=3e-4, frac=1.0, steps=1)
    check_values(ns, "x.py", dict(opt=("adamw", "muon")), dict(lr="(0, inf)", frac="(0, 1]", steps="[1, inf)"))
    for key, value, needle in (("opt", "sgd", "x.py: opt='sgd': expected one of 'adamw', 'muon'"),
                               ("lr", 0.0, "x.py: lr=0.0: expected a value in (0, inf)"),
                               ("frac", 1.5, "x.py: frac=1.5: expected a value in (0, 1]"),
                               ("frac", 0, "x.py: frac=0: expected a value in (0, 1]"),
                               ("steps", 0, "x.py: steps=0: expected a value in [1, inf)")):
        with pytest.raises(SystemExit) as e:
            check_values({**ns, key: value}, "x.py", dict(opt=("adamw", "muon")),
                         dict(lr="(0, inf)", frac="(0, 1]", steps="[1, inf)"))
        assert str(e.value) == needle
