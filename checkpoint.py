"""train.py's checkpoint files, written and read in one place: out_dir/ckpt-<step>.pt (and best.pt).

Written atomically (write_atomic: path.tmp, fsync, os.replace), so a crash leaves the old file or the new one; the
newest are kept and older ones pruned (prune_checkpoints). Read without executing code (torch.load with
weights_only=True: a checkpoint holds only tensors and plain values) and memory-mapped (read_checkpoint); a file
that is cut short or not a checkpoint raises an error in NanoDiT's words, so train.py's resume falls back to the
next newest (checkpoint_paths) and sample.py, evaluate.py and export.py say what is wrong (load_model).
"""
import os
import re
import warnings

import torch

from model import DiT, config_from_checkpoint

CHECKPOINT_KEYS = ("model", "ema", "step", "config", "model_args", "data")   # what sampling reads of train.py's checkpoint


def checkpoint_paths(folder):
    """train.py's complete checkpoints (ckpt-<step>.pt) in folder, newest first (a .tmp file is an interrupted save)."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.startswith('ckpt-') and n.endswith('.pt')]
    return [os.path.join(folder, n) for n in sorted(names, reverse=True)]


def prune_checkpoints(folder, keep_last_n, keep_every):
    """Keep the newest keep_last_n checkpoints and every keep_every-th step (0: none); the newest is never deleted."""
    for i, path in enumerate(checkpoint_paths(folder)):
        step = int(os.path.basename(path)[5:-3])
        if i >= keep_last_n and not (keep_every and step % keep_every == 0):
            os.remove(path)


def write_atomic(path, write):
    """write(f) to path.tmp, fsync, then os.replace: a crash leaves the old file or the new one. An OSError removes
    the .tmp file and goes on to the caller. (Also evaluate.py's reference cache and prepare_data.py's index.json.)"""
    tmp = path + '.tmp'
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def resolve_checkpoint(path):
    """A checkpoint file as given, or the newest ckpt-*.pt in a folder."""
    if os.path.isdir(path):
        paths = checkpoint_paths(path)
        if not paths:
            raise SystemExit(f"sample.py: no ckpt-*.pt checkpoint in {path}")
        return paths[0]
    if not os.path.isfile(path):
        raise SystemExit(f"sample.py: ckpt={path!r} is neither a checkpoint file nor a folder")
    return path


def checkpoint_error(path, err):
    """Why torch.load(path, weights_only=True) failed, in NanoDiT's words (train.py's too). torch's own message
    advises loading the file with weights_only=False, which runs whatever code it holds: that is never passed on."""
    text = str(err).strip() or ("the file ends early" if isinstance(err, EOFError) else "")
    if "weights_only" in text:   # the safe unpickler met something other than tensors and plain values
        found = re.search(r"GLOBAL (\S+)", text)
        why = (f"it holds Python objects{f' ({found.group(1)})' if found else ''}, where a NanoDiT checkpoint holds "
               "only tensors and plain values")
    else:                        # cut short, or not a torch file at all
        why = type(err).__name__ + (f": {text.split('. ')[0][:200]}" if text else "")
    return f"checkpoint {path} is corrupt or not a NanoDiT checkpoint ({why})"


def read_checkpoint(path, keys=CHECKPOINT_KEYS):
    """A checkpoint file's contents (train.py's resume reads them here too), loaded without executing code
    (weights_only) and memory-mapped: the tensors are the file's pages, mapped copy-on-write and read as they are
    copied to a model, so no rank first copies the whole file, optimizer included, into its host memory. Raises
    ValueError in NanoDiT's words when the file is corrupt, or not a checkpoint that holds `keys`."""
    with warnings.catch_warnings():   # torch's remarks on a foreign pickle's protocol: the error says it
        warnings.simplefilter("ignore")
        for mmap in (True, False):    # not torch's zip format (an empty file, a plain pickle, an old save): read whole
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception as e:
                if mmap and isinstance(e, OSError):   # a missing or unreadable file says so itself
                    raise
                if not mmap or "mmap can only be used" not in str(e):
                    raise ValueError(checkpoint_error(path, e)) from None
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise ValueError(f"{path} is not a NanoDiT checkpoint: it lacks {missing} (train.py writes them)")
    return state


def load_model(path, use_ema=True, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint, loaded without executing code."""
    try:
        state = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"sample.py: {e}") from None
    try:
        model = DiT(config_from_checkpoint(state["model_args"]))
        model.load_state_dict(state["ema" if use_ema else "model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:   # settings or tensors that do not fit together
        raise SystemExit(f"sample.py: checkpoint {path} is corrupt or not a NanoDiT checkpoint: its weights do not "
                         f"fit its model settings ({type(e).__name__}: {str(e).strip()[:300]})") from None
    return model.to(device).eval(), state
