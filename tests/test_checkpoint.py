"""checkpoint.py: a corrupt or foreign checkpoint is named in NanoDiT's words and never loaded unsafely."""
import os
import re

import pytest
import torch

from checkpoint import load_model


def test_a_corrupt_or_foreign_checkpoint_is_named_in_our_words_never_with_torchs_unsafe_advice(tmp_path):
    """A truncated or empty file, a pickle that asks to run code, a torch file of something else, weights that do
    not fit their settings: each names the file and what is wrong, and never suggests weights_only=False."""
    import pickle
    import subprocess
    import sys
    from dataclasses import asdict
    from conftest import REPO
    from model import DiT, DiTConfig
    cfg = DiTConfig(in_channels=1, patch_size=4, hidden=32, depth=2, heads=2)
    good = dict(model_args=asdict(cfg), model=DiT(cfg).state_dict(), ema=DiT(cfg).state_dict(), step=1, config={},
                data={})
    torch.save(good, tmp_path / "good.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    files = {"cut.pt": (tmp_path / "good.pt").read_bytes()[:2000], "empty.pt": b""}
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with open(tmp_path / "evil-pickle.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({**good, "model_args": {**good["model_args"], "hidden": 64}}, tmp_path / "misfit.pt")
    cases = {
        "cut.pt": r"is corrupt or not a NanoDiT checkpoint \(RuntimeError: PytorchStreamReader failed",
        "empty.pt": r"is corrupt or not a NanoDiT checkpoint \(EOFError: the file ends early\)",
        "evil.pt": r"is corrupt or not a NanoDiT checkpoint \(it holds Python objects \(posix.system\), where",
        "evil-pickle.pt": r"is corrupt or not a NanoDiT checkpoint \(it holds Python objects, where",
        "tensor.pt": r"is not a NanoDiT checkpoint: it lacks \['model', 'ema', 'step'",
        "misfit.pt": r"is corrupt or not a NanoDiT checkpoint: its weights do not fit its model settings",
    }
    for name, message in cases.items():
        with pytest.raises(SystemExit) as err:
            load_model(str(tmp_path / name))
        text = str(err.value)
        assert text.startswith("sample.py: ") and str(tmp_path / name) in text and re.search(message, text), text
        assert "weights_only=False" not in text and "weights_only` set to `False" not in text
    # as a user runs it: the whole output says it, once, without torch's advice
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'evil.pt'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"checkpoint {tmp_path / 'evil.pt'} is corrupt or not a NanoDiT" in proc.stderr
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stdout + proc.stderr
    assert not (tmp_path / "pwned").exists()
    assert load_model(str(tmp_path / "good.pt"))[1]["step"] == 1
