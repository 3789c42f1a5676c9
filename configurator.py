"""Override a script's module-level defaults from config files and --key=value arguments.

    python train.py config/small.py --lr=3e-4 --out_dir=runs/lr=3e-4 --compile=false

Positional arguments are Python files of plain assignments, executed in order; `--key=value` then
overrides single keys (split on the first '='), and a bare `--flag` sets a bool to True. Strict: an
unknown key or a value of the wrong type is an error naming the key, never silently ignored.
"""
import ast
import difflib
import os
import sys


def _nearest(key, known):
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (nearest valid: {', '.join(near)})" if near else ""


def _coerce(key, value, default, from_text):
    """Return `value` converted to the type of `default`, or raise ValueError naming the key.

    Command-line values arrive as text and are parsed; config-file values are Python objects.
    """
    want = type(default)
    if from_text and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool):
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"--{key}={value!r}: expected a bool (true/false)")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if default is None:          # a None default takes any string
                return value
            raise ValueError(f"--{key}={value!r}: expected {want.__name__}, got an unparsable value") from None
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return want(value)
    elif isinstance(value, want) and not (isinstance(value, bool) and want is int):
        return value
    raise ValueError(f"{key}={value!r}: expected {want.__name__}, got {type(value).__name__}")


def apply_overrides(namespace, argv):
    """Apply config files and --key=value overrides from `argv` to the dict `namespace` in place.

    Only keys already present in `namespace` (plain values: str, int, float, bool, None, list, tuple)
    can be set. Raises SystemExit with a message naming the offending key or file.
    """
    known = {k: v for k, v in namespace.items()
             if not k.startswith("_") and isinstance(v, (str, int, float, bool, list, tuple, type(None)))}

    def assign(key, value, where):
        if key not in known:
            raise SystemExit(f"{where}: unknown config key '{key}'{_nearest(key, list(known))}")
        try:
            namespace[key] = _coerce(key, value, known[key], from_text=where == "command line")
        except ValueError as e:
            raise SystemExit(f"{where}: {e}") from None

    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:                   # bare --flag means True, for bool keys only
                if not isinstance(known.get(key), bool):
                    if key not in known:
                        raise SystemExit(f"command line: unknown config key '{key}'{_nearest(key, list(known))}")
                    raise SystemExit(f"command line: --{key} needs a value (--{key}=...)")
                value = "true"
            assign(key, value, "command line")
        else:
            path = arg if os.path.isabs(arg) else os.path.abspath(arg)
            if not os.path.isfile(path):
                # config paths also resolve relative to the script's folder, whatever the cwd
                here = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), arg)
                if not os.path.isfile(here):
                    raise SystemExit(f"config file not found: {arg}")
                path = here
            scope = {}
            with open(path) as f:
                code = compile(f.read(), path, "exec")
            exec(code, scope)
            for key, value in scope.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                assign(key, value, path)
