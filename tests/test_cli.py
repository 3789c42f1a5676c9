"""The command line of every script, run as a user types it: --help lists each settable key of the
script's defaults block with its default and its comment, and what config files and overrides set."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO, run


def documented_defaults(script):
    """{key: (default as written, [its comment lines])} for the keys apply_overrides accepts, read from
    the script with ast (not with configurator's reader): module-level literal assignments of lower-case
    names before the apply_overrides call, each comment continued by indented comment lines."""
    source = (REPO / script).read_text()
    lines, out = source.splitlines(), {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Expr, ast.Assign)) and "apply_overrides(globals()" in ast.unparse(node):
            break
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        key = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if key.startswith("_") or key.isupper() or key in out or not isinstance(
                value, (str, int, float, bool, list, tuple, type(None))):
            continue
        comments = [lines[node.end_lineno - 1][node.end_col_offset:].strip()]
        n = node.end_lineno
        while n < len(lines) and re.match(r"\s+#", lines[n]):
            comments.append(lines[n].strip())
            n += 1
        text = " ".join(line.strip() for line in ast.get_source_segment(source, node.value).splitlines())
        out[key] = text, [c for c in comments if c]
    return out


def check_help(script, out, changed=()):
    """Every documented key appears once as `key = default`, with its comment and continuation lines."""
    defaults = documented_defaults(script)
    assert len(defaults) >= 9, defaults                 # the reader above found the block
    doc = ast.get_docstring(ast.parse((REPO / script).read_text()), clean=False).strip("\n").rstrip()
    assert out.startswith(doc + "\n")                   # the usage lines first, as written
    lines = out.splitlines()
    for key, (text, comments) in defaults.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{key} = {text}")]
        assert len(at) == 1, (key, text, at)
        line = lines[at[0]]
        assert ("(now " in line) == (key in changed), line
        if comments:
            assert line.endswith(comments[0]), (line, comments[0])
            assert [s.strip() for s in lines[at[0] + 1:at[0] + len(comments)]] == comments[1:], key
        if key == list(defaults)[-1]:                   # and nothing after the last one: the script stopped
            assert len(lines) == at[0] + max(len(comments), 1), lines[at[0]:]
    return lines


@pytest.mark.parametrize("script,flag", [("train.py", "--help"), ("sample.py", "-h"), ("prepare_data.py", "--help"),
                                         ("benchmark.py", "--help"), ("evaluate.py", "--help")])
def test_help_lists_every_setting_and_does_no_work(script, flag, tmp_path):
    out_key = {"train.py": "out_dir", "prepare_data.py": "out_dir", "sample.py": "out", "evaluate.py": "out"}.get(script)
    args = [f"--{out_key}={tmp_path / 'x'}"] if out_key else []
    proc = run(script, *args, flag)                     # sample.py needs no --ckpt, train.py no data
    lines = check_help(script, proc.stdout, changed={out_key})
    assert not (tmp_path / "x").exists()                # nothing was written
    if script == "train.py":                            # sections as the file has them, above their keys
        assert lines[lines.index("# I/O") + 1].startswith("data_dir = ")
        assert lines[lines.index("# model (see model.DiTConfig)") + 1].startswith("patch_size = ")
        assert [line for line in lines if line.startswith("lr = ")][0].endswith("# peak learning rate (AdamW)")


def test_help_shows_what_a_recipe_and_the_command_line_set(tmp_path):
    """From another working directory: `python train.py config/mnist.py --lr 1e-3 --t_loc -0.5 --compile --help`
    (`--key value`, a negative number, a bare flag)."""
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "config/mnist.py", "--lr", "1e-3", "--t_loc", "-0.5",
                           "--compile", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    defaults = {k: ast.literal_eval(text) for k, (text, _) in documented_defaults("train.py").items()}
    recipe = {}
    exec((REPO / "config" / "mnist.py").read_text(), recipe)
    changed = {k: v for k, v in recipe.items() if not k.startswith("_") and v != defaults[k]}
    assert len(changed) >= 5, changed
    lines = check_help("train.py", proc.stdout, changed={*changed, "lr", "t_loc", "compile"})
    shown = {line.split(" = ")[0]: line for line in lines if "  (now " in line}
    for key, value in changed.items():
        if key != "lr":
            assert f"  (now {value!r} from config/mnist.py)" in shown[key]
    assert "  (now 0.001 from the command line)" in shown["lr"]
    assert "  (now -0.5 from the command line)" in shown["t_loc"]
    assert shown["compile"].startswith("compile = False  (now True from the command line)")


def test_a_key_without_its_value_is_an_error():
    proc = run("train.py", "--out_dir", "--lr=3", check=False)
    assert proc.returncode != 0
    assert "--out_dir is followed by '--lr=3', which looks like another key; give --out_dir a value" in proc.stderr


@pytest.mark.parametrize("script", ["evaluate.py", "export.py"])
def test_the_sampler_keys_a_script_imports_from_sample_py_are_shown_and_set_as_sample_py_writes_them(script):
    """evaluate.py and export.py import their sampler settings from sample.py (`from sample import steps, ...`):
    --help shows each where the import stands, with sample.py's default and comment (now marked where the command
    line sets it), and the command line checks its type as for any key."""
    from sample import SAMPLER
    sampler = {k: v for k, v in documented_defaults("sample.py").items() if k in SAMPLER}
    assert list(sampler) == list(SAMPLER)
    lines = run(script, "--steps=4", "--help").stdout.splitlines()
    at = [i for key, (text, _) in sampler.items() for i, line in enumerate(lines) if line.startswith(f"{key} = {text}")]
    assert at == list(range(at[0], at[0] + len(SAMPLER))), at          # each once, together, in sample.py's order
    for i, (key, (_, comments)) in zip(at, sampler.items()):
        assert lines[i].endswith(comments[0]) and ("(now 4 from the command line)" in lines[i]) == (key == "steps")
    assert not any(line.startswith("# other settable keys") for line in lines)
    proc = run(script, "--steps=many", check=False)
    assert proc.returncode != 0 and "--steps='many': expected int" in proc.stderr
