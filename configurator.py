"""Override a script's module-level defaults from config files and --key=value arguments.

    python train.py config/small.py --lr=3e-4 --out_dir=runs/lr=3e-4 --compile=false
    python train.py config/mnist.py --lr 1e-3 --compile --t_loc -0.5
    python train.py config/mnist.py --help         # every key: default, comment, and what the recipe set

Positional arguments are Python files of plain assignments (paths relative to the working directory or
to the script), executed in order; then `--key=value` or `--key value` overrides single keys, in order,
wherever they stand: the command line wins over every file. `--key=value` splits on the first '=', so
`--out_dir=runs/lr=1e-3` works. In `--key value` the value may not look like a key (start with '-',
other than a negative number such as `--t_loc -0.5`); write `--key=-x` for such a value. A bare `--flag`
sets a bool to True, and takes the next argument as its value only if that is a bool word
(true/false, 1/0, yes/no, on/off), so `--compile config/mnist.py` still reads the file.

Settable keys are the namespace's public, lower-case names holding plain values (str, int, float, bool,
None, list, tuple); UPPER_CASE names are constants. Strict: an unknown key or a value of the wrong type
is an error naming the key, never silently ignored.

`--help` (or `-h`) prints the script's docstring and its defaults block, read from the script's source:
each key with its default as written, its comment (continuation lines too) and the section comments
above it, plus the value the config files and overrides set; then exits 0. A key the block imports from
another script (`from sample import steps`) is shown as that script writes it.
"""
import ast
import difflib
import io
import os
import re
import sys
import tokenize

BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
HELP = ("--help", "-h")
COMMENT_COLUMN = 30           # where help lines put the comment, as the defaults blocks do


def _nearest(key, known):
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (nearest valid: {', '.join(near)})" if near else ""


def _looks_like_key(arg):
    return arg.startswith("-") and not re.match(r"-[\d.]", arg)     # '-0.5' and '-.5' are values


def _coerce(key, value, default, from_text):
    """Return `value` converted to the type of `default`, or raise ValueError naming the key.

    Command-line values arrive as text and are parsed; config-file values are Python objects.
    """
    want = type(default)
    if from_text and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool):
            if text.lower() in BOOL_WORDS:
                return BOOL_WORDS[text.lower()]
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


def _parse(argv, known):
    """Split `argv` into config files, (key, text value) pairs and whether help was asked for."""
    files, pairs, want_help, i = [], [], False, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in HELP:
            want_help = True
        elif not arg.startswith("--"):
            files.append(arg)
        else:
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in known:
                raise SystemExit(f"command line: unknown config key '{key}'{_nearest(key, list(known))}")
            after = argv[i] if i < len(argv) else None
            if not eq and isinstance(known[key], bool):        # bare --flag means True
                value = "true"
                if after is not None and after.strip().lower() in BOOL_WORDS:
                    value, i = after, i + 1
            elif not eq:
                if after is None:
                    raise SystemExit(f"command line: --{key} needs a value (--{key}=... or --{key} ...)")
                if after in HELP:                              # `--ckpt --help`: the help, not an error
                    continue
                if _looks_like_key(after):
                    raise SystemExit(f"command line: --{key} is followed by {after!r}, which looks like another "
                                     f"key; give --{key} a value (--{key}=... or --{key} ...)")
                value, i = after, i + 1
            pairs.append((key, value))
    return files, pairs, want_help


