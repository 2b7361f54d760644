"""Tests for train.py's batched augmentation (--gpu-aug: sample_view, crop_matrix, separable, color_jitter,
adjust_hue, luma, gaussian_blur, apply_view, batch_two_views). CPU only, seeded, one thread.

1. Parameters are drawn per image, with the probabilities and ranges of Table 4 / view_transform.
2. Crop boxes follow torchvision's RandomResizedCrop draws in distribution (KS), fallback included.
3. For fixed parameters each op equals torchvision's functional op image by image, and a whole view
   equals torchvision's float ops in view_transform's order (and departs from its uint8 ops by the
   documented rounding only).
4. Statistics of many views equal those of train.py's per-image torchvision v2 pipeline (KS, means).
5. Interface: shapes, dtype, reproducibility, CPU chunking, the asymmetric views, no host sync on CUDA.
Tolerances are given, with their reasons, where they are used.
"""
import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import train

BICUBIC = TF.InterpolationMode.BICUBIC
MEAN, STD = train.DATASETS["cifar10"]["mean"], train.DATASETS["cifar10"]["std"]
JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: results and run time independent of the core count (the per-image torchvision
    loops are also much slower with several threads on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sample(n, H, W, seed, blur_p=0.5, solarize_p=0.5):
    return train.sample_view(n, H, W, blur_p, solarize_p, gen(seed), CPU)


def boxes(p):
    return p["top"], p["left"], p["height"], p["width"]


def crop(x, p, size):
    """The crop + flip of float images x (B, C, H, W) with p's boxes and flips: (B, C, size, size)."""
    H, W = x.shape[2:]
    return train.separable(x, train.crop_matrix(p["top"], p["height"], H, size),
                           train.crop_matrix(p["left"], p["width"], W, size, p["flip"]))


def smooth_images(n, h, w, seed):
    """(n, 3, h, w) uint8 images with structure (smooth colour fields, a left-right ramp, some grey and
    saturated areas) so crops, flips and colour ops change their statistics, unlike uniform noise."""
    g = gen(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    ramp = torch.linspace(-0.3, 0.3, w)
    x = x + ramp * (torch.rand(n, 1, 1, 1, generator=g) > 0.3)
    x = x + 0.05 * torch.randn(n, 3, h, w, generator=g)
    x[: n // 4, :, : h // 3] = x[: n // 4, :1, : h // 3]             # a grey band in some images
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def per_image(fn, x, *params):
    """Stack fn(image, its parameters as Python numbers) over the batch: the torchvision reference."""
    return torch.stack([fn(x[i], *(p[i].tolist() for p in params)) for i in range(x.shape[0])])


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov distance max |F_a - F_b| (exact for discrete values, too)."""
    a, b = a.double().sort().values, b.double().sort().values
    v = torch.cat([a, b]).unique()
    fa = torch.searchsorted(a, v, right=True) / len(a)
    fb = torch.searchsorted(b, v, right=True) / len(b)
    return (fa - fb).abs().max().item()


def ks_critical(n, m, alpha=1e-3):
    """The asymptotic KS critical distance at level alpha (conservative for discrete values)."""
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


# -----------------------------------------------------------------------------
# 1. Parameters are drawn per image
# -----------------------------------------------------------------------------

def test_parameters_differ_within_a_batch():
    p = sample(64, 32, 32, 0)
    assert len(torch.stack(boxes(p), 1).unique(dim=0)) > 48
    assert len(p["factors"].unique(dim=0)) == 64 and all(len(c.unique()) == 64 for c in p["factors"].T)
    assert len(p["order"].unique(dim=0)) > 16                          # 24 permutations exist
    assert len(p["sigma"].unique()) == 64
    for k in ("flip", "jitter", "gray", "blur", "solarize"):
        assert 0 < p[k].sum() < 64, k
    # The same image 16 times gives 16 different views.
    x = smooth_images(1, 32, 32, 0).expand(16, -1, -1, -1)
    for v in train.batch_two_views(x, 32, MEAN, STD, blur=True, generator=gen(1)):
        assert len(v.flatten(1).unique(dim=0)) == 16


def test_parameter_frequencies():
    """Probabilities and ranges of Table 4 (literal values), per image: |freq - p| < 5 binomial standard
    errors, uniform means within 5 standard errors, each of the 24 jitter orders with probability 1/24."""
    n = 20000
    p = sample(n, 32, 32, 2, 0.1, 0.2)
    assert p["blur_p"] == 0.1
    for k, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.2)):
        assert p[k].shape == (n,) and p[k].dtype == torch.bool, k
        assert abs(p[k].float().mean().item() - prob) < 5 * math.sqrt(prob * (1 - prob) / n), k
    lo = torch.tensor([0.6, 0.6, 0.8, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.2, 0.1])
    f = p["factors"]
    assert f.shape == (n, 4) and (f >= lo).all() and (f <= hi).all()
    assert ((f.mean(0) - (lo + hi) / 2).abs() < 5 * (hi - lo) / math.sqrt(12 * n)).all()
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert abs(p["sigma"].mean().item() - 1.05) < 5 * 1.9 / math.sqrt(12 * n)
    assert (p["order"].sort(1).values == torch.arange(4)).all()
    codes = (p["order"] * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24
    assert ((counts - n / 24).abs() < 5 * math.sqrt(n / 24 * (23 / 24))).all()
    # p = 0: never drawn
    p = sample(n, 32, 32, 2, 0.0, 0.0)
    assert not p["blur"].any() and not p["solarize"].any()


# -----------------------------------------------------------------------------
# 2. Crop sampling = torchvision's RandomResizedCrop parameters, in distribution
# -----------------------------------------------------------------------------

def torchvision_crops(n, height, width):
    """n draws of train.py's RandomResizedCrop parameters (top, left, h, w), torchvision's own code."""
    t = v2.RandomResizedCrop(32, scale=(0.08, 1.0), interpolation=BICUBIC, antialias=True)
    params = getattr(t, "make_params", None) or t._get_params      # _get_params in older torchvision
    img = torch.empty(3, height, width, dtype=torch.uint8)
    torch.manual_seed(3)
    out = [params([img]) for _ in range(n)]
    return tuple(torch.tensor([o[k] for o in out]) for k in ("top", "left", "height", "width"))


@pytest.mark.parametrize("height,width", [(32, 32), (20, 100)])
def test_crop_sampling_matches_torchvision(height, width):
    """KS distance between 20000 batched and 20000 torchvision draws of area fraction, log aspect ratio,
    top and left, below the 0.1% critical value (0.0195). 20 x 100 is outside the ratio range: about a
    fifth of the draws there end in the centre-crop fallback, whose frequency is compared as well
    (within 5 standard errors of the difference of two binomial frequencies)."""
    n = 20000
    ours = boxes(sample(n, height, width, 4))
    ref = torchvision_crops(n, height, width)
    assert all(t.dtype == torch.int64 and t.shape == (n,) for t in ours)
    for box in (ours, ref):
        top, left, h, w = box
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()

    def stats(box):
        top, left, h, w = box
        return dict(area=h * w / (height * width), log_ratio=torch.log(w / h), top=top, left=left)

    crit = ks_critical(n, n)
    for k, a in stats(ours).items():
        assert ks_statistic(a, stats(ref)[k]) < crit, k
    if width / height > 4 / 3:
        fw = round(height * 4 / 3)
        fallback = [((b[0] == 0) & (b[1] == (width - fw) // 2) & (b[2] == height) & (b[3] == fw)).float().mean()
                    for b in (ours, ref)]
        assert 0.1 < fallback[1] < 0.4
        assert abs(fallback[0] - fallback[1]) < 5 * math.sqrt(2 * fallback[1] * (1 - fallback[1]) / n)


def test_crop_fallback_is_torchvision_centre_crop():
    """An 8 x 200 image admits no crop in 10 tries: always torchvision's centred fallback box; 200 x 8
    (tall) likewise, clipped to ratio 3/4."""
    for hw in ((8, 200), (200, 8)):
        ref = torchvision_crops(5, *hw)
        for ours, theirs in zip(boxes(sample(100, *hw, 5)), ref):
            assert (ours == theirs[0]).all() and (theirs == theirs[0]).all(), hw


# -----------------------------------------------------------------------------
# 3. For fixed parameters each op equals torchvision's functional op, image by image
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("in_hw,size", [((32, 32), 32), ((40, 24), 32), ((64, 48), 24)])
def test_crop_and_flip_match_torchvision(in_hw, size):
    """separable(crop_matrix rows, crop_matrix cols with flip) = F.resized_crop(bicubic, antialias=True)
    then F.hflip, on float images: up-sampling (the train.py case: crop <= image = output size), mixed, and
    down-sampling (antialiased, wider kernel). Same taps and weights as torch's kernel, summed in another
    order: |diff| < 1e-5."""
    g = gen(6)
    x = torch.rand(48, 3, *in_hw, generator=g)
    p = sample(48, *in_hw, 7)
    ours = crop(x, p, size)
    ref = per_image(lambda im, t, l, hh, ww, f: (TF.hflip if f else (lambda z: z))(
        TF.resized_crop(im, t, l, hh, ww, [size, size], BICUBIC, antialias=True)), x, *boxes(p), p["flip"])
    assert ours.shape == (48, 3, size, size) and 0 < p["flip"].sum() < 48
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_crop_full_box_is_identity():
    """The whole image at its own size: cubic weights 1, 0, 0 at integer offsets, exactly the identity
    (the flip: exactly the reversed columns)."""
    x = torch.rand(4, 3, 32, 32, generator=gen(7))
    full, zero = torch.full((4,), 32), torch.zeros(4, dtype=torch.long)
    flip = torch.tensor([False, True, False, True])
    rows = train.crop_matrix(zero, full, 32, 32)
    assert torch.equal(rows, torch.eye(32).expand(4, -1, -1))
    ours = train.separable(x, rows, train.crop_matrix(zero, full, 32, 32, flip))
    assert torch.equal(ours, torch.where(flip[:, None, None, None], x.flip(-1), x))


def colour_images():
    """(48, 3, 24, 24) float images in [0, 1]: grey images (hue undefined), uint8 levels (ties between
    channels), grey areas and saturated ones."""
    x = smooth_images(48, 24, 24, 8).float() / 255
    x[:4] = x[:4, :1]
    return x


def test_single_jitter_ops_match_torchvision():
    """Brightness, contrast, saturation alone through color_jitter (the other factors neutral: 1, 1, 1,
    hue 0; orders random) = F.adjust_*: float32 rounding, the hue-0 pass included (a few ulp, measured
    <= 8e-7): 2e-6."""
    g = gen(9)
    x = colour_images()
    f = 0.6 + 0.8 * torch.rand(48, generator=g)
    order = torch.rand(48, 4, generator=g).argsort(1)
    on = torch.ones(48, dtype=torch.bool)
    for k, op in enumerate(JITTER_OPS[:3]):
        factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(48, 1)
        factors[:, k] = f
        torch.testing.assert_close(train.color_jitter(x, factors, order, on), per_image(op, x, f),
                                   atol=2e-6, rtol=0, msg=op.__name__)


def test_hue_and_grey_match_torchvision():
    """adjust_hue over the full range [-0.5, 0.5] = F.adjust_hue: 1e-5 (the closed-form hsv->rgb and
    torchvision's piecewise one each round 6 h); luma = F.rgb_to_grayscale: 1e-6."""
    x = colour_images()
    hue = torch.rand(48, generator=gen(10)) - 0.5
    torch.testing.assert_close(train.adjust_hue(x, hue), per_image(TF.adjust_hue, x, hue), atol=1e-5, rtol=0)
    assert train.luma(x).shape == (48, 1, 24, 24)
    torch.testing.assert_close(train.luma(x).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)


def test_color_jitter_matches_torchvision_in_each_order():
    """ColorJitter's four ops in each image's own order (all 24 orders occur) with its own factors, or
    untouched where not applied: 1e-5 (composed float32 rounding)."""
    x = torch.rand(96, 3, 16, 16, generator=gen(11))
    p = sample(96, 16, 16, 12)
    order = p["order"].clone()
    order[:24] = torch.tensor([[a, b, c, d] for a in range(4) for b in range(4) for c in range(4)
                               for d in range(4) if len({a, b, c, d}) == 4])

    def reference(im, fac, o, on):
        for k in (o if on else []):
            im = JITTER_OPS[k](im, fac[k])
        return im

    ours = train.color_jitter(x, p["factors"], order, p["jitter"])
    ref = per_image(reference, x, p["factors"], order, p["jitter"])
    assert 0 < p["jitter"][:24].sum() < 24
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(ours[~p["jitter"]], x[~p["jitter"]])


def test_gaussian_blur_matches_torchvision():
    """gaussian_blur(per-image sigma, reflect padding) = F.gaussian_blur(13, sigma) where active (2e-6:
    separable vs torchvision's 2-D kernel), unchanged elsewhere; a blurred point is the outer product of
    exp(-t^2 / 2 sigma^2) / sum, t = -6..6 (1e-6)."""
    g = gen(13)
    x = torch.rand(32, 3, 20, 20, generator=g)
    sigma = 0.1 + 1.9 * torch.rand(32, generator=g)
    active = torch.rand(32, generator=g) < 0.5
    ref = per_image(lambda im, s, a: TF.gaussian_blur(im, [13, 13], [s, s]) if a else im, x, sigma, active)
    ours = train.gaussian_blur(x, sigma, active)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    assert torch.equal(ours[~active], x[~active])
    point = torch.zeros(3, 1, 20, 20)
    point[..., 10, 10] = 1
    s = torch.tensor([0.3, 1.0, 2.0])
    k = torch.exp(-torch.arange(-6.0, 7.0) ** 2 / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                                    # (3, 13)
    expected = torch.zeros(3, 1, 20, 20)
    expected[:, 0, 4:17, 4:17] = k[:, :, None] * k[:, None, :]
    torch.testing.assert_close(train.gaussian_blur(point, s, torch.ones(3, dtype=torch.bool)), expected,
                               atol=1e-6, rtol=0)


def test_grey_solarize_normalize_in_apply_view():
    """apply_view with the identity crop and no jitter or blur = to_dtype, F.rgb_to_grayscale and
    F.solarize(128 / 255) where drawn, F.normalize: every uint8 level occurs (127 kept, 128 inverted).
    Float32 rounding after normalisation (/ std ~ 4x): 1e-6."""
    x = smooth_images(16, 16, 16, 14)
    x.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    p = sample(16, 16, 16, 15)
    p.update(top=torch.zeros(16, dtype=torch.long), left=torch.zeros(16, dtype=torch.long),
             height=torch.full((16,), 16), width=torch.full((16,), 16), flip=torch.zeros(16, dtype=torch.bool),
             jitter=torch.zeros(16, dtype=torch.bool), blur_p=0.0)
    p["solarize"][0] = True
    assert 0 < p["gray"].sum() < 16 and 1 < p["solarize"].sum() < 16

    def reference(im, gray, sol):
        im = TF.to_dtype(im, torch.float32, scale=True)
        im = TF.rgb_to_grayscale(im, 3) if gray else im
        im = TF.solarize(im, 128 / 255) if sol else im
        return TF.normalize(im, list(MEAN), list(STD))

    ref = per_image(reference, x, p["gray"], p["solarize"])
    torch.testing.assert_close(train.apply_view(x, p, 16, MEAN, STD), ref, atol=1e-6, rtol=0)


def reference_view(img, p, i, size, float_path=True):
    """view_transform's ops in its order with the parameters of image i, torchvision functional ops: on
    float images (the batched pipeline's arithmetic) or on uint8 (train.py's CPU pipeline)."""
    x = TF.to_dtype(img, torch.float32, scale=True) if float_path else img
    x = TF.resized_crop(x, p["top"][i].item(), p["left"][i].item(), p["height"][i].item(),
                        p["width"][i].item(), [size, size], BICUBIC, antialias=True)
    if float_path:
        x = x.clamp(0, 1)                                             # the uint8 path saturates here
    if p["jitter"][i]:
        for k in p["order"][i].tolist():
            x = JITTER_OPS[k](x, p["factors"][i, k].item())
    if p["gray"][i]:
        x = TF.rgb_to_grayscale(x, 3)
    if p["blur_p"] > 0 and p["blur"][i]:
        s = p["sigma"][i].item()
        x = TF.gaussian_blur(x, [13, 13], [s, s])
    if p["solarize"][i]:
        x = TF.solarize(x, 128 / 255 if float_path else 128)
    if p["flip"][i]:
        x = TF.hflip(x)
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(MEAN), list(STD))


@pytest.mark.parametrize("blur_p,solarize_p", [(1.0, 0.0), (0.5, 0.5)])
def test_view_matches_torchvision_ops_for_fixed_parameters(blur_p, solarize_p):
    """A whole view = torchvision's functional ops in view_transform's order with the same parameters.

    On float images: 2e-5 after normalisation (5e-6 in [0, 1] units, composed float32 rounding).
    Against the uint8 ops of train.py's CPU pipeline, the documented departure, in [0, 1] units: that
    pipeline rounds or truncates to uint8 after every op; brightness, contrast and saturation truncate,
    so it is darker by about 0.4/255 per jitter op applied. Bounds: mean in (0, 2/255), mean |.| < 2/255,
    99.9% quantile < 6/255, max < 12/255 (every op is continuous but solarisation, whose jump at the
    threshold is 1/255 on uint8)."""
    x = smooth_images(32, 32, 32, 16)
    p = sample(32, 32, 32, 17, blur_p, solarize_p)
    ours = train.apply_view(x, p, 32, MEAN, STD)
    ref = torch.stack([reference_view(x[i], p, i, 32) for i in range(32)])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    u8 = torch.stack([reference_view(x[i], p, i, 32, float_path=False) for i in range(32)])
    diff = (ours - u8) * torch.tensor(STD)[:, None, None]            # in [0, 1] units
    assert 0 < diff.mean() < 2 / 255
    assert diff.abs().mean() < 2 / 255
    assert diff.abs().flatten().quantile(0.999) < 6 / 255
    assert diff.abs().max() < 12 / 255


# -----------------------------------------------------------------------------
# 4. Statistics of many views = train.py's torchvision v2 pipeline
# -----------------------------------------------------------------------------

def view_statistics(v):
    """Per-view statistics, each sensitive to some augmentation: channel means and stds (crop, brightness,
    contrast, solarisation), mean r - g and g - b (hue), mean spread across channels (saturation, grey)
    and whether it is all grey, sharpness mean |gradient| (blur, crop scale), log of the horizontal over
    the vertical gradient (the crop's aspect ratio), left-right asymmetry (flip), fraction above 0.55
    (solarisation leaves none above 127/255; 0.55 keeps clear of the float/uint8 gap just above 1/2)."""
    u = v * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]     # [0, 1] units
    col = torch.linspace(-1, 1, v.shape[-1])
    gx = (u[..., 1:] - u[..., :-1]).abs().mean((1, 2, 3))
    gy = (u[..., 1:, :] - u[..., :-1, :]).abs().mean((1, 2, 3))
    spread = u.std(1)                                                 # (N, H, W)
    stats = dict(**{f"mean{c}": v[:, c].mean((1, 2)) for c in range(3)},
                **{f"std{c}": v[:, c].std((1, 2)) for c in range(3)},
                rg=(u[:, 0] - u[:, 1]).mean((1, 2)), gb=(u[:, 1] - u[:, 2]).mean((1, 2)),
                chroma=spread.mean((1, 2)), grey=(spread.amax((1, 2)) < 1e-5).float(),
                sharp=gx + gy, aniso=torch.log(gx / gy), asym=(u.mean(1) * col).mean((1, 2)),
                bright=(u > 0.55).float().mean((1, 2, 3)))
    # Rounded to 1e-6, so float noise (~1e-9) cannot split the atom at 0 of the grey views differently.
    return {k: (s * 1e6).round() / 1e6 for k, s in stats.items()}


def assert_same_distribution(ours, ref):
    """Every per-view statistic of n views each: KS distance below the 0.1% critical value (0.071 for
    n = 1536) and means within 5 standard errors of the difference; 20% grey views (5 binomial s.e.)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    sa, sb = view_statistics(ours), view_statistics(ref)
    n = len(ours)
    for k in sa:
        assert ks_statistic(sa[k], sb[k]) < ks_critical(n, n), k
        se = math.sqrt((sa[k].var() + sb[k].var()).item() / n)
        assert abs(sa[k].mean() - sb[k].mean()) < 5 * se + 1e-9, k
    assert abs(sa["grey"].mean() - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n)


@pytest.mark.parametrize("blur_p,solarize_p", [(1.0, 0.0), (0.1, 0.2)])
def test_view_statistics_match_view_transform(blur_p, solarize_p):
    """1536 views (12 images x 128) at 24 px of apply_view(sample_view) and of train.view_transform."""
    x = smooth_images(12, 24, 24, 18).repeat_interleave(128, 0)      # (1536, 3, 24, 24)
    ours = train.apply_view(x, train.sample_view(len(x), 24, 24, blur_p, solarize_p, gen(19), CPU), 24, MEAN, STD)
    t = train.view_transform(24, MEAN, STD, blur_p, solarize_p)
    torch.manual_seed(20)
    assert_same_distribution(ours, torch.stack([t(img) for img in x]))


def test_two_views_statistics_match_train_transform():
    """CIFAR-10 (32 px, no blur): views 1 and 2 of batch_two_views vs train_transform's, 1536 each."""
    cfg = train.get_config(["--device=cpu", "--dataset=cifar10"])
    x = smooth_images(12, 32, 32, 21).repeat_interleave(128, 0)      # (1536, 3, 32, 32)
    ours = train.batch_two_views(x, cfg.image_size, MEAN, STD, cfg.blur, gen(22))
    t = train.train_transform(cfg)
    torch.manual_seed(23)
    ref = [torch.stack(v) for v in zip(*(t(img) for img in x))]
    for a, b in zip(ours, ref):
        assert_same_distribution(a, b)


# -----------------------------------------------------------------------------
# 5. Interface: shapes, dtype, reproducibility, CPU chunks, the two views
# -----------------------------------------------------------------------------

def test_two_views_shape_dtype_and_reproducibility():
    x = smooth_images(8, 48, 48, 24)
    x0 = x.clone()
    v1, v2_ = train.batch_two_views(x, 40, MEAN, STD, blur=True, generator=gen(25))
    for v in (v1, v2_):
        assert v.shape == (8, 3, 40, 40) and v.dtype == torch.float32 and v.device == x.device
        assert v.is_contiguous() and torch.isfinite(v).all()
    assert torch.equal(x, x0)                                         # the input is not modified
    w1, w2 = train.batch_two_views(x, 40, MEAN, STD, blur=True, generator=gen(25))
    assert torch.equal(v1, w1) and torch.equal(v2_, w2)
    u1, _ = train.batch_two_views(x, 40, MEAN, STD, blur=True, generator=gen(26))
    assert not torch.equal(v1, u1) and not torch.equal(v1, v2_)
    torch.manual_seed(0)                                              # generator=None: torch's own
    a = train.batch_two_views(x, 40, MEAN, STD, blur=False)
    torch.manual_seed(0)
    b = train.batch_two_views(x, 40, MEAN, STD, blur=False)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("blur", [True, False])
def test_cpu_chunks_do_not_change_the_views(blur):
    """batch_two_views on the CPU (CPU_CHUNK images per pass, here 2 full chunks and a partial one) =
    apply_view on the whole batch with the parameters drawn from the same generator (sample_view for
    view 1, then view 2, with VIEWS' probabilities). Same per-image arithmetic: 1e-6 (measured: identical)."""
    n = 2 * train.CPU_CHUNK + 5
    x = smooth_images(n, 20, 20, 27)
    ours = train.batch_two_views(x, 16, MEAN, STD, blur, generator=gen(28))
    g = gen(28)
    for v, (blur_p, solarize_p) in zip(ours, train.VIEWS):
        p = train.sample_view(n, 20, 20, blur_p if blur else 0.0, solarize_p, g, CPU)
        torch.testing.assert_close(v, train.apply_view(x, p, 16, MEAN, STD), atol=1e-6, rtol=0)


def test_two_views_are_train_transforms_asymmetric_views():
    """Table 4 / solo-learn: view 1 blur always (blur datasets), never solarised; view 2 blur p 0.1,
    solarisation p 0.2; no blur on CIFAR-10. VIEWS (batch_two_views' settings) and train_transform agree."""
    assert train.VIEWS == ((1.0, 0.0), (0.1, 0.2))
    for dataset, expected in (("stl10", [(1.0, 0.0), (0.1, 0.2)]), ("cifar10", [(0.0, 0.0), (0.0, 0.2)])):
        t = train.train_transform(train.get_config(["--device=cpu", f"--dataset={dataset}"]))
        ops = [u.transforms for u in (t.t1, t.t2)]
        blur_p = [next((o.p for o in ts if isinstance(o, v2.RandomApply) and
                        isinstance(o.transforms[0], v2.GaussianBlur)), 0.0) for ts in ops]
        sol_p = [next((o.p for o in ts if isinstance(o, v2.RandomSolarize)), 0.0) for ts in ops]
        assert list(zip(blur_p, sol_p)) == expected, dataset


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_without_host_sync():
    """On a GPU: the views are made on the device without a host-device synchronisation."""
    x = smooth_images(16, 96, 96, 29).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        v1, v2_ = train.batch_two_views(x, 96, MEAN, STD, blur=True, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert v1.is_cuda and v1.shape == (16, 3, 96, 96) and torch.isfinite(v2_).all()
