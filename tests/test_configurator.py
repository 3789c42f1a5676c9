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