def apply_overrides(namespace, argv):
    """Apply config files, then --key=value / --key value overrides, from `argv` to the dict `namespace`.

    Only keys already present in `namespace` can be set (see the module docstring). Returns the set of
    keys the command line set. Raises SystemExit with a message naming the offending key or file, or
    with code 0 after printing the help for --help / -h.
    """
    known = {k: v for k, v in namespace.items() if not k.startswith("_") and not k.isupper()
             and isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    script = namespace.get("__file__") or sys.argv[0]
    files, pairs, want_help = _parse(argv, known)
    origin = {}                      # key -> where its value came from, for the help

    def assign(key, value, where, shown):
        if key not in known:
            raise SystemExit(f"{where}: unknown config key '{key}'{_nearest(key, list(known))}")
        try:
            namespace[key] = _coerce(key, value, known[key], from_text=where == "command line")
        except ValueError as e:
            raise SystemExit(f"{where}: {e}") from None
        origin[key] = shown

    for arg in files:
        path = os.path.abspath(arg)
        if not os.path.isfile(path):
            # config paths also resolve relative to the script's folder, whatever the cwd
            path = os.path.join(os.path.dirname(os.path.abspath(script)), arg)
            if not os.path.isfile(path):
                raise SystemExit(f"config file not found: {arg}")
        scope = {}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
        for key, value in scope.items():
            if not key.startswith("_") and type(value).__name__ != "module":
                assign(key, value, path, arg)
    for key, value in pairs:
        assign(key, value, "command line", "the command line")
    if want_help:
        print(_help_text(script, known, {k: namespace[k] for k in origin if namespace[k] != known[k]}, origin))
        raise SystemExit(0)
    return {key for key, _ in pairs}


def check_values(namespace, script, choices=None, bounds=None):
    """After the overrides: a setting outside its choices ({key: allowed values}) or its bounds ({key: an interval
    such as '[1, inf)' or '(0, 1]'}) is an error that names the key, its value and what it may be."""
    for key, allowed in (choices or {}).items():
        if namespace[key] not in allowed:
            raise SystemExit(f"{script}: {key}={namespace[key]!r}: expected one of {', '.join(map(repr, allowed))}")
    for key, interval in (bounds or {}).items():
        lo_open, lo, hi, hi_open = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", interval).groups()
        lo, hi, value = float(lo), float(hi), namespace[key]
        if not ((lo < value if lo_open == "(" else lo <= value) and (value < hi if hi_open == ")" else value <= hi)):
            raise SystemExit(f"{script}: {key}={value!r}: expected a value in {interval}")


def _documented(path, keys):
    """{line: (key, (default as written, its comments))} of the first module-level assignment of each of `keys` in
    the Python file at `path`, and the file's (docstring, {line: comment}). A `from <module> import key` of a key
    documents it as <module>.py beside the file does (a script's settings shared with another script)."""
    try:
        with open(path) as f:
            source = f.read()
        tree = ast.parse(source)
        comments = {}                # line -> (column, text, whether the line holds nothing else)
        for t in tokenize.generate_tokens(io.StringIO(source).readline):
            if t.type == tokenize.COMMENT:
                comments[t.start[0]] = (t.start[1], t.string, t.line.lstrip().startswith("#"))
    except (OSError, SyntaxError, tokenize.TokenError):
        source, tree, comments = "", ast.Module(body=[], type_ignores=[]), {}
    entries, seen = {}, set()        # line -> (key, (default text, comments))
    for node in tree.body:           # each key's first module-level assignment is its default
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [a.name for a in node.names if a.name in keys and a.name not in seen and not a.asname]
            found = _documented(os.path.join(os.path.dirname(path), node.module + ".py"), names)[0] if names else {}
            for i, n in enumerate(sorted(found)):    # in the other file's order, at this line
                entries[node.lineno + i / len(found)] = found[n]
                seen.add(found[n][0])
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        key = node.targets[0].id
        if key not in keys or key in seen:
            continue
        seen.add(key)
        text = " ".join(line.strip() for line in ast.get_source_segment(source, node.value).splitlines())
        notes = [comments[n][1] for n in range(node.lineno, node.end_lineno + 1)
                 if n in comments and not comments[n][2]]
        n = node.end_lineno + 1
        while n in comments and comments[n][2] and comments[n][0] > 0:     # indented comment lines continue it
            notes.append(comments[n][1])
            n += 1
        entries[node.lineno] = (key, (text, notes))
    return entries, ((ast.get_docstring(tree, clean=False) or "").strip("\n").rstrip(), comments)


def _help_text(script, defaults, changed, origin):
    """The script's docstring and its defaults block as `key = default  # comment` lines, under their
    section comments, read from the source; `changed` values are shown beside their default."""
    entries, (doc, comments) = _documented(script, defaults)   # the docstring as written: usage lines stay indented
    seen = {key for key, _ in entries.values()}
    if entries:                      # section comments: unindented comment lines among the defaults
        first, last = int(min(entries)), int(max(entries))
        while first - 1 in comments and comments[first - 1][2]:
            first -= 1
        for n in range(first, last):
            col, text, alone = comments.get(n, (1, "", False))
            if alone and col == 0 and text.strip("#-=_ "):
                entries[n] = (None, text)
    name = os.path.basename(script)
    lines = ([doc, ""] if doc else []) + [
        f"Settings, with their defaults as {name} writes them; set them with config files and --key=value",
        "or --key value (a bare --flag sets a bool to true):", ""]
    for n in sorted(entries):
        key, item = entries[n]
        if key is None:
            if lines[-1] and not lines[-1].startswith("#"):
                lines.append("")
            lines.append(item)
        else:
            lines += _help_lines(key, *item, changed, origin)
    rest = [k for k in defaults if k not in seen]
    if rest:
        lines += ["", f"# other settable keys (no default assignment in {name})"]
        for key in rest:
            lines += _help_lines(key, repr(defaults[key]), [], changed, origin)
    return "\n".join(lines)


def _help_lines(key, text, notes, changed, origin):
    left = f"{key} = {text}" + (f"  (now {changed[key]!r} from {origin[key]})" if key in changed else "")
    if not notes:
        return [left]
    col = max(COMMENT_COLUMN, len(left) + 2)
    return [left.ljust(col) + notes[0]] + [" " * col + note for note in notes[1:]]
