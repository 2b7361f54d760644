"""Tests for train.py: CPU only, seconds, on small files that the tests write in the real on-disk formats.

torchvision checks the md5 sums of the CIFAR and STL-10 files; the `no_md5` fixture lets the generated
files through for the tests (train.py itself never skips that check: see test_md5_check_is_kept).
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import isoloss
import train

HERE = os.path.dirname(os.path.abspath(__file__))
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
    """The resolved config train.main would use for `argv`."""
    return train.get_config(argv)


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


def read_metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


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
        L = train.ssl_loss(model, z1, z2, z1_t, z2_t, cfg)
        C = 0.998 ** 2 * torch.eye(6) + (1 - 0.998 ** 2) * torch.cat([z1, z2]).T @ torch.cat([z1, z2]) / 16
        assert torch.allclose(model.predictor.C, C, atol=1e-6)
        W_P, _ = isoloss.predictor(C, 0.5, 0.0)
        p1, p2 = z1 @ W_P, z2 @ W_P                                # W_P is symmetric
        if loss.endswith("euc"):   # the value of the Euclidean IsoLoss equals that of L_euc
            expected = ((p1 - z2_t) ** 2).sum(1).mean() + ((p2 - z1_t) ** 2).sum(1).mean()
        elif loss == "cos":
            expected = -2 * (F.cosine_similarity(p1, z2_t).mean() + F.cosine_similarity(p2, z1_t).mean())
        else:
            continue
        assert torch.allclose(L, expected, atol=1e-5), loss
    cfg = config(["--dataset=cifar10", "--predictor=mlp", "--loss=cos", "--proj-dim=6", "--pred-hidden=8"])
    model, _ = train.build_model(cfg, 10)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    expected = -2 * (F.cosine_similarity(p1, z2_t).mean() + F.cosine_similarity(p2, z1_t).mean())
    assert torch.allclose(train.ssl_loss(model, z1, z2, z1_t, z2_t, cfg), expected, atol=1e-5)


@pytest.mark.parametrize("loss", ["iso_euc", "iso_cos"])
def test_iso_loss_gradient_is_straight_through(loss):
    """The z1-gradient of the training loss with IsoLoss equals the gradient of the base loss (same
    scale) with respect to the prediction p = W_P z1 (Eqs. 15, 17): the predictor is skipped backwards."""
    torch.manual_seed(1)
    z1, z2, z1_t, z2_t = torch.randn(4, 8, 6).unbind(0)
    z1.requires_grad_(True)
    cfg = config(["--dataset=cifar10", f"--loss={loss}", "--proj-dim=6", "--proj-hidden=8"])
    model, _ = train.build_model(cfg, 10)
    train.ssl_loss(model, z1, z2, z1_t, z2_t, cfg).backward()       # only view order 1 involves z1
    W_P, _ = model.predictor()
    p = (z1.detach() @ W_P).requires_grad_(True)
    base = ((p - z2_t) ** 2).sum(1).mean() if loss == "iso_euc" else -2 * F.cosine_similarity(p, z2_t).mean()
    base.backward()
    assert torch.allclose(z1.grad, p.grad, atol=1e-6)


def test_probe_ignores_unlabelled_images():
    probe = torch.nn.Linear(3, 4)
    h = torch.randn(2, 3)
    y = torch.tensor([2, -1])
    expected = F.cross_entropy(probe(h[:1]), y[:1])        # both views carry the same labelled logits
    assert torch.allclose(train.probe_loss(probe, h, h, y), expected)
    assert train.probe_loss(probe, h, h, torch.tensor([-1, -1])).item() == 0.0   # not NaN


def test_lars_matches_formula_and_sgd():
    torch.manual_seed(2)
    w, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    w_ref, b_ref = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    opt = train.LARS([dict(params=[w], weight_decay=1e-2), dict(params=[b], weight_decay=0.0, lars=False)],
                     lr=0.5, momentum=0.9, eta=0.02)
    sgd = torch.optim.SGD([b_ref], lr=0.5, momentum=0.9)
    buf = None
    for _ in range(3):
        for t in (w, b, b_ref):
            t.grad = None
        g = torch.randn(5, 3)
        w.grad, b.grad, b_ref.grad = g.clone(), g[:, 0].clone(), g[:, 0].clone()
        w0 = w.detach().clone()
        r = min(0.02 * w0.norm() / (g.norm() + 1e-2 * w0.norm()) / 0.5, 1.0)    # clipped trust ratio
        d = r * (g + 1e-2 * w0)
        buf = d if buf is None else 0.9 * buf + d
        opt.step()
        sgd.step()
        assert torch.allclose(w.detach(), w0 - 0.5 * buf, atol=1e-6)
        assert torch.allclose(b, b_ref)


def test_param_groups_exclude_biases_norms_and_probe():
    cfg = config(["--dataset=cifar10", "--proj-hidden=8", "--proj-dim=4", "--batch-size=512"])
    model, _ = train.build_model(cfg, 10)
    weights, bias_norm, probe = train.build_optimizer(model, cfg).param_groups
    assert weights["lars"] and weights["weight_decay"] == 1e-4 and weights["base_lr"] == 2.0
    assert not bias_norm["lars"] and bias_norm["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in bias_norm["params"]) and all(p.ndim > 1 for p in weights["params"])
    assert not probe["lars"] and probe["weight_decay"] == 0.0 and probe["base_lr"] == 0.2
    assert len(probe["params"]) == 2
    sgd = config(["--dataset=cifar10", "--no-ema", "--predictor=mlp", "--loss=cos"])
    assert (sgd.optimizer, sgd.lr, sgd.wd, sgd.tau) == ("sgd", 0.1, 1e-5, 0.5)


def test_schedules():
    cfg = config(["--dataset=cifar10"])
    cfg.steps_per_epoch, cfg.total_steps, cfg.warmup_steps = 10, 10_000, 100
    assert cfg.warmup_epochs == 10 and train.lr_at(0, 1.0, cfg) == pytest.approx(3e-5)
    assert train.lr_at(50, 1.0, cfg) == pytest.approx((3e-5 + 1) / 2)
    assert train.lr_at(100, 1.0, cfg) == pytest.approx(1.0)
    assert train.lr_at(5050, 1.0, cfg) == pytest.approx(0.5)
    assert train.lr_at(9999, 1.0, cfg) < 1e-6
    assert train.ema_at(0, cfg) == pytest.approx(0.99) and train.ema_at(5000, cfg) == pytest.approx(0.995)
    assert train.ema_at(10_000, cfg) == pytest.approx(1.0)
    assert config(["--dataset=cifar10", "--epochs=30"]).warmup_epochs == 3
    assert config(["--dataset=cifar10", "--epochs=5"]).warmup_epochs == 0


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


@pytest.mark.parametrize("dataset, extra", RUNS, ids=[" ".join([d, *e]) for d, e in RUNS])
def test_short_run_writes_outputs(tmp_path, no_md5, dataset, extra):
    out, row = run(tmp_path, dataset, *extra)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == dataset and cfg["steps_per_epoch"] == 2 == cfg["limit"] // cfg["batch_size"]
    assert cfg["optimizer"] == ("sgd" if "--no-ema" in extra else "lars")
    (line,) = read_metrics(out)
    assert {"epoch", "step", "loss", "acc1", "lr", "seconds"} <= set(line) and line == row
    assert (line["epoch"], line["step"]) == (1, 2) and np.isfinite(line["loss"]) and 0 <= line["acc1"] <= 100
    state = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "target", "optimizer", "epoch", "step", "rng", "config"} <= set(state)
    assert (state["target"] is None) == ("--no-ema" in extra)
    if cfg["predictor"] == "closed":
        C = state["model"]["predictor.C"]
        assert C.dtype == torch.float32 and C.shape == (16, 16) and C.abs().sum() > 0
        assert torch.allclose(C, C.T) and not C.requires_grad


def test_limit_and_training_changes_weights(tmp_path, no_md5):
    """--limit 12 at batch 4 is 3 steps; the EMA target trails the online network."""
    out, _ = run(tmp_path, "cifar10", "--limit", "12")
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3
    w, w_t = state["model"]["encoder.projector.3.weight"], state["target"]["projector.3.weight"]
    assert not torch.equal(w, w_t)


def test_eval_does_not_move_C(tmp_path, no_md5):
    write_cifar(str(tmp_path))
    cfg = config(["--dataset=cifar10", f"--data-dir={tmp_path}", "--image-size=16", *SMALL])
    run_, _, eval_loader = train.setup(cfg)
    run_.model.predictor.C.fill_(0.5)
    train.evaluate(run_.model, eval_loader, cfg)
    assert torch.equal(run_.model.predictor.C, torch.full((16, 16), 0.5))


def test_resume_continues_from_saved_epoch(tmp_path, no_md5):
    out, _ = run(tmp_path, "cifar10", "--epochs", "2")
    out, row = run(tmp_path, "cifar10", "--epochs", "3", "--resume", "auto")
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3] and (row["epoch"], row["step"]) == (3, 6)
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["config"]["epochs"]) == (3, 6, 3)


def test_resume_is_exact(tmp_path, no_md5, monkeypatch):
    """Stopping after epoch 1 and resuming gives the same epoch 2 as an uninterrupted run."""
    save = train.save_checkpoint

    def save_and_keep(state, path):      # keep a copy of every epoch's checkpoint
        save(state, path)
        save(state, path.replace("last.pt", f"epoch{state['epoch']}.pt"))
    monkeypatch.setattr(train, "save_checkpoint", save_and_keep)
    a, _ = run(tmp_path, "cifar10", "--epochs", "2", out="a")
    b, _ = run(tmp_path, "cifar10", "--epochs", "2", "--resume", str(a / "epoch1.pt"), out="b")
    (row_a, row_b) = read_metrics(a)[1], read_metrics(b)[0]
    assert row_b["epoch"] == 2 and row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-5)
    state_a, state_b = (torch.load(d / "last.pt", weights_only=True) for d in (a, b))
    for k, v in state_a["model"].items():
        assert torch.allclose(v.float(), state_b["model"][k].float(), atol=1e-5), k


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


@pytest.mark.parametrize("argv, match", [
    (["--predictor=mlp", "--loss=iso_cos"], None),                    # argparse error, exit code 2
    (["--batch-size=64"], "fewer than one batch"),
    (["--resume", "nowhere/last.pt"], "no such file"),
])
def test_bad_inputs(tmp_path, no_md5, capsys, argv, match):
    write_cifar(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset=cifar10", f"--data-dir={tmp_path}", f"--out={tmp_path / 'run'}", *argv])
    if match is None:
        assert e.value.code == 2 and "needs --predictor closed" in capsys.readouterr().err
    else:
        assert match in str(e.value.code)


def test_existing_run_is_not_overwritten(tmp_path, no_md5):
    out, _ = run(tmp_path, "cifar10")
    with pytest.raises(SystemExit, match="--resume auto"):
        run(tmp_path, "cifar10")


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--dataset", "tinyimagenet",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "tiny-imagenet-200" in result.stderr
