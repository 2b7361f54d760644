"""Tests for train.py: CPU only, seconds, on small files that the tests write in the real on-disk formats.

torchvision checks the md5 sums of the CIFAR and STL-10 files; the `no_md5` fixture lets the generated
files through for the tests (train.py itself never skips that check: see test_md5_check_is_kept).
"""
import copy
import datetime
import json
import math
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import isoloss
import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the repository: train.py, README.md
# A small model and tiny batches so one run takes a second or two on a CPU; defaults stay the paper's.
SMALL = ["--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "32", "--batch-size", "4",
         "--workers", "0", "--epochs", "1", "--log-every", "1", "--device", "cpu"]
WNIDS = ("n01443537", "n01629819", "n01641577")


# -----------------------------------------------------------------------------
# Writers of the real formats
# -----------------------------------------------------------------------------

def images(n, size, seed):
    """(n, size, size, 3) uint8 random images."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_cifar(root, kind="cifar10", per_batch=4):
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} or cifar-100-python/{train, test,
    meta}: pickled dicts with 'data' uint8 (N, 3072) (channel planes, row-major) and the labels."""
    ten = kind == "cifar10"
    folder = os.path.join(root, "cifar-10-batches-py" if ten else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if ten else ["train", "test"]
    out = {}
    for seed, name in enumerate(names):
        x = images(per_batch * (5 if not ten and name == "train" else 1), 32, seed)
        y = [int(v) for v in np.random.default_rng(seed).integers(0, 10 if ten else 100, len(x))]
        data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)
        entry = {"batch_label": name, "data": data, "filenames": [f"{i}.png" for i in range(len(x))]}
        entry.update({"labels": y} if ten else {"fine_labels": y, "coarse_labels": [v // 5 for v in y]})
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
        out[name] = (x, y)
    meta = {"label_names": [f"c{i}" for i in range(10)]} if ten else {
        "fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"k{i}" for i in range(20)]}
    with open(os.path.join(folder, "batches.meta" if ten else "meta"), "wb") as f:
        pickle.dump(meta, f)
    return out


def write_stl10(root, n_train=8, n_unlabeled=8, n_test=4):
    """stl10_binary/*.bin: uint8 images (3, 96, 96) stored column-major, labels 1..10 in *_y.bin."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for seed, (name, n) in enumerate([("train", n_train), ("unlabeled", n_unlabeled), ("test", n_test)]):
        x = images(n, 96, 10 + seed)                                   # (N, H, W, 3)
        x.transpose(0, 3, 2, 1).tofile(os.path.join(folder, f"{name}_X.bin"))  # (N, 3, W, H): column-major
        if name != "unlabeled":
            y = np.arange(n, dtype=np.uint8) % 10 + 1
            y.tofile(os.path.join(folder, f"{name}_y.bin"))
            out[name] = (x, y - 1)
        else:
            out[name] = (x, None)
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(f"class{i}" for i in range(10)) + "\n")
    return out


def write_tinyimagenet(root, per_class=4, n_val=6):
    """tiny-imagenet-200/: wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG + <wnid>_boxes.txt,
    val/images/val_<i>.JPEG + val/val_annotations.txt, test/images/test_0.JPEG."""
    base = os.path.join(root, "tiny-imagenet-200")
    for d in ["val/images", "test/images"] + [f"train/{w}/images" for w in WNIDS]:
        os.makedirs(os.path.join(base, d), exist_ok=True)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(reversed(WNIDS)) + "\n")    # not sorted, as in the real file
    with open(os.path.join(base, "words.txt"), "w") as f:
        f.write("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    for c, w in enumerate(WNIDS):
        for i, x in enumerate(images(per_class, 64, c)):
            Image.fromarray(x).save(os.path.join(base, "train", w, "images", f"{w}_{i}.JPEG"))
        with open(os.path.join(base, "train", w, f"{w}_boxes.txt"), "w") as f:
            f.write("".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    Image.fromarray(images(1, 64, 99)[0]).save(os.path.join(base, "test", "images", "test_0.JPEG"))
    val = [(f"val_{i}.JPEG", WNIDS[(2 * i + 1) % 3]) for i in range(n_val)]
    for (name, _), x in zip(val, images(n_val, 64, 50)):
        Image.fromarray(x).save(os.path.join(base, "val", "images", name))
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("".join(f"{name}\t{w}\t1\t2\t50\t60\n" for name, w in val))
    return val


def write_folder(root, classes=("cat", "dog", "eel"), per_class=4, val_classes=("dog", "eel"), size=40):
    """An ImageFolder tree: train/<class>/*.png, val/<class>/*.png (val may lack some classes)."""
    for split, names in (("train", classes), ("val", val_classes)):
        for c, name in enumerate(names):
            os.makedirs(os.path.join(root, split, name))
            for i, x in enumerate(images(per_class, size, 100 * c + len(split))):
                Image.fromarray(x).save(os.path.join(root, split, name, f"{i}.png"))


WRITERS = {"cifar10": write_cifar, "cifar100": lambda r: write_cifar(r, "cifar100"), "stl10": write_stl10,
           "tinyimagenet": write_tinyimagenet, "folder": write_folder}


@pytest.fixture
def no_md5(monkeypatch):
    """Accept generated CIFAR/STL-10 files: torchvision's md5 check (used by _check_integrity and
    CIFAR's _load_meta) returns True. Only the tests do this."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *a, **k: True)


def config(argv):
    """The resolved config train.main would use for `argv` (on the CPU, whatever the machine has)."""
    return train.get_config(["--device=cpu", *argv])


def load(argv):
    cfg = config(argv)
    return cfg, train.load_datasets(cfg, train.train_transform(cfg), train.eval_transform(cfg))


def unnormalise(x, dataset):
    """Normalised (3, H, W) float -> (H, W, 3) uint8, the inverse of eval_transform's last two ops."""
    d = train.DATASETS[dataset]
    x = x * torch.tensor(d["std"])[:, None, None] + torch.tensor(d["mean"])[:, None, None]
    return (x * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def run(tmp_path, dataset, *extra, out="run"):
    """Write `dataset` in its real format under tmp_path/data (once) and train.main on it; returns
    (out dir, last metrics row)."""
    data = tmp_path / "data"
    if not data.exists():
        WRITERS[dataset](str(data))
    out = tmp_path / out
    argv = ["--dataset", dataset, "--data-dir", str(data), "--out", str(out), "--image-size", "16",
            "--limit", "8", *SMALL, *extra]
    return out, train.main(argv)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_metrics(out):
    return read_jsonl(out / "metrics.jsonl")


# -----------------------------------------------------------------------------
# Each dataset kind loads through its real loader
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_real_format(tmp_path, no_md5, kind):
    written = write_cifar(str(tmp_path), kind)
    cfg, (tr, ev, classes) = load([f"--dataset={kind}", f"--data-dir={tmp_path}"])
    test_x, test_y = written["test_batch" if kind == "cifar10" else "test"]
    assert (len(tr), len(ev), classes) == (20, 4, 10 if kind == "cifar10" else 100)
    (x1, x2), y = tr[0]
    assert x1.shape == x2.shape == (3, 32, 32) and not torch.equal(x1, x2)
    x, y = ev[3]                             # evaluation: the image itself, normalised
    assert y == test_y[3] and np.array_equal(unnormalise(x, kind), test_x[3])


def test_stl10_real_format(tmp_path, no_md5):
    written = write_stl10(str(tmp_path))
    cfg, (tr, ev, classes) = load(["--dataset=stl10", f"--data-dir={tmp_path}"])
    assert (len(tr), len(ev), classes) == (16, 4, 10)
    labels = [tr[i][1] for i in range(len(tr))]
    assert labels[:8] == list(written["train"][1]) and labels[8:] == [-1] * 8   # train+unlabeled
    (x1, x2), _ = tr[0]
    assert x1.shape == (3, 96, 96)
    x, y = ev[2]                             # column-major bytes -> the written (H, W, 3) image
    assert y == written["test"][1][2] and np.array_equal(unnormalise(x, "stl10"), written["test"][0][2])


def test_tinyimagenet_official_layout(tmp_path):
    val = write_tinyimagenet(str(tmp_path))
    cfg, (tr, ev, classes) = load(["--dataset=tinyimagenet", f"--data-dir={tmp_path}"])
    assert (len(tr), len(ev), classes) == (12, 6, 3)
    assert tr.classes == sorted(WNIDS) and all(p.endswith(".JPEG") for p, _ in tr.samples)
    assert [y for _, y in ev.samples] == [tr.class_to_idx[w] for _, w in val]   # val_annotations.txt
    x, _ = ev[0]
    assert x.shape == (3, 64, 64) and cfg.stem == "3x3-maxpool" and cfg.image_size == 64


def test_folder_val_uses_train_class_indices(tmp_path):
    write_folder(str(tmp_path))                     # val lacks "cat": indices must still follow train/
    cfg, (tr, ev, classes) = load(["--dataset=folder", f"--data-dir={tmp_path}", "--image-size=24"])
    assert classes == 3 and sorted({y for _, y in ev.samples}) == [1, 2]
    assert ev[0][0].shape == (3, 24, 24) and tr[0][0][0].shape == (3, 24, 24)
    assert (cfg.stem, cfg.blur) == ("3x3", False)


# -----------------------------------------------------------------------------
# Augmentations, model, loss, optimiser, schedules
# -----------------------------------------------------------------------------

def test_views_follow_table_4():
    for dataset, blur in [("cifar10", False), ("stl10", True), ("tinyimagenet", False)]:
        t = train.train_transform(config([f"--dataset={dataset}"]))
        for view, (blur_p, solarize_p) in zip((t.t1, t.t2), [(1.0, 0.0), (0.1, 0.2)]):
            ops = {type(o).__name__: o for o in view.transforms}
            crop = ops["RandomResizedCrop"]
            assert crop.size == (train.DATASETS[dataset]["crop"],) * 2 and crop.scale == (0.08, 1.0)
            assert crop.interpolation == torchvision.transforms.v2.InterpolationMode.BICUBIC
            inner = {type(o.transforms[0]).__name__: o for o in view.transforms
                     if type(o).__name__ == "RandomApply"}
            applied = {name: o.p for name, o in inner.items()}
            jitter = inner["ColorJitter"].transforms[0]           # ColorJitter(0.4, 0.4, 0.2, 0.1)
            assert (jitter.brightness, jitter.contrast) == ((0.6, 1.4), (0.6, 1.4))
            assert (jitter.saturation, jitter.hue) == ((0.8, 1.2), (-0.1, 0.1))
            assert applied["ColorJitter"] == 0.8 and ops["RandomGrayscale"].p == 0.2
            assert applied.get("GaussianBlur", 0.0) == (blur_p if blur else 0.0)
            assert getattr(ops.get("RandomSolarize"), "p", 0.0) == solarize_p
            assert ops["RandomHorizontalFlip"].p == 0.5


def test_stems_and_heads_follow_table_4_and_app_d():
    for dataset, kernel, maxpool in [("cifar10", 3, False), ("stl10", 7, True), ("tinyimagenet", 3, True)]:
        cfg = config([f"--dataset={dataset}", "--predictor=mlp", "--loss=cos"])
        model, target = train.build_model(cfg, 10)
        net = model.encoder.backbone
        stride = (1, 1) if kernel == 3 else (2, 2)
        assert net.conv1.kernel_size == (kernel, kernel) and net.conv1.stride == stride
        assert isinstance(net.maxpool, torch.nn.MaxPool2d) == maxpool
        assert isinstance(net.fc, torch.nn.Identity)
        proj, pred = model.encoder.projector, model.predictor
        assert [proj[0].in_features, proj[0].out_features, proj[3].out_features] == [512, 4096, 256]
        assert [pred[0].in_features, pred[0].out_features, pred[3].out_features] == [256, 4096, 256]
        assert isinstance(proj[1], torch.nn.BatchNorm1d) and model.probe.in_features == 512
        assert all(not p.requires_grad for p in target.parameters())
    h, z = model.encoder.eval()(torch.randn(2, 3, 64, 64))
    assert h.shape == (2, 512) and z.shape == (2, 256)


def test_ssl_loss_scale_and_C_update():
    """L = 2 [L(z1, z2_t) + L(z2, z1_t)] against formulas written out here; C folds in both views
    with tau ** 2 before W_P is built."""
    torch.manual_seed(0)
    z1, z2, z1_t, z2_t = torch.randn(4, 8, 6).unbind(0)
    for loss in train.LOSSES:
        cfg = config(["--dataset=cifar10", f"--loss={loss}", "--proj-dim=6", "--proj-hidden=8"])
        model, _ = train.build_model(cfg, 10)
        model.predictor.C.copy_(torch.eye(6))
        L = train.ssl_loss(model, z1, z2, None, None, z1_t, z2_t, cfg)
        C = 0.998 ** 2 * torch.eye(6) + (1 - 0.998 ** 2) * torch.cat([z1, z2]).T @ torch.cat([z1, z2]) / 16
        assert torch.allclose(model.predictor.C, C, atol=1e-6)
        W_P, _ = isoloss.predictor(C, 0.5, 0.0)
        p1, p2 = z1 @ W_P, z2 @ W_P                                # W_P is symmetric
        if loss.endswith("euc"):   # the value of the Euclidean IsoLoss equals that of L_euc
            expected = ((p1 - z2_t) ** 2).sum(1).mean() + ((p2 - z1_t) ** 2).sum(1).mean()
        else:                      # the cosine IsoLoss logs the value of L_cos (straight-through form)
            expected = -2 * (F.cosine_similarity(p1, z2_t).mean() + F.cosine_similarity(p2, z1_t).mean())
        assert torch.allclose(L, expected, atol=1e-5), loss
    cfg = config(["--dataset=cifar10", "--predictor=mlp", "--loss=cos", "--proj-dim=6", "--pred-hidden=8"])
    model, _ = train.build_model(cfg, 10)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    expected = -2 * (F.cosine_similarity(p1, z2_t).mean() + F.cosine_similarity(p2, z1_t).mean())
    assert torch.allclose(train.ssl_loss(model, z1, z2, p1, p2, z1_t, z2_t, cfg), expected, atol=1e-5)
    zz = torch.cat([z1, z2])                                       # a learned predictor's C, for monitoring
    torch.testing.assert_close(model.stats.C, (1 - 0.998 ** 2) * zz.T @ zz / 16)


@pytest.mark.parametrize("loss", ["iso_euc", "iso_cos"])
def test_iso_loss_gradient_is_straight_through(loss):
    """The z1-gradient of the training loss with IsoLoss equals the gradient of the base loss (same
    scale) with respect to the prediction p = W_P z1 (Eqs. 15, 17): the predictor is skipped backwards."""
    torch.manual_seed(1)
    z1, z2, z1_t, z2_t = torch.randn(4, 8, 6).unbind(0)
    z1.requires_grad_(True)
    cfg = config(["--dataset=cifar10", f"--loss={loss}", "--proj-dim=6", "--proj-hidden=8"])
    model, _ = train.build_model(cfg, 10)
    train.ssl_loss(model, z1, z2, None, None, z1_t, z2_t, cfg).backward()   # only view order 1 has z1
    W_P, _ = model.predictor()
    p = (z1.detach() @ W_P).requires_grad_(True)
    base = ((p - z2_t) ** 2).sum(1).mean() if loss == "iso_euc" else -2 * F.cosine_similarity(p, z2_t).mean()
    base.backward()
    assert torch.allclose(z1.grad, p.grad, atol=1e-6)


def test_straight_through_step_equals_the_eq17_step(tmp_path, no_md5, monkeypatch):
    """One training step of --loss iso_cos (the cosine loss of a straight-through prediction) makes the
    same parameter update as one with Eq. 17 written out (isoloss.loss_iso_cos with W_P^{1/2})."""
    write_cifar(str(tmp_path))
    cfg = config(["--dataset=cifar10", f"--data-dir={tmp_path}", "--image-size=16", *SMALL, "--limit=8"])

    def update():
        run_, loaders = train.setup(cfg)
        loaders.train.generator.manual_seed(0)
        (x1, x2), y = next(iter(loaders.train))
        before = {k: v.clone() for k, v in run_.model.state_dict().items()}
        train.set_lr(run_.opt, cfg.warmup_steps, cfg)               # the base lr: a step of full size
        train.train_step(run_, x1, x2, y, cfg, 0.99)
        return {k: v - before[k] for k, v in run_.model.state_dict().items() if v.is_floating_point()}

    straight = update()

    def eq17(kind, z1, z2_t, W_P=None):
        lam, U = torch.linalg.eigh(W_P.double())
        W_P_half = ((U * lam.clamp(min=0).sqrt()) @ U.T).float()
        return isoloss.loss_iso_cos(z1, z2_t, W_P, W_P_half)
    monkeypatch.setattr(train, "pair_loss", eq17)
    written_out = update()
    for k in ("encoder.projector.3.weight", "encoder.backbone.conv1.weight"):
        assert straight[k].abs().max() > 1e-4                       # updates well above the round-off
    for k in straight:                                              # float32 round-off of parameters ~1
        torch.testing.assert_close(straight[k], written_out[k], rtol=1e-4, atol=1e-6)


def test_probe_ignores_unlabelled_images():
    logits = torch.randn(2, 4).repeat(2, 1)                # (2B, classes): both views, same logits
    y = torch.tensor([2, -1])
    expected = F.cross_entropy(logits[:1], y[:1])           # only the labelled image counts
    assert torch.allclose(train.probe_loss(logits, y), expected)
    assert train.probe_loss(logits, torch.tensor([-1, -1])).item() == 0.0   # not NaN


def reference_update(named, grads, bufs, lr, probe_lr, wd, lars, eta=0.02, momentum=0.9):
    """One step of the reference code's optimiser written per tensor from its rule, in plain Python floats
    for the ratios. Groups: the probe (lr probe_lr, no weight decay), everything else (lr, wd). LARS
    (clip_lr, exclude_bias_n_norm): a 1-D tensor takes its gradient alone; any other tensor whose weight
    and gradient norms are both non-zero takes r (g + wd w), r = min(eta |w| / (|g| + wd |w| + 1e-8) / lr,
    1), else its gradient alone. Biases and norms have no weight decay under LARS (exclude_bias_n_norm_wd).
    SGD: g + wd w everywhere. Then buf <- momentum buf + d (buf = d at first), w <- w - lr buf.
    Returns the new weights and the clipped trust ratio of every tensor it scaled."""
    new, ratios = {}, {}
    for name, w in named.items():
        g = grads[name]
        lr_t, wd_t = (probe_lr, 0.0) if name.startswith("probe.") else (lr, wd)
        if lars and w.ndim == 1:
            d = g
        elif lars:
            w_norm, g_norm = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
            if w_norm != 0 and g_norm != 0:
                r = min(eta * w_norm / (g_norm + w_norm * wd_t + 1e-8) / lr_t, 1.0)
                d, ratios[name] = (g + wd_t * w) * r, r
            else:
                d = g
        else:
            d = g + wd_t * w
        bufs[name] = d.clone() if name not in bufs else momentum * bufs[name] + d
        new[name] = w - lr_t * bufs[name]
    return new, ratios


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_optimizer_follows_the_reference_rule_per_tensor(optimizer):
    """build_optimizer + LARS against `reference_update` on a small ResNet (conv weights, biases, BatchNorm,
    projector, probe) in float64 over four steps with changing lr: a tensor with an exactly zero gradient,
    one with zero weights, and the probe's weight with a trust ratio below 1 after the clip."""
    cfg = config(["--dataset=cifar10", "--proj-hidden=8", "--proj-dim=4", "--batch-size=64",
                  f"--optimizer={optimizer}", "--wd=1e-2"])
    train.schedule(cfg, 10)
    torch.manual_seed(0)
    model, _ = train.build_model(cfg, 10)
    model.double()
    with torch.no_grad():
        model.encoder.projector[3].weight.zero_()                 # a zero weight norm
    opt = train.build_optimizer(model, cfg)
    named = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs, ratios = {}, {}
    g = torch.Generator().manual_seed(1)
    for step in (0, 3, 11, 40):
        lr = train.set_lr(opt, step, cfg)
        probe_lr = opt.param_groups[2]["lr"]
        grads = {}
        for i, (n, p) in enumerate(model.named_parameters()):
            scale = 100.0 if n.startswith("probe.") else 10.0 ** (i % 5 - 3)   # clipped and unclipped ratios
            p.grad = scale * torch.randn(p.shape, generator=g, dtype=torch.float64)
            grads[n] = p.grad.clone()
        model.encoder.backbone.conv1.weight.grad.zero_()            # an exactly zero gradient
        grads["encoder.backbone.conv1.weight"].zero_()
        named, r = reference_update(named, grads, bufs, lr, probe_lr, cfg.wd, optimizer == "lars")
        ratios.update(r)
        first = r if step == 0 else first
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), named[n], atol=1e-12, rtol=1e-12, msg=n)
    if optimizer == "lars":
        assert ratios["probe.weight"] < 1 and "probe.bias" not in ratios
        assert max(ratios.values()) == 1.0 and min(ratios.values()) < 1e-2
        assert "encoder.backbone.conv1.weight" not in ratios and "encoder.projector.3.weight" not in first
    else:
        assert not ratios


def test_param_groups_exclude_biases_norms_and_probe():
    cfg = config(["--dataset=cifar10", "--proj-hidden=8", "--proj-dim=4", "--batch-size=512"])
    model, _ = train.build_model(cfg, 10)
    weights, bias_norm, probe = train.build_optimizer(model, cfg).param_groups
    assert weights["lars"] and weights["weight_decay"] == 1e-4 and weights["base_lr"] == 2.0
    assert not bias_norm["lars"] and bias_norm["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in bias_norm["params"]) and all(p.ndim > 1 for p in weights["params"])
    assert probe["lars"] and probe["weight_decay"] == 0.0 and probe["base_lr"] == 0.2   # as the reference
    assert len(probe["params"]) == 2
    sgd = config(["--dataset=cifar10", "--no-ema", "--predictor=mlp", "--loss=cos"])
    assert (sgd.optimizer, sgd.lr, sgd.wd, sgd.tau) == ("sgd", 0.1, 1e-5, 0.5)


def warmup_steps(argv, steps_per_epoch):
    cfg = config(["--dataset=cifar10", *argv])
    train.schedule(cfg, steps_per_epoch)
    return cfg.warmup_steps


def test_schedules():
    cfg = config(["--dataset=cifar10"])
    train.schedule(cfg, 10)
    assert (cfg.total_steps, cfg.warmup_steps) == (10_000, 100)     # 10 of 1000 epochs (App. D)
    assert train.lr_at(0, 1.0, cfg) == pytest.approx(3e-5)
    assert train.lr_at(99, 1.0, cfg) == pytest.approx(1.0) and train.lr_at(100, 1.0, cfg) == 1.0  # w - 1: base
    assert train.lr_at(50, 1.0, cfg) == pytest.approx(3e-5 + (1 - 3e-5) * 50 / 99)
    assert train.lr_at(5050, 1.0, cfg) == pytest.approx(0.5)
    assert train.lr_at(9999, 1.0, cfg) < 1e-6
    assert train.ema_at(0, cfg) == pytest.approx(0.99) and train.ema_at(5000, cfg) == pytest.approx(0.995)
    assert train.ema_at(10_000, cfg) == pytest.approx(1.0)


def test_schedule_follows_the_reference_schedulers_recursion():
    """lr_at against the chainable form of the reference code's LinearWarmupCosineAnnealingLR: warm-up steps
    of (base - start) / (w - 1), base at steps w - 1 and w, then each lr the previous one times the ratio
    of consecutive cosine factors (eta_min 0). A 50-step warm-up in a 200-step run."""
    cfg = config(["--dataset=cifar10", "--epochs=4", "--warmup-epochs=1"])
    train.schedule(cfg, 50)
    w, T, base, start = 50, 200, 0.7, cfg.warmup_start_lr
    lr = [start]
    for k in range(1, T):
        if k < w:
            lr.append(lr[-1] + (base - start) / (w - 1))
        elif k == w:
            lr.append(base)
        else:
            lr.append(lr[-1] * (1 + math.cos(math.pi * (k - w) / (T - w)))
                      / (1 + math.cos(math.pi * (k - w - 1) / (T - w))))
    assert [train.lr_at(k, base, cfg) for k in range(T)] == pytest.approx(lr, rel=1e-12, abs=1e-15)
    assert train.lr_at(w - 1, base, cfg) == pytest.approx(base)


def test_warmup_rule_short_runs_warm_up_too():
    """10 epochs, at most a quarter of the run, at least one step; --warmup-epochs E: ceil(E x steps)."""
    assert warmup_steps(["--epochs=100"], 234) == 2340                # 10 epochs
    assert warmup_steps(["--epochs=8"], 234) == 468                   # a quarter: 2 of 8 epochs
    assert warmup_steps(["--epochs=1"], 2) == 1                       # never zero by default
    assert warmup_steps(["--epochs=8", "--warmup-epochs=0.5"], 234) == 117
    assert warmup_steps(["--epochs=8", "--warmup-epochs=0.3"], 234) == 71          # 70.2, rounded up
    assert warmup_steps(["--epochs=8", "--warmup-epochs=0"], 234) == 0


def test_first_step_runs_at_the_warmup_start_lr(tmp_path, no_md5, monkeypatch):
    """The lr of the very first step is warmup_start_lr (default on, also for a 1-epoch run), and the
    resolved warmup_steps is in config.json; with --warmup-epochs 0 the first step runs at the base lr."""
    lrs, step = [], train.train_step

    def record(run, *args):
        lrs.append([g["lr"] for g in run.opt.param_groups])
        return step(run, *args)
    monkeypatch.setattr(train, "train_step", record)
    out, _ = run(tmp_path, "cifar10", "--warmup-start-lr=1e-4")
    assert lrs[0] == [1e-4] * 3 and json.loads((out / "config.json").read_text())["warmup_steps"] == 1
    lrs.clear()
    run(tmp_path, "cifar10", "--warmup-epochs=0", out="cold")
    assert lrs[0] == pytest.approx([1.0 * 4 / 256, 1.0 * 4 / 256, 0.1 * 4 / 256])


# -----------------------------------------------------------------------------
# End-to-end runs: every dataset kind, predictor kind and loss
# -----------------------------------------------------------------------------

RUNS = [  # (dataset, extra flags): together every dataset, predictor, loss, EMA and no EMA
    ("cifar10", ["--loss=iso_cos"]),                                             # IsoLoss
    ("cifar100", ["--loss=iso_euc", "--no-ema"]),                                # IsoLoss, no EMA, SGD
    ("stl10", ["--predictor=mlp", "--loss=cos", "--limit=16", "--batch-size=8"]),  # BYOL, with unlabelled
    ("tinyimagenet", ["--loss=cos", "--alpha=1", "--eps=0.25", "--amp"]),        # DirectCopy, bf16
    ("folder", ["--predictor=linear", "--loss=euc", "--workers=2"]),             # linear predictor
    ("cifar10", ["--loss=euc", "--no-ema"]),                                     # DirectPred (euc), no EMA
    ("cifar10", ["--predictor=mlp", "--loss=cos", "--no-ema"]),                  # SimSiam
]


def probe_accuracy_by_hand(out):
    """Top-1 (%) of the saved probe on the saved backbone's features of each evaluation image alone (batches
    of one, eval mode), from config.json and last.pt."""
    cfg = types.SimpleNamespace(**json.loads((out / "config.json").read_text()))
    state = torch.load(out / "last.pt", weights_only=True)
    model = train.Model(cfg, len(state["model"]["probe.bias"]))
    model.load_state_dict(state["model"])
    model.eval()
    _, val, _ = train.load_datasets(cfg, None, train.eval_transform(cfg))
    hits = 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=cfg.amp is not None):
        for i in range(len(val)):
            x, y = val[i]
            hits += int(model.probe(model.encoder.backbone(x[None]).float()).argmax() == y)
    return 100 * hits / len(val)


@pytest.mark.parametrize("dataset, extra", RUNS, ids=[" ".join([d, *e]) for d, e in RUNS])
def test_short_run_writes_outputs(tmp_path, no_md5, dataset, extra):
    out, row = run(tmp_path, dataset, *extra)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == dataset and cfg["steps_per_epoch"] == 2 == cfg["limit"] // cfg["batch_size"]
    assert cfg["optimizer"] == ("sgd" if "--no-ema" in extra else "lars")
    (line,) = read_metrics(out)
    assert {"epoch", "step", "loss", "acc1", "lr", "seconds"} <= set(line) and line == row
    assert (line["epoch"], line["step"]) == (1, 2) and np.isfinite(line["loss"])
    assert line["acc1"] == pytest.approx(probe_accuracy_by_hand(out), rel=1e-6)
    state = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "target", "optimizer", "epoch", "step", "rng", "config"} <= set(state)
    assert (state["target"] is None) == ("--no-ema" in extra)
    if cfg["predictor"] == "closed":
        C = state["model"]["predictor.C"]
        assert C.dtype == torch.float32 and C.shape == (16, 16) and C.abs().sum() > 0
        assert torch.allclose(C, C.T) and not C.requires_grad


# -----------------------------------------------------------------------------
# The training loop's wiring: EMA target, probe, modes, AMP, order and augmentation seeds
# -----------------------------------------------------------------------------

ORIGINALS = train.train_step, train.batch_two_views       # the functions traced_run wraps


def traced_run(tmp_path, monkeypatch, *extra, out):
    """A 2-epoch run (8 images, batch 4: 4 steps) recording, for every training step: the target momentum m
    it was given, the target's and the online encoder's parameters before and after, the labels, view 1,
    whether the target ran in training mode and the backbone's activation dtype; and the seed of the
    augmentation generator of each batch (--gpu-aug)."""
    steps, seeds, (step, views) = [], [], ORIGINALS

    def params(module):
        return [p.detach().clone() for p in module.parameters()]

    def record(run_, x1, x2, y, cfg, m):
        seen = {}
        def note(key, value):                   # a hook that returns None changes nothing
            seen.setdefault(key, value)
        hooks = [run_.target.register_forward_pre_hook(lambda mod, i: note("target_train", mod.training)),
                 run_.model.encoder.backbone.layer1.register_forward_hook(lambda mod, i, o: note("dtype", o.dtype))]
        before = params(run_.target)
        result = step(run_, x1, x2, y, cfg, m)
        for h in hooks:
            h.remove()
        steps.append(dict(m=m, step=run_.step, target_before=before, target_after=params(run_.target),
                          online_after=params(run_.model.encoder), y=y.clone(), x1=x1.clone(), **seen))
        return result

    def record_seed(x, size, mean, std, blur, generator=None):
        seeds.append(generator.initial_seed())
        return views(x, size, mean, std, blur, generator)
    monkeypatch.setattr(train, "train_step", record)
    monkeypatch.setattr(train, "batch_two_views", record_seed)
    out, _ = run(tmp_path, "cifar10", "--epochs=2", "--gpu-aug", *extra, out=out)
    return steps, seeds


@pytest.fixture
def traced(tmp_path, no_md5, monkeypatch):
    return traced_run(tmp_path, monkeypatch, "--amp", out="a")


def test_target_is_the_ema_of_the_online_encoder_with_the_scheduled_momentum(traced):
    """xi <- m xi + (1 - m) theta after every step, m = 1 - (1 - 0.99) (cos(pi k / K) + 1) / 2 (BYOL, App. D),
    written out here; the target runs in training mode (batch statistics, as BYOL's)."""
    steps, _ = traced
    K = len(steps)
    for k, s in enumerate(steps):
        m = 1 - (1 - 0.99) * (math.cos(math.pi * k / K) + 1) / 2
        assert s["m"] == pytest.approx(m, rel=1e-12) and s["target_train"] is True
        for xi, xi_new, theta in zip(s["target_before"], s["target_after"], s["online_after"]):
            torch.testing.assert_close(xi_new, m * xi + (1 - m) * theta, atol=1e-6, rtol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(steps[-1]["target_after"], steps[-1]["online_after"]))


def test_amp_runs_the_backbone_in_bf16_and_plain_runs_in_float32(traced, tmp_path, monkeypatch):
    assert {s["dtype"] for s in traced[0]} == {torch.bfloat16}
    plain, _ = traced_run(tmp_path, monkeypatch, out="plain")
    assert {s["dtype"] for s in plain} == {torch.float32}


def test_each_epoch_reshuffles_and_draws_new_views_reproducibly(traced, tmp_path, monkeypatch):
    """The order of epoch e is DistributedSampler's: randperm(N) seeded with seed + e (written out here);
    each epoch's augmentation stream has its own seed; a second run repeats the views bit for bit."""
    steps, seeds = traced
    written = write_cifar(str(tmp_path / "labels"))              # the same files as the run's (fixed seeds)
    labels = torch.tensor(written["data_batch_1"][1] + written["data_batch_2"][1])      # its 8 images
    for epoch in (0, 1):
        order = torch.randperm(8, generator=torch.Generator().manual_seed(0 + epoch))
        got = torch.cat([s["y"] for s in steps[2 * epoch:2 * epoch + 2]])
        assert torch.equal(got, labels[order]), epoch
    assert not torch.equal(torch.randperm(8, generator=torch.Generator().manual_seed(0)),
                           torch.randperm(8, generator=torch.Generator().manual_seed(1)))
    assert len(seeds) == 4 and seeds[0] == seeds[1] != seeds[2] == seeds[3]      # one stream per epoch
    again, seeds_again = traced_run(tmp_path, monkeypatch, "--amp", out="again")
    assert seeds_again == seeds
    assert all(torch.equal(s["x1"], t["x1"]) for s, t in zip(steps, again))
    assert not torch.equal(steps[0]["x1"], steps[2]["x1"])


def test_probe_learns_from_detached_features_and_its_loss_alone(tmp_path, no_md5):
    """After one training step the probe's gradient is that of its cross-entropy alone, computed here on a
    copy of the network before the step; the backbone's is that of the SSL loss alone (the probe's input
    is detached), and the SSL loss gives the probe nothing."""
    write_cifar(str(tmp_path))
    cfg = config(["--dataset=cifar10", f"--data-dir={tmp_path}", "--image-size=16", *SMALL, "--limit=8"])
    run_, loaders = train.setup(cfg)
    (x1, x2), y = next(iter(loaders.train))
    model, target = copy.deepcopy(run_.model), copy.deepcopy(run_.target)
    train.set_lr(run_.opt, 0, cfg)
    train.train_step(run_, x1, x2, y, cfg, 0.99)
    h = torch.cat([model.encoder.backbone(x1), model.encoder.backbone(x2)])
    probe = torch.autograd.grad(F.cross_entropy(model.probe(h.detach()), torch.cat([y, y])),
                                list(model.probe.parameters()))
    for g, p in zip(probe, run_.model.probe.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    model.zero_grad()
    z1, z2, p1, p2, _ = model(x1, x2)
    with torch.no_grad():
        z1_t, z2_t = target(x1)[1], target(x2)[1]
    train.ssl_loss(model, z1, z2, p1, p2, z1_t, z2_t, cfg).backward()
    for (n, p), q in zip(run_.model.encoder.named_parameters(), model.encoder.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert all(p.grad is None for p in model.probe.parameters())


def test_evaluation_features_do_not_depend_on_the_rest_of_the_batch(tmp_path, no_md5):
    """Eval mode: an image's features are the same in batches of 1, 3 and 4 (batch statistics would mix
    them), evaluation leaves BatchNorm's running statistics and C alone, and training mode comes back."""
    write_cifar(str(tmp_path))
    cfg = config(["--dataset=cifar10", f"--data-dir={tmp_path}", "--image-size=16", *SMALL, "--limit=8"])
    run_, loaders = train.setup(cfg)
    run_.model.predictor.C.fill_(0.5)
    for (x1, x2), y in loaders.train:                     # running statistics away from their initial values
        train.train_step(run_, x1, x2, y, cfg, 0.99)
    state = copy.deepcopy(run_.model.state_dict())
    feats = [train.features(run_.model, torch.utils.data.DataLoader(loaders.eval.dataset, batch_size=b), cfg)[0]
             for b in (1, 3, 4)]
    for f in feats[1:]:
        torch.testing.assert_close(f, feats[0], atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, run_.model.state_dict()[k]) for k, v in state.items())
    assert run_.model.training and all(m.training for m in run_.model.modules())


def test_eval_does_not_move_C(tmp_path, no_md5):
    write_cifar(str(tmp_path))
    cfg = config(["--dataset=cifar10", f"--data-dir={tmp_path}", "--image-size=16", *SMALL])
    run_, loaders = train.setup(cfg)
    run_.model.predictor.C.fill_(0.5)
    train.evaluate(run_.model, loaders, cfg)
    assert torch.equal(run_.model.predictor.C, torch.full((16, 16), 0.5))


def test_resume_continues_from_saved_epoch_and_evaluates_when_due(tmp_path, no_md5):
    """--eval-every 2: the probe is evaluated at epochs 2 and 3 (the last of the first run), and after
    resuming at 4 (a multiple of 2, and the last); not at 1."""
    out, _ = run(tmp_path, "cifar10", "--epochs", "3", "--eval-every", "2")
    out, row = run(tmp_path, "cifar10", "--epochs", "4", "--resume", "auto", "--eval-every", "2")
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3, 4] and (row["epoch"], row["step"]) == (4, 8)
    assert [m["acc1"] is None for m in read_metrics(out)] == [True, False, False, False]
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["config"]["epochs"]) == (4, 8, 4)


@pytest.mark.parametrize("dataset, extra", [("cifar10", []), ("cifar10", ["--gpu-aug"]),
                                            ("stl10", ["--gpu-aug", "--limit=16", "--batch-size=8"])])
def test_resume_is_exact(tmp_path, no_md5, monkeypatch, dataset, extra):
    """Stopping after epoch 1 and resuming gives the same epoch 2 as an uninterrupted run, with either
    pipeline (on the device: every epoch's augmentations are seeded from seed, epoch and rank)."""
    save = train.save_checkpoint

    def save_and_keep(state, path):      # keep a copy of every epoch's checkpoint
        save(state, path)
        save(state, path.replace("last.pt", f"epoch{state['epoch']}.pt"))
    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    a, _ = run(tmp_path, dataset, "--epochs", "2", *extra, out="a")
    b, _ = run(tmp_path, dataset, "--epochs", "2", "--resume", str(a / "epoch1.pt"), *extra, out="b")
    assert json.loads((b / "config.json").read_text())["gpu_aug"] == ("--gpu-aug" in extra)
    (row_a, row_b) = read_metrics(a)[1], read_metrics(b)[0]
    assert row_b["epoch"] == 2 and row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-5)
    state_a, state_b = (torch.load(d / "last.pt", weights_only=True) for d in (a, b))
    for k, v in state_a["model"].items():
        assert torch.allclose(v.float(), state_b["model"][k].float(), atol=1e-5), k


# -----------------------------------------------------------------------------
# Diagnostics: spectrum, collapse monitors, alignment, k-NN, plots
# -----------------------------------------------------------------------------

def test_monitors_of_a_healthy_and_a_collapsed_embedding():
    """Monitors from C's eigenvalues and z_std, against formulas computed here without an
    eigendecomposition where possible: participation ratio = tr(C)^2 / tr(C^2), top share = spectral
    norm / trace; isotropic embeddings are healthy, near-rank-one ones collapsed."""
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(4096, 16, generator=g, dtype=torch.float64)            # isotropic
    direction = torch.randn(16, generator=g, dtype=torch.float64)
    collapsed = (1 + torch.rand(4096, 1, generator=g, dtype=torch.float64)) * direction + \
        1e-3 * torch.randn(4096, 16, generator=g, dtype=torch.float64)          # one direction
    for z, is_collapsed in ((healthy, False), (collapsed, True)):
        C = z.T @ z / len(z)
        s = torch.linalg.eigvalsh(C).flip(0)
        zn = z / z.norm(dim=1, keepdim=True)
        expected_z_std = np.std(zn.numpy(), axis=0, ddof=1).mean() * 4                  # sqrt(16)
        assert train.z_std(z).item() == pytest.approx(expected_z_std, rel=1e-6)
        m = train.monitors(s.tolist(), train.z_std(z).item())
        assert m["participation_ratio"] == pytest.approx((C.trace() ** 2 / (C @ C).trace()).item(), rel=1e-9)
        assert m["top_share"] == pytest.approx((torch.linalg.matrix_norm(C, 2) / C.trace()).item(), rel=1e-9)
        p = s / s.sum()
        assert m["effective_rank"] == pytest.approx(math.exp(-sum(float(q) * math.log(q) for q in p)), rel=1e-9)
        assert m["recruited"] == sum(float(v) > 0.01 * float(s[0]) for v in s)
        assert m["collapsed"] is is_collapsed
    h = train.monitors(torch.linalg.eigvalsh(healthy.T @ healthy / 4096).tolist(), train.z_std(healthy).item())
    assert h["participation_ratio"] > 15 and h["recruited"] == 16 and h["z_std"] == pytest.approx(1, abs=0.02)
    assert h["top_share"] < 0.1 and h["effective_rank"] > 15.5
    c = train.monitors(torch.linalg.eigvalsh(collapsed.T @ collapsed / 4096).tolist(), train.z_std(collapsed).item())
    assert c["participation_ratio"] < 1.01 and c["recruited"] == 1 and c["top_share"] > 0.99 and c["z_std"] < 0.01
    assert train.monitors([0.0] * 4, 0.0)["collapsed"] and train.monitors([1.0, -1e-9], 1.0)["top_share"] == 1.0


def test_spectrum_and_monitors_are_logged(tmp_path, no_md5):
    """spectrum.jsonl: C's eigenvalues every --spectrum-every steps and at every epoch end, equal to
    eigvalsh of the checkpoint's C; metrics rows carry the monitors of the epoch-end spectrum."""
    out, row = run(tmp_path, "cifar10", "--epochs=2", "--limit=12", "--spectrum-every=2")
    spec = read_jsonl(out / "spectrum.jsonl")
    assert [(r["epoch"], r["step"]) for r in spec] == [(1, 2), (1, 3), (2, 4), (2, 6)]
    C = torch.load(out / "last.pt", weights_only=True)["model"]["predictor.C"].double()
    expected = torch.linalg.eigvalsh(C).flip(0)
    np.testing.assert_allclose(spec[-1]["eigenvalues"], expected.numpy(), rtol=1e-6, atol=1e-12)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [3, 6]
    for key in ("participation_ratio", "top_share", "effective_rank", "recruited", "z_std", "collapsed"):
        assert key in row and all(key in m for m in metrics)
    assert row["participation_ratio"] == pytest.approx((expected.sum() ** 2 / (expected ** 2).sum()).item())
    assert 0 < row["z_std"] < 2 and 1 <= row["recruited"] <= 16


def test_linear_predictor_logs_its_alignment_with_C(tmp_path, no_md5):
    """Fig. 4: per epoch, cos(u_i, W_P u_i) for the eigenvectors u_i of C, largest eigenvalue first; a
    learned predictor keeps a running C of its own (the same EMA), saved with the model."""
    out, _ = run(tmp_path, "folder", "--predictor=linear", "--loss=euc")
    (spec,) = read_jsonl(out / "spectrum.jsonl")
    model = torch.load(out / "last.pt", weights_only=True)["model"]
    C, W_P = model["stats.C"].double().numpy(), model["predictor.weight"].double().numpy()
    s, U = np.linalg.eigh(C)
    for i, u in enumerate(U.T[::-1]):                 # largest eigenvalue first
        Wu = W_P @ u
        assert spec["alignment"][i] == pytest.approx(u @ Wu / np.linalg.norm(Wu), abs=1e-6)
    np.testing.assert_allclose(spec["eigenvalues"], s[::-1], rtol=1e-6, atol=1e-12)


def test_knn_accuracy_against_a_naive_loop():
    """Weighted k-NN: every test point scored with a plain Python loop; chunking does not matter."""
    g = torch.Generator().manual_seed(3)
    bank, h = torch.randn(50, 8, generator=g), torch.randn(23, 8, generator=g)
    bank_y, y = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (23,), generator=g)
    cfg = types.SimpleNamespace(knn=7, knn_temperature=0.5)
    hits = 0
    for x, label in zip(h, y):
        sims = [(F.cosine_similarity(x, b, dim=0).item(), int(c)) for b, c in zip(bank, bank_y)]
        votes = [0.0] * 4
        for sim, c in sorted(sims, reverse=True)[:7]:
            votes[c] += math.exp(sim / 0.5)
        hits += votes.index(max(votes)) == label
    expected = 100 * hits / 23
    for chunk in (1, 5, 256):
        assert train.knn_accuracy(bank, bank_y, h, y, 4, cfg, chunk=chunk) == pytest.approx(expected)


def test_knn_monitor_in_metrics_uses_labelled_training_images(tmp_path, no_md5):
    """--knn: knn_acc1 at each evaluation; STL-10's bank holds only the labelled images."""
    out, row = run(tmp_path, "stl10", "--knn", "--limit=16", "--predictor=mlp", "--loss=cos")
    assert read_metrics(out)[0]["knn_acc1"] == row["knn_acc1"]
    cfg = types.SimpleNamespace(**json.loads((out / "config.json").read_text()))
    model = train.Model(cfg, 10)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
    model.eval()
    train_set, val, _ = train.load_datasets(cfg, train.eval_transform(cfg), train.eval_transform(cfg))
    with torch.no_grad():                                          # one image at a time, a naive vote
        bank = [(F.normalize(model.encoder.backbone(x[None]), dim=1)[0], y)
                for x, y in (train_set[i] for i in range(16)) if y >= 0]
        hits = 0
        for x, y in (val[i] for i in range(len(val))):
            h = F.normalize(model.encoder.backbone(x[None]), dim=1)[0]
            nearest = sorted(((float(h @ b), c) for b, c in bank), reverse=True)[:20]
            votes = [sum(math.exp(s / 0.07) for s, c in nearest if c == k) for k in range(10)]
            hits += max(range(10), key=votes.__getitem__) == y
    assert len(bank) == 8 and row["knn_acc1"] == pytest.approx(100 * hits / len(val))
    cfg = config(["--dataset=stl10", f"--data-dir={tmp_path / 'data'}", "--knn=3", "--limit=12", *SMALL])
    loaders, _ = train.build_data(cfg)
    assert list(loaders.bank.dataset.indices) == list(range(8))   # train+unlabeled: 8 labelled first
    x, y = loaders.bank.dataset[3]
    assert x.shape == (3, 96, 96) and y == 3                        # un-augmented, labelled


def test_plot_writes_the_diagnostic_figures(tmp_path, no_md5):
    a, _ = run(tmp_path, "folder", "--predictor=linear", "--loss=cos", "--epochs=2", "--knn", out="a")
    b, _ = run(tmp_path, "folder", "--epochs=2", out="b")
    written = train.main(["--plot", str(a), str(b)])
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["accuracy_monitors.png", "alignment-a.png", "spectrum.png"]
    for p in written:
        assert Image.open(p).size[0] > 300
    with pytest.raises(SystemExit, match="not a run directory"):
        train.main(["--plot", str(tmp_path / "data")])


# -----------------------------------------------------------------------------
# Data on the device (--gpu-aug; on the CPU here) and the benchmark
# -----------------------------------------------------------------------------

def written_training_images(dataset, written, samples):
    """(N, H, W, 3) uint8: the training images as the writers above made them (JPEGs decoded by PIL)."""
    if dataset == "cifar100":
        return written["train"][0]
    if dataset == "stl10":
        return np.concatenate([written["train"][0], written["unlabeled"][0]])
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in samples])


@pytest.mark.parametrize("dataset", ["cifar100", "stl10", "tinyimagenet"])
def test_images_on_the_device_are_the_datasets_images(tmp_path, no_md5, dataset):
    """--gpu-aug holds the uint8 training images and labels as written to disk; evaluation and k-NN bank
    batches made on the device equal the per-image evaluation transform's (bicubic resize to 24 px, crop)."""
    written = WRITERS[dataset](str(tmp_path))
    flags = [f"--dataset={dataset}", f"--data-dir={tmp_path}", *SMALL, "--image-size=24", "--limit=8", "--knn=2"]
    loaders, _ = train.build_data(config([*flags, "--gpu-aug"]))
    cpu_loaders, _ = train.build_data(config([*flags, "--no-gpu-aug"]))
    images, labels = loaders.train.dataset.tensors
    base = cpu_loaders.train.dataset.dataset
    expected = written_training_images(dataset, written, getattr(base, "samples", None))[:8]
    assert images.dtype == torch.uint8 and torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(expected))
    assert labels.tolist() == [cpu_loaders.train.dataset[i][1] for i in range(8)]
    for name in ("eval", "bank"):
        (x_dev, y_dev), (x_cpu, y_cpu) = next(iter(getattr(loaders, name))), next(iter(getattr(cpu_loaders, name)))
        assert torch.equal(y_dev, y_cpu) and x_dev.shape == x_cpu.shape == (len(y_cpu), 3, 24, 24)
        torch.testing.assert_close(x_dev, x_cpu, rtol=0, atol=1e-5)


def forward_flops_per_image(cfg):
    """Multiply-adds x 2 of every Conv2d and Linear of the encoder, from their output shapes (one image)."""
    model, flops = train.Encoder(cfg), []

    def count(m, i, o):
        fan_in = m.in_features if isinstance(m, torch.nn.Linear) else m.in_channels * math.prod(m.kernel_size)
        flops.append(2 * o[0].numel() * fan_in)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(count)
    model(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    return sum(flops)


def test_bench_runs_on_the_cpu_and_counts_the_steps_flops(tmp_path):
    """bench.json as returned; the step's FLOPs per image are about 8 encoder forward passes: for each of
    the two views a forward and a backward (twice a forward), and the EMA target's forward."""
    out = tmp_path / "bench"
    argv = ["--dataset=cifar10", "--batch-size=8", "--proj-hidden=32", "--proj-dim=16", "--workers=0",
            "--device=cpu", "--image-size=16"]
    result = train.main([*argv, "--bench", f"--out={out}"])
    saved = json.loads((out / "bench.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["gflop_per_image"] * 1e9 / forward_flops_per_image(config(argv)) == pytest.approx(8, rel=0.02)
    assert all(v > 0 for v in (saved["per_image_ips"], saved["batched_ips"], saved["peak_tflops"]))
    assert {"cpu float32", "cpu float64"} <= set(saved["eigh_ms"])


# -----------------------------------------------------------------------------
# Distributed: 2 CPU processes (gloo) against one process with the whole batch
# -----------------------------------------------------------------------------

DDP_FLAGS = ["--dataset=cifar10", "--image-size=16", "--proj-hidden=32", "--proj-dim=16", "--batch-size=8",
             "--workers=0", "--log-every=1", "--device=cpu", "--limit=16"]


DDP_TIMEOUT = datetime.timedelta(seconds=60)     # per collective; gloo's default is 30 minutes


def fixed_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 10


def steps_on_fixed_tensors(cfg, rank=0, world=1, steps=2):
    """Two training steps on the fixed global batch (this process's share of it); the model afterwards."""
    run_, _ = train.setup(cfg)
    x1, x2, y = fixed_batch()
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    for _ in range(steps):
        train.set_lr(run_.opt, cfg.warmup_steps, cfg)
        train.train_step(run_, x1[share], x2[share], y[share], cfg, 0.99)
    return dict(model=run_.model.state_dict(), target=run_.target.state_dict())


class AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    backward = forward


class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU processes (torch's runs on GPUs only): sums of x, x^2 all-reduced."""

    def forward(self, x):
        assert self.training                    # the fixed steps below never evaluate
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * torch.distributed.get_world_size()
        s = AllReduceSum.apply(torch.stack([x.sum(dims), (x * x).sum(dims)])) / n   # (2, C): E[x], E[x^2]
        mean, var = s[0], s[1] - s[0] ** 2
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)            # unbiased, as BatchNorm's
            self.num_batches_tracked += 1
        y = (x - mean.view(shape)) * (var.view(shape) + self.eps).rsqrt()
        return y * self.weight.view(shape) + self.bias.view(shape)


def cpu_sync_batchnorm(module, cfg):
    """What train.sync_batchnorm does on GPUs, for CPU processes: every BatchNorm synchronised."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync.requires_grad_(child.weight.requires_grad))
        else:
            cpu_sync_batchnorm(child, cfg)
    return module


def ddp_worker(rank, world, data, out):
    """One torchrun process. The process group meets through a file (no port to race for) and every
    collective times out after DDP_TIMEOUT: a rank left waiting alone fails the test instead of hanging.
    train.init_distributed then finds the group joined."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                                         world_size=world, timeout=DDP_TIMEOUT)
    cfg = train.get_config([*DDP_FLAGS, f"--data-dir={data}", f"--out={out}/unused"])
    train.init_distributed(cfg)
    own, train.sync_batchnorm = train.sync_batchnorm, cpu_sync_batchnorm    # GPUs' synchronised BatchNorm
    torch.save(steps_on_fixed_tensors(cfg, rank, world), f"{out}/rank{rank}.pt")
    train.sync_batchnorm = own                                           # the loop: train.py's CPU setting
    seeds, views = [], train.batch_two_views                     # each rank's augmentation seeds (--gpu-aug)
    train.batch_two_views = lambda x, *a: seeds.append(a[-1].initial_seed()) or views(x, *a)
    train.main([*DDP_FLAGS, f"--data-dir={data}", f"--out={out}/run", "--epochs=1", "--gpu-aug"])  # the loop,
    train.main([*DDP_FLAGS, f"--data-dir={data}", f"--out={out}/run", "--epochs=2", "--resume=auto"])  # resumed
    train.batch_two_views = views
    (out / f"seeds{rank}.json").write_text(json.dumps(seeds))
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process_with_the_whole_batch(tmp_path, no_md5):
    """torchrun's setting on 2 CPU processes (gloo): DDP, synchronised BatchNorm (as on GPUs, through the
    test's CPUSyncBatchNorm), C averaged over the processes. Both hold the same parameters and C, equal
    to one process's after the same steps on the whole batch; the loop runs (with either data pipeline),
    rank 0 alone writes, and --resume continues."""
    import torch.multiprocessing as mp
    write_cifar(str(tmp_path / "data"), per_batch=4)
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "data"), tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = steps_on_fixed_tensors(config([*DDP_FLAGS, f"--data-dir={tmp_path / 'data'}"]))
    for part in ("model", "target"):
        for k, v in single[part].items():
            assert torch.equal(ranks[0][part][k], ranks[1][part][k]), k                # identical ranks
            tol = dict(rtol=1e-4, atol=1e-5) if v.is_floating_point() else dict(rtol=0, atol=0)
            torch.testing.assert_close(ranks[0][part][k], v, **tol, msg=k)            # = one process
    assert not torch.equal(single["model"]["predictor.C"], torch.zeros(16, 16))
    rows = read_metrics(tmp_path / "run")
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 2), (2, 4)]               # 16 images / 8 per step
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["world_size"], cfg["batch_size"]) == (2, 8)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2
    seeds = [json.loads((tmp_path / f"seeds{r}.json").read_text()) for r in range(2)]
    assert len(seeds[0]) == 2 and not set(seeds[0]) & set(seeds[1])       # the ranks' views differ


def test_batchnorm_is_synchronised_on_gpus_and_per_process_on_cpus():
    cfg = config(DDP_FLAGS)
    cfg.world_size = 2
    for device, synchronised in (("cpu", False), ("cuda:0", True)):
        cfg.device = device
        for net in train.build_model(cfg, 10):
            norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            assert len(norms) >= 20
            assert all(isinstance(m, torch.nn.SyncBatchNorm) == synchronised for m in norms)


# -----------------------------------------------------------------------------
# Crashes: one line, a "crashed" row, the last good checkpoint kept, exit code 3
# -----------------------------------------------------------------------------

def test_diverging_lr_crashes_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, no_md5, capsys):
    out, _ = run(tmp_path, "cifar10", "--no-ema")                     # epoch 1 at the default lr
    good = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "cifar10", "--no-ema", "--epochs=3", "--lr=1e30", "--resume=auto")
    assert e.value.code == train.CRASHED == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("train.py: error: crashed at epoch 2, step ")
    assert "non-finite" in err and "epoch 1" in err
    last = read_metrics(out)[-1]
    assert last["crashed"] is True and last["epoch"] == 2 and last["step"] in (3, 4)
    assert f"step {last['step']}:" in err and (out / "last.pt").read_bytes() == good


def test_a_diverging_learned_predictor_crashes_at_the_first_non_finite_step(tmp_path, no_md5, capsys):
    """--predictor mlp has no eigendecomposition to fail: the non-finite watch alone stops the run, at
    step 2 (step 1's lr 1e30 update makes the embeddings of step 2 non-finite), with exit code 3."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "cifar10", "--predictor=mlp", "--loss=cos", "--no-ema", "--lr=1e30", "--warmup-epochs=0")
    assert e.value.code == train.CRASHED
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("train.py: error: crashed at epoch 1, step 2: non-finite")
    (row,) = read_metrics(tmp_path / "run")
    assert row == dict(epoch=1, step=2, crashed=True, reason="non-finite loss, embedding, C") and row["reason"] in err


def test_watch_names_the_first_non_finite_step_and_what_was_not_finite():
    run_ = types.SimpleNamespace(bad=torch.zeros((), dtype=torch.long), step=0)
    ok, nan = torch.ones(3), torch.tensor([1.0, float("nan")])
    for step, (loss, z, C) in enumerate([(ok, ok, ok), (ok, nan, ok), (nan, ok, nan)]):
        run_.step = step
        train.watch(run_, loss, z, C)
        if step == 0:
            train.check_finite(run_)                                 # all finite so far: no Crash
    with pytest.raises(train.Crash, match="^non-finite embedding$") as e:
        train.check_finite(run_)
    assert e.value.step == 2                                         # the first bad step, counted from 1


def test_the_earliest_non_finite_step_of_any_process_is_reported(monkeypatch):
    """Under torchrun check_finite reduces run.bad over the processes: the earliest bad step wins, with
    that process's own reasons; a process whose steps were all finite does not hide the others'."""
    ok, nan = torch.ones(3), torch.tensor([float("nan")])
    ranks = []
    for bad_steps in ({}, {4: (ok, nan, ok)}, {2: (nan, ok, ok)}):       # step -> (loss, z, C)
        r = types.SimpleNamespace(bad=torch.zeros((), dtype=torch.long), step=0)
        for step in range(6):
            r.step = step
            train.watch(r, *bad_steps.get(step, (ok, ok, ok)))
        ranks.append(r)
    others = [r.bad for r in ranks[1:]]

    def all_reduce(t, op):                  # rank 0 (all finite): gloo's MIN over the three processes
        assert op == torch.distributed.ReduceOp.MIN
        t.copy_(torch.stack([t] + [torch.where(b > 0, b, torch.iinfo(b.dtype).max) for b in others]).min())
    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "all_reduce", all_reduce)
    with pytest.raises(train.Crash, match="^non-finite loss$") as e:
        train.check_finite(ranks[0])
    assert e.value.step == 3                                         # step index 2, counted from 1


def test_crash_as_a_process_prints_one_line_and_exits_3(tmp_path):
    write_cifar(str(tmp_path / "data"))
    code = ("import sys, torchvision, train; "
            "torchvision.datasets.cifar.check_integrity = lambda *a, **k: True; train.main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code, "--dataset=cifar10", f"--data-dir={tmp_path / 'data'}",
                             f"--out={tmp_path / 'run'}", "--image-size=16", "--limit=8", *SMALL, "--no-ema",
                             "--lr=1e30", "--warmup-epochs=0"],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "no epoch finished" in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_eigh_failing_in_float32_is_retried_and_a_nan_C_crashes(tmp_path, no_md5):
    """A finite C whose float32 eigh returns inf (eigenvalues beyond float32's range) trains on (the
    retry in float64 of isoloss._eigh); a NaN in C stops the epoch with a Crash naming C."""
    write_cifar(str(tmp_path))
    cfg = config(["--dataset=cifar10", f"--data-dir={tmp_path}", "--image-size=16", *SMALL, "--limit=8",
                  f"--out={tmp_path / 'run'}", "--tau=0.999999"])
    run_, loaders = train.setup(cfg)
    C = run_.model.predictor.C
    C.copy_(torch.full((16, 16), 3e38) + torch.eye(16) * 1e37)
    assert not torch.isfinite(torch.linalg.eigvalsh(C)).all()
    row = train.train_epoch(run_, loaders, cfg)
    assert math.isfinite(row["loss"]) and run_.step == 2 and torch.isfinite(C).all()
    C[0, 0] = float("nan")
    with pytest.raises(train.Crash, match="non-finite C") as e:
        train.train_epoch(run_, loaders, cfg)
    assert e.value.step == 3


# -----------------------------------------------------------------------------
# Bad inputs: one-line errors, no traceback
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, missing", [
    ("cifar10", "cifar-10-batches-py/data_batch_1"), ("cifar100", "cifar-100-python/train"),
    ("stl10", "stl10_binary/train_X.bin"), ("tinyimagenet", "tiny-imagenet-200/train"), ("folder", "train")])
def test_missing_data_names_the_file(tmp_path, dataset, missing):
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", dataset, "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    msg = str(e.value.code)
    assert os.path.join(str(tmp_path), missing) in msg and "\n" not in msg
    assert ("--download" in msg) == (dataset != "folder")
    assert not (tmp_path / "run").exists()


def test_md5_check_is_kept(tmp_path):
    write_cifar(str(tmp_path))               # generated files: torchvision's md5 check must reject them
    with pytest.raises(SystemExit, match="md5"):
        train.main(["--dataset=cifar10", f"--data-dir={tmp_path}", f"--out={tmp_path / 'run'}"])


def corrupt_images(root):
    """A folder tree whose image files hold garbage."""
    write_folder(str(root))
    for path in root.rglob("*.png"):
        path.write_bytes(b"not an image" * 10)
    return ["--dataset=folder"]


def truncated_cifar(root):
    write_cifar(str(root))
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:1000])
    return []


def garbage_checkpoint(root):
    (root / "garbage.pt").write_bytes(os.urandom(2000))
    return [f"--resume={root / 'garbage.pt'}"]


def truncated_checkpoint(root):
    torch.save(dict(model={"w": torch.randn(100, 100)}, epoch=1, step=2, config={}), root / "ckpt.pt")
    data = (root / "ckpt.pt").read_bytes()
    (root / "ckpt.pt").write_bytes(data[:len(data) // 2])
    return [f"--resume={root / 'ckpt.pt'}"]


def out_is_a_file(root):
    (root / "run").write_text("my notes")
    return []


def existing_run(root):
    (root / "run").mkdir()
    (root / "run" / "last.pt").write_bytes(b"a finished run")
    return []


BAD_INPUTS = [  # (name, argv or a function(root) -> argv that prepares the files, exit code, message)
    # the 13 that ended in a traceback or were accepted
    ("corrupt image files", corrupt_images, 1, "cannot read the first training image"),
    ("truncated CIFAR batch", truncated_cifar, 1, "cannot load the data"),
    ("--alpha -1", ["--alpha=-1"], 2, "--alpha must be >= 0"),
    ("--eps -0.5", ["--eps=-0.5"], 2, "--eps must be >= 0"),
    ("--lr -1", ["--lr=-1"], 2, "--lr must be > 0"),
    ("--image-size 0", ["--image-size=0"], 2, "--image-size must be >= 8"),
    ("--workers -1", ["--workers=-1"], 2, "--workers must be >= 0"),
    ("--proj-dim 0", ["--proj-dim=0"], 2, "--proj-dim must be >= 1"),
    ("--device tpu9", ["--device=tpu9"], 2, "--device tpu9"),
    ("--resume garbage", garbage_checkpoint, 1, "not a train.py checkpoint, or a truncated one"),
    ("--resume truncated", truncated_checkpoint, 1, "not a train.py checkpoint, or a truncated one"),
    ("--out is a file", out_is_a_file, 2, "is a file, not a directory"),
    ("--lr nan", ["--lr=nan"], 2, "--lr must be > 0"),
    # and those handled before
    ("learned predictor with IsoLoss", ["--predictor=mlp", "--loss=iso_cos"], 2, "needs --predictor closed"),
    ("batch larger than the data", ["--batch-size=64"], 1, "fewer than one batch"),
    ("--resume of a missing file", ["--resume=nowhere/last.pt"], 1, "no such file"),
    ("existing run", existing_run, 1, "already holds a run"),
    ("--epochs 0", ["--epochs=0"], 2, "--epochs must be >= 1"),
    ("--ema 1", ["--ema=1"], 2, "--ema must be in [0, 1)"),
    ("--tau 1.5", ["--tau=1.5"], 2, "--tau must be in [0, 1)"),
    ("--warmup-epochs > --epochs", ["--epochs=2", "--warmup-epochs=3"], 2, "must not exceed --epochs"),
    ("--knn 0", ["--knn=0"], 2, "--knn must be >= 1"),
    ("--download with folder", ["--dataset=folder", "--download"], 2, "--download is not available"),
    ("--device cuda:99", ["--device=cuda:99"], 2, "--device cuda:99"),
    ("--gpu-aug with folder", ["--dataset=folder", "--gpu-aug"], 2, "--gpu-aug needs images of one size"),
    ("--amp fp16 on a CPU", ["--amp=fp16"], 2, "--amp fp16 needs CUDA"),
]


@pytest.mark.parametrize("name, prepare, code, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(tmp_path, no_md5, capsys, name, prepare, code, message):
    """One `train.py: error:` line (after argparse's usage for exit code 2), a non-zero exit code, no
    traceback (the only exception is SystemExit), and nothing written or overwritten."""
    write_cifar(str(tmp_path))
    extra = prepare(tmp_path) if callable(prepare) else prepare
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["--dataset=cifar10", f"--data-dir={tmp_path}", f"--out={tmp_path / 'run'}", "--image-size=16",
            *SMALL, *extra]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    if code == 2:
        assert e.value.code == 2 and err[-1].startswith("train.py: error:") and message in err[-1]
        assert all(line.startswith(("usage:", " ")) for line in err[:-1])
    else:
        msg = str(e.value.code)
        assert msg.startswith("train.py: error:") and "\n" not in msg and message in msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, env, message", [
    (["--resume=auto"], {}, "--resume auto needs --out DIR (the run directory to continue)"),
    ([], {"WORLD_SIZE": "3"}, "--batch-size 4 (the global batch) must be divisible by the 3 processes")])
def test_settings_that_need_another_setting(tmp_path, monkeypatch, capsys, argv, env, message):
    """Checks that the table above cannot reach (it always passes --out, and one process)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset=cifar10", f"--data-dir={tmp_path}", *SMALL, *argv])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == f"train.py: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--dataset", "tinyimagenet",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "tiny-imagenet-200" in result.stderr
