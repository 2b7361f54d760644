"""Self-supervised ResNet pretraining with an online linear probe, for every method of Tables 2 and 3 of

    Halvagal, Laborieux & Zenke, "Implicit variance regularization in non-contrastive SSL", NeurIPS 2023.

One file, read top to bottom: config -> model -> the loss step -> optimiser and schedules -> loop and
main -> evaluation and diagnostics -> data per image -> data on the device -> distributed (torchrun,
opt-in) -> checkpointing -> --plot, --table, --bench. The setup follows Appendix D and Table 4 of the
paper and its reference code (solo-learn configs and run script); every departure says so where it
happens. README.md gives the command of each row of the tables, the outputs, the exit codes and torchrun.
"""
import argparse
import copy
import datetime
import json
import math
import numbers
import os
import random
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset
from torchvision.transforms import v2

import isoloss


# ---- Config ----

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = {
    # crop, stem, blur: Table 4; classes: None = read from the folders. mean/std: solo-learn's constants:
    # CIFAR-10/100 training-set statistics, STL-10 CIFAR-10's (rounded), the others ImageNet's.
    "cifar10": dict(crop=32, stem="3x3", blur=False, classes=10,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(crop=32, stem="3x3", blur=False, classes=100,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "stl10": dict(crop=96, stem="7x7-maxpool", blur=True, classes=10,
                  mean=(0.4914, 0.4823, 0.4466), std=(0.247, 0.243, 0.261)),
    "tinyimagenet": dict(crop=64, stem="3x3-maxpool", blur=False, classes=None,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "folder": dict(crop=224, stem=None, blur=None, classes=None,  # stem, blur: from --image-size
                   mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
# ResNet stem, Table 4: (first conv kernel, its stride, first max-pool). "7x7-maxpool" is torchvision's
# standard stem; "3x3" is SimCLR's CIFAR stem (cited in App. D).
STEMS = {"3x3": (3, 1, False), "3x3-maxpool": (3, 1, True), "7x7-maxpool": (7, 2, True)}
LOSSES = ("euc", "cos", "iso_euc", "iso_cos")
IN_MEMORY = ("cifar10", "cifar100", "stl10", "tinyimagenet")    # datasets that --gpu-aug holds on the device
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def fail(msg):
    """Stop with a one-line error and exit code 1, no traceback."""
    raise SystemExit(f"train.py: error: {msg}")


def last_line(e):
    """The last line of an exception's text (a DataLoader worker's error carries its traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def parser():
    """The command line. Defaults are the paper's (App. D); None means 'resolved from other settings'."""
    p = argparse.ArgumentParser(prog="train.py", description="Self-supervised ResNet pretraining with an "
                                "online linear probe: BYOL, SimSiam, DirectPred, DirectCopy, IsoLoss (NeurIPS 2023).")
    a = p.add_argument
    a("--dataset", choices=list(DATASETS), help="required, except with --plot")
    a("--data-dir", default="./data", help="holds cifar-10-batches-py/, cifar-100-python/, stl10_binary/ "
      "or tiny-imagenet-200/; for folder: train/<class>/* and val/<class>/* (default %(default)s)")
    a("--download", action="store_true", help="download cifar10/cifar100/stl10/tinyimagenet if missing")
    a("--image-size", type=int, help="crop size (default: Table 4's; 224 for folder)")
    a("--limit", type=int, help="use only the first N training images (quick runs, CPU)")
    a("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    a("--stem", default="auto", choices=["auto", *STEMS], help="auto: Table 4's (folder: by image size)")
    a("--proj-hidden", type=int, default=4096, help="projector hidden units (%(default)s, App. D)")
    a("--proj-dim", type=int, default=256, help="projector output size M (%(default)s, App. D)")
    a("--pred-hidden", type=int, default=4096, help="hidden units of the mlp predictor (%(default)s)")
    a("--predictor", default="closed", choices=["closed", "mlp", "linear"],
      help="closed: W_P from C (Eq. 1, default); mlp: BYOL's; linear: a trained matrix")
    a("--loss", default="iso_cos", choices=LOSSES, help="Table 1 (default %(default)s)")
    a("--alpha", type=float, default=0.5, help="exponent of Eq. 1: DirectPred 0.5 (default), DirectCopy 1")
    a("--eps", type=float, default=0.0, help="added to the normalised eigenvalues: DirectCopy 0.25")
    a("--tau", type=float, help="EMA factor of C (default 0.998; 0.5 without EMA target)")
    a("--ema", type=float, default=0.99, help="target momentum at step 0, cosine to 1 (%(default)s)")
    a("--no-ema", dest="ema", action="store_const", const=0.0, help="target = online network (= --ema 0)")
    a("--optimizer", default="auto", choices=["auto", "lars", "sgd"], help="auto: LARS with EMA, else SGD")
    a("--lr", type=float, help="base lr at batch 256, scaled by batch/256 (default 1.0 LARS, 0.1 SGD)")
    a("--wd", type=float, help="weight decay (default 1e-4 closed predictor, 1e-5 learned ones)")
    a("--probe-lr", type=float, default=0.1, help="base lr of the probe at batch 256 (%(default)s)")
    a("--momentum", type=float, default=0.9, help="SGD/LARS momentum (%(default)s)")
    a("--lars-eta", type=float, default=0.02, help="LARS trust coefficient (%(default)s)")
    a("--warmup-epochs", type=float, help="lr warm-up; 0: none (default: 10, App. D; short runs: fewer)")
    a("--warmup-start-lr", type=float, default=3e-5, help="solo-learn's warmup_start_lr (%(default)s)")
    a("--epochs", type=int, default=1000, help="(default %(default)s)")
    a("--batch-size", type=int, default=256, help="(default %(default)s)")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data workers (default %(default)s)")
    a("--gpu-aug", action=argparse.BooleanOptionalAction, help="hold the images on the training device and "
      f"make both views there, a batch at once (default: on CUDA for {', '.join(IN_MEMORY)})")
    a("--seed", type=int, default=0, help="(default %(default)s)")
    a("--device", default="auto", help="auto (default): cuda if available, else cpu")
    a("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], help="autocast: bf16 (default if given "
      "without a value), or fp16 with a GradScaler (CUDA only); C, W_P and the losses stay float32")
    a("--eval-every", type=int, default=1, help="epochs between probe evaluations; 0: only at the end")
    a("--knn", type=int, nargs="?", const=20, metavar="K", help="also report weighted k-NN top-1 accuracy "
      "on backbone features at each evaluation (K neighbours, default 20 if given without a value)")
    a("--knn-temperature", type=float, default=0.07, help="k-NN vote weights exp(cos / T) (%(default)s)")
    a("--spectrum-every", type=int, help="also log C's eigenvalues every N steps (always: at epoch ends)")
    a("--log-every", type=int, default=50, help="steps between progress lines (default %(default)s)")
    a("--out", help="run directory (default runs/<dataset>-<loss>-<time>)")
    a("--resume", help="a last.pt to continue from, or 'auto': <out>/last.pt if it exists")
    a("--bench", action="store_true", help="time augmentations and step, write bench.json into --out, exit")
    a("--plot", nargs="+", metavar="RUN_DIR", help="draw the runs' diagnostics into the first RUN_DIR, exit")
    a("--table", nargs="+", metavar="RUN_DIR", help="tabulate the runs' probe top-1 as Tables 2, 3; exit")
    return p


# Ranges of the numeric options: (lowest, highest, whether the lowest is allowed). None: unbounded.
RANGES = {"epochs": (1, None, True), "batch_size": (2, None, True), "limit": (1, None, True),
          "image_size": (8, None, True), "proj_hidden": (1, None, True), "proj_dim": (1, None, True),
          "pred_hidden": (1, None, True), "alpha": (0, None, True), "eps": (0, None, True),
          "tau": (0, 1, True), "ema": (0, 1, True), "lr": (0, None, False), "wd": (0, None, True),
          "probe_lr": (0, None, True), "momentum": (0, 1, True), "lars_eta": (0, None, False),
          "warmup_epochs": (0, None, True), "warmup_start_lr": (0, None, True), "workers": (0, None, True),
          "eval_every": (0, None, True), "knn": (1, None, True), "knn_temperature": (0, None, False),
          "spectrum_every": (1, None, True), "log_every": (1, None, True)}


def check_args(p, args):
    """Reject bad or inconsistent settings with a one-line argparse error (exit code 2)."""
    if args.dataset is None:
        p.error("the following arguments are required: --dataset (or --plot / --table RUN_DIR)")
    for key, (low, high, closed) in RANGES.items():
        v = getattr(args, key)
        if v is not None and (not low <= v < (high or math.inf) or v == low and not closed):   # NaN too
            bound = (f"in [{low}, {high})" if high is not None else f"{'>=' if closed else '>'} {low}")
            p.error(f"--{key.replace('_', '-')} must be {bound}, not {v}")
    if args.predictor != "closed" and args.loss.startswith("iso_"):
        p.error(f"--loss {args.loss} needs --predictor closed: IsoLoss (Eqs. 15, 17) is defined for "
                f"the closed-form predictor W_P; use --loss euc or cos with a learned predictor")
    if args.warmup_epochs is not None and args.warmup_epochs > args.epochs:
        p.error("--warmup-epochs must not exceed --epochs")
    if args.gpu_aug and args.dataset not in IN_MEMORY:
        p.error(f"--gpu-aug needs images of one size held in memory: --dataset {' or '.join(IN_MEMORY)}")
    if args.download and args.dataset == "folder":
        p.error("--download is not available for --dataset folder (your own data)")
    if args.resume == "auto" and args.out is None:
        p.error("--resume auto needs --out DIR (the run directory to continue)")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a directory")
    if args.device != "auto":       # a device that torch knows and this machine has
        try:
            device = torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device}: not a device torch knows (try cpu, cuda, cuda:1)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():    # 0 without CUDA
            p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type not in ("cpu", "cuda"):
            p.error(f"--device {args.device}: only cpu and cuda are supported")
    cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    if args.amp == "fp16" and not cuda:
        p.error("--amp fp16 needs CUDA (its GradScaler); use --amp bf16 on a CPU")
    world = int(os.environ.get("WORLD_SIZE", 1))                    # torchrun's processes
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} (the global batch) must be divisible by the {world} processes")


def resolve(args):
    """Fill the defaults that depend on other settings; every resolved value lands in config.json."""
    d = DATASETS[args.dataset]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.world_size > 1 and args.device.startswith("cuda"):      # torchrun: one GPU per process
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    args.image_size = args.image_size or d["crop"]
    size = args.image_size  # `folder`: stem and blur like the Table 4 dataset of the nearest size
    if args.stem == "auto":
        args.stem = d["stem"] or ("3x3" if size <= 32 else "3x3-maxpool" if size <= 64 else "7x7-maxpool")
    args.blur = d["blur"] if d["blur"] is not None else size >= 96
    if args.gpu_aug is None:
        args.gpu_aug = args.device.startswith("cuda") and args.dataset in IN_MEMORY
    if args.optimizer == "auto":  # App. D: LARS with an EMA target, SGD without
        args.optimizer = "lars" if args.ema > 0 else "sgd"
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "lars" else 0.1                  # App. D
    if args.wd is None:     # the reference run script's 1e-4 (the paper's text: 4e-4); App. D's 1e-5
        args.wd = 1e-4 if args.predictor == "closed" else 1e-5
    if args.tau is None:
        args.tau = 0.998 if args.ema > 0 else 0.5   # App. D; reference no-EMA configs: dp_tau 0.5
    args.lr_scaled = args.lr * args.batch_size / 256          # linear scaling rule (solo-learn)
    args.probe_lr_scaled = args.probe_lr * args.batch_size / 256
    if args.out is None and args.resume not in (None, "auto"):
        args.out = os.path.dirname(os.path.abspath(args.resume))
    elif args.out is None:
        args.out = os.path.join("runs", f"{args.dataset}-{args.loss}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def get_config(argv=None):
    """Command line -> checked, fully resolved config (an argparse.Namespace)."""
    p = parser()
    args = p.parse_args(argv)
    if args.plot or args.table:                     # reading runs needs no training settings
        return args
    check_args(p, args)
    return resolve(args)


# ---- Model: ResNet backbone, projector, predictor, linear probe; EMA target ----

def mlp(d_in, d_hidden, d_out):
    """Linear -> BN -> ReLU -> Linear: projector 512-4096-256, BYOL's predictor 256-4096-256 (App. D)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(inplace=True),
                         nn.Linear(d_hidden, d_out))


class Encoder(nn.Module):
    """x (B, 3, H, W) -> (h (B, 512) backbone features for the probe, z (B, M) projector output)."""

    def __init__(self, cfg):
        super().__init__()
        net = getattr(torchvision.models, cfg.arch)(weights=None)      # no weights, stem per Table 4
        kernel, stride, maxpool = STEMS[cfg.stem]
        if kernel != 7:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel, stride, padding=kernel // 2, bias=False)
        if not maxpool:
            net.maxpool = nn.Identity()
        self.dim, net.fc = net.fc.in_features, nn.Identity()     # 512 for ResNet-18; the head removed
        self.backbone = net
        self.projector = mlp(self.dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, x):
        h = self.backbone(x)          # (B, 512)
        return h, self.projector(h)   # (B, 512), (B, M)


class Model(nn.Module):
    """The online network: encoder, predictor, linear probe (and, with a learned predictor, `stats`: a
    running C for the diagnostics only). forward() runs every part in one call, as DDP needs."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        self.encoder = Encoder(cfg)
        if cfg.predictor == "closed":   # buffer C (M, M), float32, no gradient; W_P = U D^alpha U^T (Eq. 1)
            self.predictor = isoloss.ClosedFormPredictor(cfg.proj_dim, cfg.alpha, cfg.eps, cfg.tau)
        elif cfg.predictor == "mlp":    # BYOL's nonlinear predictor
            self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        else:                           # trainable linear W_P (Fig. 4)
            self.predictor = nn.Linear(cfg.proj_dim, cfg.proj_dim, bias=False)
        self.probe = nn.Linear(self.encoder.dim, num_classes)
        self.learned = cfg.predictor != "closed"
        if self.learned:
            self.stats = isoloss.ClosedFormPredictor(cfg.proj_dim, tau=cfg.tau)

    @property
    def C_keeper(self):
        """The ClosedFormPredictor that keeps the running C = E[z z^T] (M, M) of the projector outputs."""
        return self.stats if self.learned else self.predictor

    def forward(self, x1, x2):
        """Views (B, 3, H, W) -> z1, z2, p1, p2 (B, M; p: None if closed), probe logits (2B, classes)."""
        h1, z1 = self.encoder(x1)                   # (B, 512), (B, M)
        h2, z2 = self.encoder(x2)                   # views forwarded separately: BN statistics per view
        p1, p2 = (self.predictor(z1), self.predictor(z2)) if self.learned else (None, None)
        return z1, z2, p1, p2, self.probe(torch.cat([h1, h2]).detach())


def build_model(cfg, num_classes):
    """The online Model and its target: an EMA copy of the encoder, or None; under torchrun with SyncBN."""
    model = Model(cfg, num_classes)
    target = copy.deepcopy(model.encoder).requires_grad_(False) if cfg.ema > 0 else None
    if cfg.world_size > 1:
        model, target = (sync_batchnorm(m, cfg) if m is not None else None for m in (model, target))
    return model, target


# ---- The loss step (Eq. 1, Table 1, Eqs. 15 and 17) ----

def ssl_loss(model, z1, z2, p1, p2, z1_t, z2_t, cfg):
    """L = 2 * [L(p1, SG(z2_t)) + L(p2, SG(z1_t))] (Table 1), p = W_P z (Eq. 1) or the learned p1, p2.
    Twice the paper's constants: the reference code's scale (README, "Loss scale")."""
    # C <- tau^2 C + (1 - tau^2) C_batch(z1, z2) before W_P is built, under torchrun averaged over processes.
    # Departures: one step from both views (the reference: one per view), only in training steps (README).
    model.C_keeper.update(z1, z2, reduce=mean_over_ranks)          # z detached inside; float32 under AMP
    W_P = None if model.learned else model.predictor()[0]           # (M, M), no gradient
    q1, q2 = (p1, p2) if model.learned else (z1, z2)                # closed form: W_P applied in the loss
    return 2 * (pair_loss(cfg.loss, q1, z2_t, W_P) + pair_loss(cfg.loss, q2, z1_t, W_P))


def pair_loss(kind, z1, z2_t, W_P=None):
    """One view order of Table 1 (paper constants, batch mean); z1 is p1 when W_P is None. IsoLoss (Eqs.
    15, 17): the base loss of isoloss.straight_through(z1, W_P), with Eq. 15's / 17's gradient."""
    if kind.startswith("iso_"):
        z1, W_P, kind = isoloss.straight_through(z1, W_P), None, kind[len("iso_"):]
    return (isoloss.loss_euc if kind == "euc" else isoloss.loss_cos)(z1, z2_t, W_P)


def probe_loss(logits, y):
    """Cross-entropy of the linear probe (logits (2B, classes) of both views); label -1 is ignored."""
    y = torch.cat([y, y])                                   # (2B,)
    n = (y >= 0).sum().clamp(min=1)          # a batch of only unlabelled STL-10 images gives 0, not NaN
    return F.cross_entropy(logits.float(), y, ignore_index=-1, reduction="sum") / n


@torch.no_grad()
def update_target(target, online, m):
    """xi <- m xi + (1 - m) theta (BYOL), one fused update. Parameters only: the BN statistics are its own."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - m)


def z_std(z):
    """The reference code's collapse monitor times sqrt(M): 1 for isotropic z (B, M), 0 collapsed."""
    return F.normalize(z.detach().float(), dim=1).std(0).mean() * z.shape[1] ** 0.5


def autocast(cfg):
    """--amp bf16 (or fp16, CUDA only); otherwise a no-op. isoloss.py computes C, W_P, losses in float32."""
    dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16
    return torch.autocast(torch.device(cfg.device).type, dtype=dtype, enabled=cfg.amp is not None)


def layout(cfg):
    """Memory layout of images and conv weights: channels_last on CUDA (what cuDNN's fastest kernels use)."""
    return torch.channels_last if cfg.device.startswith("cuda") else torch.contiguous_format


def train_step(run, x1, x2, y, cfg, m):
    """One step on view pairs -> detached (ssl loss, probe loss, z_std); non-finite numbers -> run.bad."""
    with autocast(cfg):
        z1, z2, p1, p2, logits = run.ddp(x1, x2)    # (B, M) x 4 (p: None for closed), (2B, classes)
        z1_t, z2_t = ((z1.detach(), z2.detach()) if run.target is None      # stop-grad = a momentum-0 copy
                      else (run.target(x1)[1], run.target(x2)[1]))          # no gradient: requires_grad off
        loss = ssl_loss(run.model, z1, z2, p1, p2, z1_t, z2_t, cfg)
        ploss = probe_loss(logits, y)
    z = torch.cat([z1, z2])                         # (2B, M)
    watch(run, loss, z, run.model.C_keeper.C)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss + ploss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    if run.target is not None:
        update_target(run.target, run.model.encoder, m)
    return torch.stack([loss.detach(), ploss.detach(), z_std(z)])


# ---- Optimiser and schedules ----

class LARS(torch.optim.Optimizer):
    """SGD with momentum (d = g + wd w, buf <- momentum buf + d, w <- w - lr buf), in groups with lars=True
    LARS (You et al. 2017; the reference code's, with clip_lr and exclude_bias_n_norm): tensors of more than
    one dimension whose ||w|| and ||g|| are non-zero get d = r (g + wd w), the others d = g, where
    r = eta ||w|| / (||g|| + wd ||w|| + 1e-8), clipped: min(r / lr, 1). Per group a few _foreach ops."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip_lr=True, lars=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      clip_lr=clip_lr, lars=lars))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if g["lars"]:     # 1-D tensors: d = g
                multi = [p for p in params if p.ndim > 1]
                d_w = iter(self.lars_directions(multi, [p.grad for p in multi], g) if multi else [])
                d_p = [next(d_w) if p.ndim > 1 else p.grad for p in params]
            else:
                d_p = torch._foreach_add(grads, params, alpha=g["weight_decay"])     # g + wd w
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, g["momentum"])                            # buf <- momentum buf + d
            torch._foreach_add_(bufs, d_p)
            torch._foreach_add_(params, bufs, alpha=-g["lr"])

    @staticmethod
    def lars_directions(params, grads, g):
        """d = a g + b w per tensor, (a, b) = (r, r wd) or (1, 0); lr 0 gives r = 1, as min(r / 0, 1) does."""
        w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
        r = g["eta"] * w_norm / (g_norm + g["weight_decay"] * w_norm + 1e-8)
        if g["clip_lr"]:
            r = (r / g["lr"]).clamp(max=1.0) if g["lr"] > 0 else torch.ones_like(r)
        scaled = (w_norm > 0) & (g_norm > 0)
        a = torch.where(scaled, r, 1.0)
        b = (a * scaled * g["weight_decay"]).unbind()
        return torch._foreach_add(torch._foreach_mul(grads, a.unbind()), torch._foreach_mul(params, b))


def build_optimizer(model, cfg):
    """The reference code's groups: weights; biases and norm parameters; probe (README, "Weight decay")."""
    body = [(n, p) for n, p in model.named_parameters() if not n.startswith("probe.")]
    weights = [p for n, p in body if p.ndim > 1]
    bias_norm = [p for n, p in body if p.ndim <= 1]
    lars = cfg.optimizer == "lars"
    groups = [dict(params=weights, weight_decay=cfg.wd, lars=lars, base_lr=cfg.lr_scaled),
              dict(params=bias_norm, weight_decay=0.0 if lars else cfg.wd, lars=False, base_lr=cfg.lr_scaled),
              dict(params=list(model.probe.parameters()), weight_decay=0.0, lars=lars,
                   base_lr=cfg.probe_lr_scaled)]
    return LARS(groups, lr=cfg.lr_scaled, momentum=cfg.momentum, eta=cfg.lars_eta, clip_lr=True)


def lr_at(step, base_lr, cfg):
    """Linear warm-up from warmup_start_lr at step 0 to base_lr at step w - 1 (the reference code's
    LinearWarmupCosineAnnealingLR), then cosine decay from base_lr at step w to 0, per step (App. D)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (base_lr - cfg.warmup_start_lr) * step / max(1, cfg.warmup_steps - 1)
    t = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def ema_at(step, cfg):
    """Target momentum m = 1 - (1 - m_base) (cos(pi k / K) + 1) / 2, from 0.99 to 1 (BYOL; App. D)."""
    return 1 - (1 - cfg.ema) * (math.cos(math.pi * step / cfg.total_steps) + 1) / 2


def set_lr(opt, step, cfg):
    """Apply the schedule to every group; returns the lr of the first (backbone weights) group."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, g["base_lr"], cfg)
    return opt.param_groups[0]["lr"]


def schedule(cfg, steps_per_epoch):
    """Schedule lengths in steps; warm-up: 10 epochs (App. D), capped for short runs (README, "Schedules")."""
    cfg.steps_per_epoch, cfg.total_steps = steps_per_epoch, cfg.epochs * steps_per_epoch
    if cfg.warmup_epochs is None:
        cfg.warmup_steps = max(1, min(10 * steps_per_epoch, cfg.total_steps // 4))
    else:
        cfg.warmup_steps = math.ceil(cfg.warmup_epochs * steps_per_epoch)


# ---- Loop and main ----

class Crash(Exception):
    """The run cannot go on: non-finite numbers, or C's eigendecomposition failed. `step` counts from 1."""

    def __init__(self, step, reason):
        super().__init__(reason)
        self.step = step


WATCHED = ("loss", "embedding", "C")        # bits 0, 1, 2 of run.bad


def watch(run, loss, z, C):
    """run.bad = 8 (first step whose loss, z (2B, M) or C (M, M) is non-finite) + bits of WATCHED, or 0."""
    bits = sum((~torch.isfinite(t).all()).long() << i for i, t in enumerate((loss, z, C)))
    run.bad = torch.where((run.bad == 0) & (bits > 0), 8 * (run.step + 1) + bits, run.bad)


def check_finite(run):
    """Raise Crash at the earliest non-finite step of run.bad (of all processes under torchrun); waits."""
    none = torch.iinfo(run.bad.dtype).max
    bad = torch.where(run.bad > 0, run.bad, none)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    if bad < none:
        step, bits = divmod(bad.item(), 8)
        raise Crash(step, "non-finite " + ", ".join(n for i, n in enumerate(WATCHED) if bits >> i & 1))


def train_epoch(run, loaders, cfg):
    """One pass over the training set; returns the epoch's mean losses and z_std, last lr and wall time."""
    run.model.train()
    if run.target is not None:
        run.target.train()                          # BYOL's target uses batch statistics
    loader = loaders.train
    loader.sampler.set_epoch(run.epoch)                                                  # the order: seed + epoch
    loader.generator.manual_seed((cfg.seed + run.epoch) * cfg.world_size + cfg.rank)   # augmentations: + rank
    device, t0 = torch.device(cfg.device), time.time()
    sums = torch.zeros(3, device=device)            # (ssl loss, probe loss, z_std), summed over steps
    for i, ((x1, x2), y) in enumerate(batches(loader), 1):
        x1, x2 = (x.to(device, non_blocking=True, memory_format=layout(cfg)) for x in (x1, x2))
        y = y.to(device, non_blocking=True)
        lr = set_lr(run.opt, run.step, cfg)
        try:
            sums += train_step(run, x1, x2, y, cfg, ema_at(run.step, cfg))
        except torch.linalg.LinAlgError as e:       # even in float64 (isoloss._eigh): say why, if we can
            check_finite(run)                       # an earlier step's non-finite numbers
            finite = torch.isfinite(run.model.C_keeper.C).all()
            raise Crash(run.step + 1, "non-finite C" if not finite else
                        f"the eigendecomposition of C failed ({last_line(e)})") from None
        run.step += 1
        if i % cfg.log_every == 0 or i == len(loader):          # the epoch's mean loss and images/s so far
            check_finite(run)
            now = time.time()
            ips = i * cfg.batch_size / max(now - t0, 1e-9)
            pace = (now - run.t0) / max(run.step - run.step0, 1)     # seconds per step
            eta = datetime.timedelta(seconds=round(pace * (cfg.total_steps - run.step)))
            print(f"epoch {run.epoch + 1}/{cfg.epochs} step {i}/{len(loader)} ({run.step}/{cfg.total_steps}) "
                  f"loss {sums[0].item() / i:.4f} lr {lr:.4g} {ips:.0f} img/s ETA {eta}", flush=True)
        if cfg.spectrum_every and run.step % cfg.spectrum_every == 0 and i < len(loader):  # (ends: always)
            check_finite(run)
            log_spectrum(run, cfg)
    loss, ploss, zstd = mean_over_ranks(sums / len(loader)).tolist()
    return dict(loss=loss, probe_loss=ploss, lr=lr, seconds=time.time() - t0, z_std=zstd)


def build_run(cfg, num_classes):
    """The training state: model (DDP under torchrun), target, optimiser, scaler, position, `watch` flags."""
    model, target = build_model(cfg, num_classes)
    for m in (model, target):
        if m is not None:
            m.to(cfg.device, memory_format=layout(cfg))
    ddp = model if cfg.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.device(cfg.device).index] if cfg.device.startswith("cuda") else None)
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.amp == "fp16")   # fp16 only
    return types.SimpleNamespace(model=model, ddp=ddp, target=target, opt=build_optimizer(model, cfg),
                                 scaler=scaler, epoch=0, step=0, t0=time.time(), step0=0,
                                 bad=torch.zeros((), dtype=torch.long, device=cfg.device))


def setup(cfg):
    """Seed, data, schedule lengths, training state; returns (run, loaders)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    loaders, num_classes = build_data(cfg)
    schedule(cfg, len(loaders.train))
    run = build_run(cfg, num_classes)
    if cfg.world_size > 1:                          # same model everywhere, its own augmentations per process
        torch.manual_seed(cfg.seed + 1 + cfg.rank)
    return run, loaders


def start_outputs(cfg, run, loaders):
    """Create --out, write config.json, drop rows of steps after the checkpoint, print a summary."""
    if cfg.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(vars(cfg), f, indent=2)
        for name in ("metrics.jsonl", "spectrum.jsonl"):
            append_jsonl(os.path.join(cfg.out, name), keep_until_step=run.step)
    target = f"EMA target {cfg.ema}" if cfg.ema else "no EMA"
    print(f"{cfg.dataset}: {len(loaders.train.dataset)} training images, {cfg.steps_per_epoch} steps/epoch"
          f"{f' on each of {cfg.world_size} processes' if cfg.world_size > 1 else ''}; "
          f"{cfg.arch} ({cfg.stem} stem), {cfg.predictor} predictor, loss {cfg.loss}, {target}, "
          f"{cfg.optimizer} lr {cfg.lr_scaled:g} wd {cfg.wd:g}, warm-up {cfg.warmup_steps} steps; "
          f"{cfg.device}; out {cfg.out}", flush=True)
    run.t0, run.step0 = time.time(), run.step           # the pace since this process started, for the ETA


def finish_epoch(run, loaders, cfg, row):
    """Rank 0: evaluate if due, add the monitors, write metrics.jsonl, spectrum.jsonl, last.pt; print."""
    if cfg.rank != 0:
        return row
    due = run.epoch == cfg.epochs or (cfg.eval_every > 0 and run.epoch % cfg.eval_every == 0)
    acc = evaluate(run.model, loaders, cfg) if due else dict(acc1=None, acc5=None)
    row = dict(epoch=run.epoch, step=run.step, **row, **acc)
    row.update(monitors(log_spectrum(run, cfg)["eigenvalues"], row["z_std"]))
    append_jsonl(os.path.join(cfg.out, "metrics.jsonl"), row)
    state = dict(model=run.model.state_dict(),     # all to continue; torch.load(weights_only=True) reads it
                 target=run.target.state_dict() if run.target is not None else None,
                 optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(),
                 epoch=run.epoch, step=run.step, config=vars(cfg),
                 rng=dict(torch=torch.get_rng_state(), python=random.getstate(),   # numpy RNG: unused
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
    save_checkpoint(state, os.path.join(cfg.out, "last.pt"))
    print(f"epoch {run.epoch}/{cfg.epochs} done in {row['seconds']:.1f}s: loss {row['loss']:.4f}"
          + (f", probe acc1 {row['acc1']:.2f}%" if due else "")
          + (f", k-NN acc1 {row['knn_acc1']:.2f}%" if row.get("knn_acc1") is not None else "")
          + f"; C: participation ratio {row['participation_ratio']:.1f} of {cfg.proj_dim}, top eigenvalue "
          f"{100 * row['top_share']:.0f}% of the trace; z_std {row['z_std']:.2f}", flush=True)
    if row["collapsed"]:
        print(f"warning: epoch {run.epoch}: the embeddings look collapsed (top eigenvalue of C above "
              f"{COLLAPSED['top_share']:.0%} of its trace, or z_std below {COLLAPSED['z_std']})", flush=True)
    return row


CRASHED = 3     # exit code of a crashed run; 1: bad data, files or checkpoint; 2: bad command line


def main(argv=None):
    """Train as `argv` (default: sys.argv) says; returns the metrics row of the last epoch trained."""
    cfg = get_config(argv)
    if cfg.plot:
        return plot(cfg.plot)
    if cfg.table:
        return table(cfg.table)
    if cfg.bench:
        return bench(cfg)
    init_distributed(cfg)
    path = os.path.join(cfg.out, "last.pt") if cfg.resume == "auto" else cfg.resume     # None: a fresh start
    if path is not None and not os.path.isfile(path):
        if cfg.resume != "auto":
            fail(f"--resume {path}: no such file")
        print(f"--resume auto: no {path} yet, starting from scratch", flush=True)
        path = None
    if path is None and os.path.exists(os.path.join(cfg.out, "last.pt")):
        fail(f"{cfg.out} already holds a run (last.pt): pass --resume auto to continue it, or another --out")
    run, loaders = setup(cfg)
    if path is not None:
        load_checkpoint(path, run, cfg)
    start_outputs(cfg, run, loaders)
    row = None
    if run.epoch >= cfg.epochs:
        print(f"nothing to do: {run.epoch} of {cfg.epochs} epochs done (raise --epochs to continue)")
    try:
        while run.epoch < cfg.epochs:
            row = train_epoch(run, loaders, cfg)
            run.epoch += 1
            row = finish_epoch(run, loaders, cfg, row)
    except Crash as crash:              # a "crashed" row in metrics.jsonl, one error line, exit code CRASHED
        epoch = (crash.step - 1) // cfg.steps_per_epoch + 1
        if cfg.rank == 0:
            crash_row = dict(epoch=epoch, step=crash.step, crashed=True, reason=str(crash))
            append_jsonl(os.path.join(cfg.out, "metrics.jsonl"), crash_row)
            kept = (f"the last good checkpoint is {os.path.join(cfg.out, 'last.pt')} (epoch {run.epoch})"
                    if run.epoch else "no epoch finished, no checkpoint")
            print(f"train.py: error: crashed at epoch {epoch}, step {crash.step}: {crash}; {kept}",
                  file=sys.stderr, flush=True)
        raise SystemExit(CRASHED)
    if dist.is_initialized():
        dist.barrier()                              # rank 0's files are complete when every process returns
    return row


# ---- Evaluation and diagnostics: probe, k-NN, C's spectrum, alignment (Figs. 3, 4, 7, 8) ----

@torch.no_grad()
def features(model, loader, cfg):
    """Backbone features h (N, 512), float32, and labels (N,) of a loader's images, in eval mode."""
    model.eval()
    hs, ys = [], []
    for x, y in batches(loader):
        with autocast(cfg):
            hs.append(model.encoder.backbone(x.to(cfg.device, non_blocking=True)).float())
        ys.append(y.to(cfg.device))
    model.train()
    return torch.cat(hs), torch.cat(ys)


@torch.no_grad()
def evaluate(model, loaders, cfg):
    """Probe top-1 / top-5 (%) on the un-augmented evaluation split (App. D), and with --knn k-NN top-1."""
    h, y = features(model, loaders.eval, cfg)                       # (N, 512), (N,)
    k = min(5, model.probe.out_features)
    top = model.probe(h).topk(k, dim=1).indices == y[:, None]        # (N, k)
    acc = dict(acc1=100 * top[:, 0].float().mean().item(),
               acc5=100 * top.any(1).float().mean().item() if k == 5 else None)
    if cfg.knn:
        acc["knn_acc1"] = knn_accuracy(*features(model, loaders.bank, cfg), h, y, model.probe.out_features, cfg)
    return acc


def knn_accuracy(bank, bank_y, h, y, classes, cfg, chunk=256):
    """Weighted k-NN top-1 (%) of h (n, D), y (n,) on bank (N, D), bank_y (N,) (Wu et al. 2018; README)."""
    bank = F.normalize(bank, dim=1)
    k, hits = min(cfg.knn, len(bank)), 0
    for h_c, y_c in zip(F.normalize(h, dim=1).split(chunk), y.split(chunk)):
        sim, idx = (h_c @ bank.T).topk(k, dim=1)                     # (chunk, k)
        votes = torch.zeros(len(h_c), classes, device=h.device)
        votes.scatter_add_(1, bank_y[idx], (sim / cfg.knn_temperature).exp())
        hits += (votes.argmax(1) == y_c).sum()
    return 100 * float(hits) / len(y)


RECRUITED = 0.01      # an eigenvalue counts as recruited above 1% of the largest (our choice; see README)
COLLAPSED = dict(top_share=0.9, z_std=0.1)  # "collapsed": top_share above, or z_std below (see README)


@torch.no_grad()
def log_spectrum(run, cfg):
    """Log C's eigenvalues, descending, and (linear predictor) Fig. 4's cos(u_i, W_P u_i): spectrum.jsonl."""
    s, U = torch.linalg.eigh(run.model.C_keeper.C.double().cpu())
    s, U = s.flip(0), U.flip(1)                                     # (M,), (M, M) columns u_i
    row = dict(epoch=(run.step - 1) // cfg.steps_per_epoch + 1, step=run.step, eigenvalues=s.tolist())
    if cfg.predictor == "linear":
        WU = run.model.predictor.weight.detach().double().cpu() @ U   # W_P u_i (p = W_P z)
        row["alignment"] = ((U * WU).sum(0) / WU.norm(dim=0).clamp(min=1e-300)).tolist()
    if cfg.rank == 0:
        append_jsonl(os.path.join(cfg.out, "spectrum.jsonl"), row)
    return row


def monitors(eigenvalues, zstd):
    """The collapse monitors of a metrics row (README, Diagnostics) from C's eigenvalues and mean z_std."""
    s = torch.tensor(eigenvalues, dtype=torch.float64).clamp(min=0)
    total = s.sum()
    if total > 0:
        p = s / total
        out = dict(participation_ratio=(total ** 2 / (s ** 2).sum()).item(), top_share=(s.max() / total).item(),
                   effective_rank=(-(p * p.clamp(min=1e-300).log()).sum()).exp().item(),
                   recruited=int((s > RECRUITED * s.max()).sum()))
    else:                                   # C = 0: every embedding is zero
        out = dict(participation_ratio=0.0, top_share=1.0, effective_rank=0.0, recruited=0)
    out["z_std"] = zstd
    out["collapsed"] = out["top_share"] > COLLAPSED["top_share"] or zstd < COLLAPSED["z_std"]
    return out


# ---- Data per image: two asymmetric views (App. D, Table 4), un-augmented images for evaluation ----

# The SimCLR augmentation set of App. D (solo-learn's asymmetric BYOL recipe), shared by both pipelines.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)   # RandomResizedCrop (ratio: torchvision's default)
JITTER, JITTER_P = (0.4, 0.4, 0.2, 0.1), 0.8            # ColorJitter(brightness, contrast, saturation, hue)
GRAY_P, FLIP_P, SOLARIZE_THRESHOLD = 0.2, 0.5, 128       # solarisation: PIL's default threshold (uint8)
BLUR_KERNEL, BLUR_SIGMA = 13, (0.1, 2.0)    # reference code: PIL's radius=sigma, px; 13 taps: +-3 sigma at 2
VIEWS = ((1.0, 0.0), (0.1, 0.2))    # (blur p, solarisation p) of views 1 and 2; blur on blur datasets only


class TwoViews(types.SimpleNamespace):
    """TwoViews(t1=..., t2=...): image -> (t1(image), t2(image)), the asymmetric views of BYOL (t and t')."""

    def __call__(self, img):
        return self.t1(img), self.t2(img)


def view_transform(size, mean, std, blur_p, solarize_p):
    """One view, per image (torchvision v2; colour ops on uint8). The CPU pipeline and `folder`'s."""
    ops = [v2.ToImage(),  # PIL -> uint8 tensor (3, H, W); colour ops run on uint8
           v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO,
                                interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
           v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P),
           v2.RandomGrayscale(p=GRAY_P)]
    if blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=blur_p))
    if solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
    ops += [v2.RandomHorizontalFlip(p=FLIP_P), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def train_transform(cfg):
    """View 1: blur p=1.0 (blur datasets only), no solarisation; view 2: blur p=0.1, solarisation p=0.2."""
    d = DATASETS[cfg.dataset]
    return TwoViews(**{f"t{i}": view_transform(cfg.image_size, d["mean"], d["std"], b if cfg.blur else 0.0, s)
                       for i, (b, s) in enumerate(VIEWS, 1)})


def eval_transform(cfg):
    """Un-augmented: resize the short side to the training crop, centre-crop, normalise."""
    d = DATASETS[cfg.dataset]
    return v2.Compose([v2.ToImage(), v2.Resize(cfg.image_size, interpolation=v2.InterpolationMode.BICUBIC,
                                               antialias=True),
                       v2.CenterCrop(cfg.image_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(d["mean"], d["std"])])


class ImageList(torch.utils.data.Dataset):
    """(image, label) pairs from (x, label) samples, the image read by load(x) (paths by default)."""

    def __init__(self, samples, transform, load=default_loader):
        self.samples, self.transform, self.load = samples, transform, load

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        x, y = self.samples[i]
        return self.transform(self.load(x)), y


TORCHVISION = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}


def required_paths(cfg):
    """The files and folders each loader reads, so a missing one can be named (and how to get it)."""
    root = cfg.data_dir
    if cfg.dataset in ("cifar10", "cifar100", "stl10"):
        cls = TORCHVISION[cfg.dataset]
        files = [f for f, _ in cls.train_list + cls.test_list] + (
            [cls.meta["filename"]] if cfg.dataset != "stl10" else [])
        hint = f"pass --download to fetch {cls.url} into {root}, or unpack that archive there"
        return [os.path.join(root, cls.base_folder, f) for f in files], hint
    if cfg.dataset == "tinyimagenet":
        base = os.path.join(root, "tiny-imagenet-200")
        hint = f"pass --download to fetch {TINY_URL} into {root}, or unzip it there (read as is)"
        return [os.path.join(base, p) for p in ("train", "val/images", "val/val_annotations.txt")], hint
    hint = "--data-dir must hold an ImageFolder tree: train/<class>/<images> and val/<class>/<images>"
    return [os.path.join(root, "train"), os.path.join(root, "val")], hint


def load_torchvision(cfg, train_tf, eval_tf):
    """CIFAR-10/100: train / test. STL-10: train+unlabeled (label -1 on unlabelled images) / test."""
    cls, root = TORCHVISION[cfg.dataset], cfg.data_dir
    try:
        if cfg.dataset == "stl10":
            return (cls(root, split="train+unlabeled", transform=train_tf, download=cfg.download),
                    cls(root, split="test", transform=eval_tf))
        return (cls(root, train=True, transform=train_tf, download=cfg.download),
                cls(root, train=False, transform=eval_tf))
    except RuntimeError:  # torchvision's "Dataset not found or corrupted": an md5 sum does not match
        fail(f"{cfg.dataset}: the files under {os.path.join(root, cls.base_folder)} fail torchvision's md5 "
             f"check (an incomplete or altered copy?); delete them and rerun with --download")


def load_tinyimagenet(cfg, train_tf, eval_tf):
    """Official layout: train/<wnid>/images/*.JPEG, val/images/* labelled by val/val_annotations.txt."""
    root = os.path.join(cfg.data_dir, "tiny-imagenet-200")
    if cfg.download and not os.path.isdir(root):
        torchvision.datasets.utils.download_and_extract_archive(TINY_URL, cfg.data_dir)
    train = datasets.ImageFolder(os.path.join(root, "train"), train_tf)
    samples = []
    with open(os.path.join(root, "val", "val_annotations.txt")) as f:
        for line in filter(str.strip, f):
            name, wnid = line.split()[:2]
            path = os.path.join(root, "val", "images", name)
            if wnid not in train.class_to_idx or not os.path.isfile(path):
                fail(f"tinyimagenet: val_annotations.txt names {name} ({wnid}), but {path} or "
                     f"{root}/train/{wnid} is missing")
            samples.append((path, train.class_to_idx[wnid]))
    return train, ImageList(samples, eval_tf)


def load_folder(cfg, train_tf, eval_tf):
    """Any ImageFolder tree: train/<class>/* for pretraining and the probe, val/<class>/* to evaluate."""
    train = datasets.ImageFolder(os.path.join(cfg.data_dir, "train"), train_tf)
    val_dir = os.path.join(cfg.data_dir, "val")
    unknown = sorted(set(find_classes(val_dir)[0]) - set(train.classes))
    if unknown:
        fail(f"folder: {val_dir} has classes that train/ lacks: {', '.join(unknown[:5])}")
    samples = make_dataset(val_dir, train.class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    return train, ImageList(samples, eval_tf)


def load_datasets(cfg, train_tf, eval_tf):
    """(train set, eval set, number of classes); missing or bad data stops with a one-line error (README)."""
    paths, hint = required_paths(cfg)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing and not cfg.download:
        fail(f"{cfg.dataset}: {missing[0]} not found; {hint}")
    loader = {"tinyimagenet": load_tinyimagenet, "folder": load_folder}.get(cfg.dataset, load_torchvision)
    try:
        train, val = loader(cfg, train_tf, eval_tf)
    except Exception as e:  # no images, a failed download, a truncated or garbled file (pickle, numpy)
        fail(f"{cfg.dataset}: cannot load the data under {cfg.data_dir}: {last_line(e)}")
    if len(val) == 0:
        fail(f"{cfg.dataset}: the evaluation split under {cfg.data_dir} has no images")
    classes = DATASETS[cfg.dataset]["classes"] or len(train.classes)
    if classes < 2:
        fail(f"{cfg.dataset}: {classes} class under {cfg.data_dir}; the linear probe needs 2 or more")
    for name, ds in (("training", train), ("evaluation", val)) if hasattr(train, "data") else ():
        labels = ds.targets if hasattr(ds, "targets") else ds.labels
        # torchvision reshapes the bytes to the format's size: other images come out as a wrong count
        if ds.data.dtype != "uint8" or len(labels) != len(ds.data):
            fail(f"{cfg.dataset}: the {name} files hold {len(ds.data)} images of {ds.data.dtype} and "
                 f"{len(labels)} labels, where the format has images of uint8 (bytes), one label each")
        low = -1 if cfg.dataset == "stl10" and name == "training" else 0
        bad = [v for v in labels if not isinstance(v, numbers.Integral) or not low <= v < classes]
        if bad:
            fail(f"{cfg.dataset}: the {name} files hold labels other than integers in [0, {classes}), "
                 f"e.g. {bad[0]}")
    for name, ds in (("training", train), ("evaluation", val)):  # a corrupt file stops here, before any output
        try:
            ds[0]
        except Exception as e:
            fail(f"{cfg.dataset}: cannot read the first {name} image: {last_line(e)}")
    return train, val, classes


def unwrap(ds):
    """(the dataset under --limit's Subset, its indices or None)."""
    return (ds.dataset, ds.indices) if isinstance(ds, torch.utils.data.Subset) else (ds, None)


def knn_bank(train, eval_tf):
    """The k-NN monitor's memory bank: the labelled training images (of --limit's subset), un-augmented."""
    base, idx = unwrap(train)
    bank = copy.copy(base)                      # the same files, read with the evaluation transform
    bank.transform = eval_tf
    labels = getattr(base, "targets", None) or base.labels       # STL-10 names them labels (-1: unlabelled)
    keep = [i for i in (range(len(base)) if idx is None else idx) if labels[i] >= 0]
    return torch.utils.data.Subset(bank, keep)


def build_data(cfg):
    """Datasets, transforms, loaders (train, eval, k-NN bank); a DistributedSampler even for one process."""
    eval_tf = eval_transform(cfg)
    train, val, num_classes = load_datasets(cfg, train_transform(cfg), eval_tf)
    if cfg.limit:
        train = torch.utils.data.Subset(train, range(min(cfg.limit, len(train))))
    if len(train) < cfg.batch_size:
        fail(f"{len(train)} training images are fewer than one batch (--batch-size {cfg.batch_size})")
    batch = cfg.batch_size // cfg.world_size
    sampler = torch.utils.data.DistributedSampler(range(len(train)), cfg.world_size, cfg.rank, seed=cfg.seed,
                                                  drop_last=True)
    bank = knn_bank(train, eval_tf) if cfg.knn else None
    if cfg.gpu_aug:
        d = DATASETS[cfg.dataset]
        views = lambda x, g: batch_two_views(x, cfg.image_size, d["mean"], d["std"], cfg.blur, g)   # noqa: E731
        plain = lambda x, g: eval_tf(x).as_subclass(torch.Tensor)                                  # noqa: E731
        train = DeviceLoader(*as_tensors(train, cfg), batch, views, sampler, True)
        load = lambda ds: DeviceLoader(*as_tensors(ds, cfg), batch, plain)                        # noqa: E731
    else:
        kw = dict(batch_size=batch, num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"))
        train = torch.utils.data.DataLoader(train, sampler=sampler, drop_last=True,
                                            generator=torch.Generator(), **kw)
        load = lambda ds: torch.utils.data.DataLoader(ds, shuffle=False, **kw)                    # noqa: E731
    return types.SimpleNamespace(train=train, eval=load(val), bank=load(bank) if bank else None), num_classes


def batches(loader):
    """Iterate a loader; an image that cannot be read (in any worker) stops the run with one line."""
    it = iter(loader)
    try:
        yield from it
    except Exception as e:
        fail(f"cannot read a batch of {len(loader.dataset)} images: {last_line(e)}")


# ---- Data on the device (--gpu-aug): the same views for a whole uint8 batch ----

# Per-image choices are selects or neutral factors: nothing waits for the device. Departure from
# view_transform: float in [0, 1] after the crop, where torchvision's uint8 colour ops round (< 1/255 per op).

CROP_TRIES = 10              # RandomResizedCrop: 10 (area, ratio) draws, the first that fits, else the centre
CUBIC_A = -0.5               # the cubic kernel of torch's antialiased bicubic resize (PIL's; -0.75 without AA)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)    # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def sample_view(n, H, W, blur_p, solarize_p, generator, device):
    """Every random parameter of one view for n images of H x W, as view_transform draws them."""
    u = lambda *shape: torch.rand(shape, generator=generator, device=device)                # noqa: E731
    area = H * W * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u(n, CROP_TRIES))     # (n, tries)
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(lo + (hi - lo) * u(n, CROP_TRIES))
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first, found = fits.to(torch.uint8).argmax(1, keepdim=True), fits.any(1)
    fw = W if W / H <= CROP_RATIO[1] else round(H * CROP_RATIO[1])        # fallback: the centre crop of the
    fh = H if W / H >= CROP_RATIO[0] else round(W / CROP_RATIO[0])        # image clipped to the ratio range
    w, h = (torch.where(found, t.gather(1, first)[:, 0], float(f)).long() for t, f in ((w, fw), (h, fh)))
    top, left = (torch.where(found, torch.minimum((v * (S - s + 1)).long(), S - s), (S - s) // 2)
                 for v, S, s in zip(u(2, n), (H, W), (h, w)))
    f, c = u(n, 4), u(6, n)
    factors = torch.stack([1 - s + 2 * s * f[:, i] for i, s in enumerate(JITTER[:3])]
                          + [JITTER[3] * (2 * f[:, 3] - 1)], 1)           # (n, 4) brightness ... hue
    return dict(top=top, left=left, height=h, width=w, flip=c[0] < FLIP_P, jitter=c[1] < JITTER_P,
                factors=factors, order=u(n, 4).argsort(1), gray=c[2] < GRAY_P, blur=c[3] < blur_p,
                sigma=BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * c[4], solarize=c[5] < solarize_p,
                blur_p=blur_p)                                    # a Python float: whether to blur at all


def crop_matrix(start, length, in_size, out_size, flip=None):
    """(B, out_size, in_size): crop [start, start + length) (B,) of one axis, resized to out_size as bicubic
    interpolate(antialias=True) does (pixel i at (i + 0.5) length / out_size, taps renormalised). Rows of
    images with flip (B,) are reversed: the flip, folded in (every later op commutes with it)."""
    s = length.float() / out_size                                       # (B,)
    support, scale = 2 * s.clamp(min=1.0), s.clamp(min=1.0)
    taps = math.ceil(4 * max(in_size / out_size, 1.0))
    c = s[:, None] * (torch.arange(out_size, device=start.device) + 0.5)                   # (B, out)
    lo = (c - support[:, None] + 0.5).trunc().clamp(min=0)
    hi = torch.minimum((c + support[:, None] + 0.5).trunc(), length[:, None].float())
    k = lo[..., None] + torch.arange(taps, device=start.device)                             # (B, out, taps)
    x = ((k - c[..., None] + 0.5) / scale[:, None, None]).abs()
    a = CUBIC_A
    cubic = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        torch.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
    weight = cubic * (k < hi[..., None])
    weight = weight / weight.sum(-1, keepdim=True)
    if flip is not None:
        weight, k = (torch.where(flip[:, None, None], t.flip(1), t) for t in (weight, k))
    index = (start[:, None, None] + k.long()).clamp(max=in_size - 1)    # taps of weight 0 may point past it
    return torch.zeros(len(start), out_size, in_size, device=start.device).scatter_add_(2, index, weight)


def separable(x, rows, cols):
    """rows[b] @ x[b, c] @ cols[b]^T for every image b and channel c: (B, C, H, W) -> (B, C, S, T)."""
    return rows[:, None] @ x @ cols[:, None].mT


def gaussian_blur(x, sigma, active):
    """torchvision's GaussianBlur(BLUR_KERNEL, sigma (B,)) of x (B, C, H, W) where active (B,), separable."""
    B, C, H, W = x.shape
    t = torch.arange(BLUR_KERNEL, device=x.device) - BLUR_KERNEL // 2                      # (K,)
    kernel = torch.softmax(-0.5 * (t / sigma[:, None]) ** 2, dim=1)                       # (B, K)
    kernel = torch.where(active[:, None], kernel, (t == 0).float())
    kernel = kernel[:, None].expand(B, C, BLUR_KERNEL).reshape(B * C, BLUR_KERNEL)           # (B C, K)
    y = F.pad(x.reshape(1, B * C, H, W), [BLUR_KERNEL // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)                               # along rows
    return F.conv2d(y, kernel[:, None, :, None], groups=B * C).view(B, C, H, W)          # along columns


def luma(x):
    """torchvision's grey level of x (B, 3, H, W): (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def adjust_hue(x, f):
    """torchvision's adjust_hue, a factor per image f (B,), x in [0, 1], in closed form: channel n (5, 3, 1
    for r, g, b) is max - chroma clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6."""
    r, g, b = x.unbind(1)                                                # (B, H, W)
    maxc, chroma = x.amax(1), x.amax(1) - x.amin(1)
    safe = torch.where(chroma > 0, chroma, 1.0)
    h6 = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    n = (5.0 - 2 * torch.arange(3, device=x.device))[:, None, None]   # 5, 3, 1 (no host-to-device copy)
    k = (h6[:, None] + 6 * f[:, None, None, None] + n) % 6
    return maxc[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x, factors, order, active):
    """ColorJitter where active (B,), factors (B, 4), in each image's order (B, 4) (torchvision's fn_idx):
    the hue once, between three blend slots before and three after, each image's in its order (else 1)."""
    hue_at = (order == 3).to(torch.uint8).argmax(1)                                       # (B,)
    others = order.gather(1, (order == 3).long().sort(dim=1, stable=True).indices)[:, :3]      # (B, 3)
    for before in (True, False):
        for slot in range(3):
            use = active & ((slot < hue_at) if before else (slot >= hue_at))
            op = others[:, slot, None, None, None]                                       # (B, 1, 1, 1)
            f = torch.where(use, factors.gather(1, others[:, slot:slot + 1])[:, 0], 1.0)[:, None, None, None]
            grey = luma(x)
            target = torch.where(op == 2, grey, torch.where(op == 1, grey.mean((2, 3), keepdim=True), 0.0))
            x = torch.lerp(target, x, f).clamp_(0, 1)                                     # f x + (1 - f) target
        if before:
            x = torch.where(active[:, None, None, None], adjust_hue(x, factors[:, 3]), x)
    return x


def apply_view(x, p, size, mean, std):
    """One normalised view (B, 3, size, size) of uint8 x (B, 3, H, W), in view_transform's order."""
    H, W = x.shape[2:]
    x = separable(x.float() / 255, crop_matrix(p["top"], p["height"], H, size),
                  crop_matrix(p["left"], p["width"], W, size, p["flip"])).clamp(0, 1)
    x = color_jitter(x, p["factors"], p["order"], p["jitter"])
    x = torch.where(p["gray"][:, None, None, None], luma(x), x)
    if p["blur_p"] > 0:
        x = gaussian_blur(x, p["sigma"], p["blur"])
    x = torch.where(p["solarize"][:, None, None, None] & (x >= SOLARIZE_THRESHOLD / 255), 1 - x, x)
    for c in range(3):                          # x is this function's own tensor: normalised in place
        x[:, c].sub_(mean[c]).div_(std[c])
    return x


CPU_CHUNK = 32      # images per pass on a CPU: their tensors stay in cache (1.4x faster at 96 px, measured)


def batch_two_views(x, size, mean, std, blur, generator=None):
    """train_transform's two views (v1, v2) of uint8 x (B, 3, H, W) on its device, drawn from `generator`."""
    n = CPU_CHUNK if x.device.type == "cpu" else len(x)
    views = []
    for blur_p, solarize_p in VIEWS:
        p = sample_view(len(x), *x.shape[2:], blur_p if blur else 0.0, solarize_p, generator, x.device)
        views.append(torch.cat([apply_view(x[i:i + n], {k: v[i:i + n] if torch.is_tensor(v) else v
                                                        for k, v in p.items()}, size, mean, std)
                                for i in range(0, len(x), n)]))
    return tuple(views)


def as_tensors(ds, cfg):
    """A dataset's images as one uint8 tensor (N, 3, H, W) and its labels (N,), on cfg.device (--gpu-aug)."""
    base, idx = unwrap(ds)
    if isinstance(base, datasets.CIFAR10):                         # CIFAR-100 too (a subclass)
        x, y = torch.from_numpy(base.data).permute(0, 3, 1, 2), torch.tensor(base.targets)
    elif isinstance(base, datasets.STL10):
        x, y = torch.from_numpy(base.data), torch.from_numpy(base.labels).long()
    else:                                                           # ImageFolder / ImageList of equal sizes
        reader = copy.copy(base)
        reader.transform = v2.PILToTensor()
        x, y = map(torch.cat, zip(*batches(torch.utils.data.DataLoader(reader, 256, num_workers=cfg.workers))))
    if idx is not None:
        x, y = x[list(idx)], y[list(idx)]
    return x.contiguous().to(cfg.device), y.to(cfg.device)


class DeviceLoader:
    """A DataLoader over uint8 images on the device: each batch is `transform(x, generator)`."""

    def __init__(self, images, labels, batch_size, transform, sampler=None, drop_last=False):
        self.dataset = torch.utils.data.TensorDataset(images, labels)
        self.batch_size, self.transform, self.sampler, self.drop_last = batch_size, transform, sampler, drop_last
        self.generator = torch.Generator(images.device)

    def __len__(self):
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        images, labels = self.dataset.tensors
        order = torch.tensor(list(self.sampler) if self.sampler is not None else range(len(labels)))
        for idx in order.to(images.device)[:len(self) * self.batch_size].split(self.batch_size):
            yield self.transform(images[idx], self.generator), labels[idx]


# ---- Distributed (torchrun): opt-in; a single process skips all of it ----

def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL, gloo on CPUs); rank 0 alone prints."""
    if cfg.world_size > 1 and not dist.is_initialized():
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        if cfg.rank:
            sys.stdout = open(os.devnull, "w")


def mean_over_ranks(t):
    """`t` averaged over the processes, in place; `t` itself in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def sync_batchnorm(module, cfg):
    """torch's SyncBatchNorm on GPUs. It runs on GPUs only: on CPUs each process normalises by its own share
    of the batch (README, "Several GPUs")."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module) if cfg.device.startswith("cuda") else module


# ---- Checkpointing and run files ----

def save_checkpoint(state, path):
    """Atomic: write a temporary file, then rename it over `path`."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, run, cfg):
    """Restore `run` from `path` and report settings that differ from the checkpoint's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)   # RNG states must stay on the CPU
        changed = [k for k, v in state["config"].items()
                   if k not in ("resume", "out") and vars(cfg).get(k) != v]
        settings = [{k: v for k, v in g.items() if k != "params"} for g in run.opt.param_groups]
    except Exception as e:                          # garbage, a truncated file, another program's checkpoint
        fail(f"--resume {path}: not a train.py checkpoint, or a truncated one ({type(e).__name__})")
    try:
        run.model.load_state_dict(state["model"])
        if run.target is not None:  # a no-EMA checkpoint has no target: start it from the online encoder
            run.target.load_state_dict(state["target"] or run.model.encoder.state_dict())
        run.opt.load_state_dict(state["optimizer"])   # momentum buffers ...
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"{path} does not fit this configuration (changed: {', '.join(changed)}): {last_line(e)}")
    for g, h in zip(run.opt.param_groups, settings):  # ... but this command line's lr, wd, LARS
        g.update(h)
    run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.step = state["epoch"], state["step"]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    print(f"resumed from {path} at epoch {run.epoch}, step {run.step}"
          + (f"; changed settings: {', '.join(changed)}" if changed else ""), flush=True)


def append_jsonl(path, row=None, keep_until_step=None):
    """Append one JSON line; with keep_until_step, first drop the lines of later steps (a resumed run)."""
    if keep_until_step is not None and os.path.exists(path):
        kept = [r for r in read_jsonl(path) if r["step"] <= keep_until_step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    if row is not None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The rows of a JSON-lines file ([] if none); a last line cut short is skipped with a warning."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")                # after a final newline: a last, empty item
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {last_line(e)}")
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            row = None
        if not isinstance(row, dict) and i == len(lines) and line.startswith("{"):    # a row's beginning
            print(f"warning: {path}: its last line is cut short (a run writing, or killed): skipped",
                  file=sys.stderr)
        elif not isinstance(row, dict):
            fail(f"{path}: line {i} is not a JSON object (a corrupt file?)")
        elif row:
            rows.append(row)
    return rows


def read_run(d, option):
    """A run directory for --plot and --table: (config, metrics rows, spectrum rows)."""
    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        fail(f"{option} {d}: not a run directory ({path} not found)")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        missing = ([k for k in ("dataset", "epochs", "image_size", *METHOD, "ema") if k not in c]
                   if isinstance(c, dict) else ["JSON object"])
        why = f"no {missing[0]}" if missing else None
    except (OSError, ValueError) as e:
        why = last_line(e)
    if why:
        fail(f"{path}: not a train.py config.json ({why})")
    return c, read_jsonl(os.path.join(d, "metrics.jsonl")), read_jsonl(os.path.join(d, "spectrum.jsonl"))


# ---- --plot, --table, --bench ----

def plot(dirs):
    """--plot: PNGs of the runs in `dirs` into dirs[0]: spectrum (Fig. 3a/c), monitors, alignment (Fig. 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = []
    for d in dirs:
        c, metrics, spec = read_run(d, "--plot")
        metrics = [r for r in metrics if not r.get("crashed")]
        if not metrics:
            fail(f"--plot {d}: no epoch in {os.path.join(d, 'metrics.jsonl')} yet")
        name = f"{os.path.basename(os.path.normpath(d))}: {c['loss']}, {c['predictor']}, " + \
            ("EMA" if c["ema"] else "no EMA")
        runs.append((name, c, metrics, spec))
    written = []

    def save(fig, name):
        fig.savefig(os.path.join(dirs[0], name), dpi=110)
        plt.close(fig)
        written.append(os.path.join(dirs[0], name))

    with_spectrum = [r for r in runs if r[3]]
    if with_spectrum:
        n = len(with_spectrum)
        fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False,
                                 sharey=True, constrained_layout=True)
        for ax, (name, c, _, spec) in zip(axes[0], with_spectrum):
            t = [r["step"] / c["steps_per_epoch"] for r in spec]
            s = torch.tensor([r["eigenvalues"] for r in spec]).clamp(min=1e-12)[:, ::10]   # one in ten
            ax.semilogy(t, s.numpy(), lw=0.9, color="C0", alpha=0.8)
            ax.set(title=name, xlabel="epoch", ylabel="eigenvalues of C (one in ten)")
        save(fig, "spectrum.png")
    save(monitors_figure(plt, runs), "accuracy_monitors.png")
    for d, (name, c, _, spec) in zip(dirs, runs):
        aligned = [r for r in spec if "alignment" in r]
        if aligned:
            fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
            a = torch.tensor([r["alignment"] for r in aligned]).T           # (M, rows)
            t = [0] + [r["step"] / c["steps_per_epoch"] for r in aligned]    # each row ends a cell
            im = ax.pcolormesh(t, range(a.shape[0] + 1), a.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
            ax.invert_yaxis()
            ax.set(xlabel="epoch", ylabel="eigenvector u_i of C (0: largest eigenvalue)",
                   title=f"{name}:\ncos(u_i, W_P u_i) (Fig. 4)")
            fig.colorbar(im, ax=ax)
            save(fig, f"alignment-{os.path.basename(os.path.normpath(d))}.png")
    print("wrote " + ", ".join(written))
    return written


def monitors_figure(plt, runs):
    """Probe and k-NN top-1 (Figs. 3b/d, 7, 8) and the collapse monitors of every run over epochs."""
    keys = ["participation_ratio", "top_share", "effective_rank", "recruited", "z_std"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    axes = axes.ravel()
    for i, (name, c, metrics, _) in enumerate(runs):
        epochs = [r["epoch"] for r in metrics]
        for key, style in (("acc1", "-"), ("knn_acc1", "--")):
            pts = [(e, r[key]) for e, r in zip(epochs, metrics) if r.get(key) is not None]
            if pts:
                axes[0].plot(*zip(*pts), style, color=f"C{i}", marker=".",
                             label=f"{name} ({'probe' if key == 'acc1' else 'k-NN'})")
        for ax, key in zip(axes[1:], keys):
            ax.plot(epochs, [r.get(key) for r in metrics], color=f"C{i}", marker=".", label=name)
    axes[0].set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="evaluation")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    for ax, key in zip(axes[1:], keys):
        ax.set(xlabel="epoch", title=f"{key.replace('_', ' ')} of C" if key != "z_std" else "z_std")
    return fig


TITLES = dict(cifar10="CIFAR-10", cifar100="CIFAR-100", stl10="STL-10", tinyimagenet="TinyImageNet",
              folder="folder")
METHOD = ("predictor", "loss", "alpha", "eps")    # and whether there is an EMA target: a row of Tables 2, 3
RECIPE = ("arch", "stem", "image_size", "proj_hidden", "proj_dim", "pred_hidden", "ema", "tau", "optimizer",
          "lr", "wd", "probe_lr", "momentum", "lars_eta", "warmup_epochs", "warmup_start_lr", "epochs",
          "batch_size", "limit", "amp")          # the other settings: --table names those a run changed


def method(c):
    return (*(c[k] for k in METHOD), c["ema"] > 0)


def paper_rows():
    """Tables 2 and 3 from README.md beside this file: {method: (name, {dataset: cell})}, {} without it."""
    path, rows, titles = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), {}, None
    if not os.path.isfile(path):
        print(f"warning: no {path}: no paper numbers, rows named by their flags", file=sys.stderr)
        return rows
    with open(path, encoding="utf-8") as f:
        for cells in ([s.strip() for s in line.strip().strip("|").split("|")] for line in f):
            if cells[:4] == ["Method", "α", "EMA", "Command"]:
                titles = cells[4:]
            elif titles and len(cells) == 4 + len(titles) and cells[3].startswith("`python train.py"):
                args = parser().parse_args(cells[3].strip("`").replace("$D", "cifar10").split()[2:])
                paper = {d: cells[4 + titles.index(t)].replace("\\", "")          # "92.6\*" -> "92.6*"
                         for d, t in TITLES.items() if t in titles}
                rows.setdefault(method(vars(args)), (cells[0], paper))
    return rows


def setting(c, paper):
    """A run's row of --table: (its method's place in `paper`, name and flags it changed, alpha, EMA)."""
    argv = [f"--{k.replace('_', '-')}={c[k]}" for k in ("dataset", "image_size", *METHOD)]
    ref = vars(resolve(parser().parse_args(argv + (["--no-ema"] if not c["ema"] else []))))
    ref["image_size"], default, m = DATASETS[c["dataset"]]["crop"], vars(parser().parse_args([])), method(c)
    flag = lambda k: f"--{k.replace('_', '-')} {c[k]:{'g' if isinstance(c[k], float) else ''}}"  # noqa: E731
    extra = [flag(k) for k in RECIPE if c.get(k, ref[k]) != ref[k] and (k != "pred_hidden" or m[0] == "mlp")]
    columns = (f"{c['alpha']:g}" if m[0] == "closed" else "–", "yes" if c["ema"] else "no")
    if m in paper:
        return list(paper).index(m), paper[m][0] + (f" `{' '.join(extra)}`" if extra else ""), *columns
    own = [flag(k) for k in METHOD if c[k] != default[k]]
    return len(paper), f"`{' '.join(own + extra) or 'defaults'}`", *columns


def result_cell(runs, paper_cell):
    """A --table cell: 'mean ± std (runs)' of the probe top-1, marks, k-NN likewise, the paper's number."""
    def mean_std(key):
        t = torch.tensor([r[key] for r in runs if r[key] is not None], dtype=torch.float64)
        return "–" if not len(t) else f"{t.mean():.1f}" + (f" ± {t.std():.1f}" if len(t) > 1 else "")
    marks = "†" * any(r["dagger"] for r in runs) + "‡" * any(r["unfinished"] for r in runs)
    knn = mean_std("knn")
    return (f"{mean_std('acc1')} ({len(runs)}){marks}" + (f"; k-NN {knn}" if knn != "–" else "")
            + (f"; paper {paper_cell}" if paper_cell else ""))


def table(dirs):
    """--table: prints the runs in `dirs` as README's Tables 2 and 3 in Markdown; returns its lines."""
    paper, groups = paper_rows(), {}
    for d in dirs:
        c, rows, _ = read_run(d, "--table")     # a run's last probe and k-NN top-1 (None: never), † and ‡
        good = [r for r in rows if not r.get("crashed")]
        last = lambda k: next((r[k] for r in reversed(good) if r.get(k) is not None), None)    # noqa: E731
        crashed = len(good) < len(rows)
        done = good[-1].get("epoch", 0) if good else 0
        result = dict(acc1=last("acc1"), knn=last("knn_acc1"), unfinished=not crashed and done < c["epochs"],
                      dagger=crashed or bool(good and good[-1].get("collapsed")))
        groups.setdefault(setting(c, paper), {}).setdefault(c["dataset"], []).append(result)
    datasets = [d for d in TITLES if any(d in g for g in groups.values())]
    lines = [f"| Setting | α | EMA | {' | '.join(TITLES[d] for d in datasets)} |",
             "|---" * (3 + len(datasets)) + "|"]
    for key in sorted(groups):
        numbers = list(paper.values())[key[0]][1] if key[0] < len(paper) else {}
        cells = [result_cell(groups[key][d], numbers.get(d)) if d in groups[key] else "" for d in datasets]
        lines.append(f"| {' | '.join(key[1:])} | {' | '.join(cells)} |")
    lines.append("\nLast probe top-1 (%): mean ± std over the runs (their number in brackets); † a run "
                 "crashed or ended collapsed; ‡ a run short of its last epoch; k-NN likewise.")
    print("\n".join(lines))
    return lines


def timed(fn, cfg, repeats=5):
    """Median seconds of fn() over `repeats` calls after one warm-up call, waiting for the device."""
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(1 + repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[repeats // 2]


def bench_step(cfg, views, repeats):
    """Seconds of one training step on the views and of its parts, and the FLOPs the step counts."""
    schedule(cfg, 1000)
    run = build_run(cfg, 10)
    model, target = run.model, run.target
    x1, x2 = (v.contiguous(memory_format=layout(cfg)) for v in views())
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=cfg.device)
    step = lambda: train_step(run, x1, x2, y, cfg, 0.99)                                 # noqa: E731
    z = torch.randn(cfg.batch_size, cfg.proj_dim, device=cfg.device)
    with FlopCounterMode(display=False) as flops:
        step()
    ms = dict(data=timed(views, cfg, repeats), step=timed(step, cfg, repeats),
              C_update_and_eigh=timed(lambda: (model.C_keeper.update(z, z), model.C_keeper()), cfg, repeats),
              optimiser=timed(run.opt.step, cfg, repeats),
              ema=timed(lambda: update_target(target, model.encoder, 0.99), cfg, repeats) if target else 0.0)
    ms["forward_backward"] = ms["step"] - ms["C_update_and_eigh"] - ms["optimiser"] - ms["ema"]
    return ms, flops.get_total_flops()


def bench(cfg, repeats=5):
    """--bench on synthetic uint8 images of the dataset's size: prints a table, writes <out>/bench.json."""
    torch.manual_seed(cfg.seed)
    d, B = DATASETS[cfg.dataset], cfg.batch_size
    images = torch.randint(0, 256, (4 * B, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    # On a CPU both on one core: a fair ratio (oversubscribed threads slow the batched ops many times)
    cpu, threads = not cfg.device.startswith("cuda"), torch.get_num_threads()
    torch.set_num_threads(1 if cpu else threads)
    workers = 0 if cpu else cfg.workers
    synthetic = ImageList([(x, 0) for x in images], train_transform(cfg), lambda x: x)
    per_image = torch.utils.data.DataLoader(synthetic, B, num_workers=workers)
    out = dict(device=str(cfg.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), batch_size=B,
               image_size=cfg.image_size, dataset=cfg.dataset, workers=workers, amp=cfg.amp)
    out["per_image_ips"] = len(images) / timed(lambda: [b for b in per_image], cfg, 3)
    x = images[:B].to(cfg.device)
    g = torch.Generator(cfg.device)
    views = lambda: batch_two_views(x, cfg.image_size, d["mean"], d["std"], cfg.blur, g)   # noqa: E731
    out["batched_ips"] = B / timed(views, cfg, repeats)
    out["aug_speedup"] = out["batched_ips"] / out["per_image_ips"]
    torch.set_num_threads(threads)

    ms, flops = bench_step(cfg, views, repeats)
    out["step_ms"] = {k: 1000 * v for k, v in ms.items()}
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16 if cfg.amp == "fp16" else torch.float32
    n = 8192 if cfg.device.startswith("cuda") else 1024       # a large product: the device's matrix throughput
    a = torch.randn(n, n, device=cfg.device, dtype=dtype)
    out["peak_tflops"] = 2 * n ** 3 / timed(lambda: a @ a, cfg, repeats) / 1e12
    out["gflop_per_image"] = flops / B / 1e9
    out["step_over_floor"] = ms["step"] / (flops / (out["peak_tflops"] * 1e12))
    u = torch.randn(B, cfg.proj_dim, dtype=torch.float64) * torch.logspace(0, -3, cfg.proj_dim)   # C: spread
    C = u.T @ u / B
    devices = ("cpu", *(["cuda"] if torch.cuda.is_available() else []))
    eigh = lambda dev, dt: torch.linalg.eigh(C.to(dev, getattr(torch, dt)))                   # noqa: E731
    out["eigh_ms"] = {f"{dev} {dt}": 1000 * timed(lambda: eigh(dev, dt), cfg, repeats)
                      for dev in devices for dt in ("float32", "float64")}
    print(f"{cfg.dataset} {cfg.image_size} px, batch {B}, {cfg.device}, torch {torch.__version__}, amp {cfg.amp}")
    print(f"augmentation, both views: per image ({workers} workers) {out['per_image_ips']:8.0f} img/s, "
          f"batched on {cfg.device} {out['batched_ips']:8.0f} img/s: {out['aug_speedup']:.1f}x")
    print("step (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in out["step_ms"].items())
          + f"; {B / ms['step']:.0f} img/s")
    print(f"floor: {out['gflop_per_image']:.2f} GFLOP per image at the {out['peak_tflops']:.3g} TFLOP/s measured "
          f"here: the step takes {out['step_over_floor']:.1f}x its floor")
    print("eigh of C (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in out["eigh_ms"].items()))
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "bench.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
