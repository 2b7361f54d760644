"""Tests for what comes after training: --table (Tables 2, 3 of your runs), the backbone in your own code
(README), run folders read defensively by --plot and --table, and the data's contents checked before a run
starts."""
import json
import os
import pickle
import re
import shutil
import statistics

import numpy as np
import pytest
import torch
import torchvision

import train
from test_train import (HERE, SMALL, no_md5, read_metrics, run, write_cifar, write_folder,  # noqa: F401
                        write_stl10)

README = os.path.join(HERE, "README.md")


def cells(line):
    return [s.strip() for s in line.strip().strip("|").split("|")]


def readme_rows():
    """The rows of README's Tables 2, 3, read here on their own: Method, α, EMA, Command, four datasets."""
    with open(README, encoding="utf-8") as f:
        return [cells(line) for line in f if "| `python train.py --dataset $D" in line]


def mean_std(values):
    std = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{std}"


def table_rows(lines):
    """--table's lines -> [[setting, α, EMA, cells...], ...]."""
    assert lines[0].startswith("| Setting | α | EMA |") and set(lines[1]) == set("|-")
    return [cells(line) for line in lines[2:] if line.startswith("|")]


# -----------------------------------------------------------------------------
# Short real runs, shared by the tests of this file
# -----------------------------------------------------------------------------

RUNS = {"dp0": ["--loss=cos", "--no-ema", "--seed=0", "--knn"],
        "dp1": ["--loss=cos", "--no-ema", "--seed=1", "--knn"],
        "iso0": ["--seed=0"], "iso1": ["--seed=1"],
        "crash": ["--loss=cos", "--no-ema", "--lr=1e30"],                     # crashes (exit code 3)
        "stem7": ["--stem=7x7-maxpool", "--epochs=1"], "stem3m": ["--stem=3x3-maxpool", "--epochs=1"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Short CPU runs on CIFAR-format files: DirectPred without EMA and IsoLoss, two seeds each (2 epochs),
    one that crashes, and one per other stem."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as m:                  # as the no_md5 fixture, for the whole module
        m.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
        for name, extra in RUNS.items():
            try:
                run(root, "cifar10", "--epochs=2", *extra, out=name)
            except SystemExit as e:
                assert name == "crash" and e.code == train.CRASHED
    return root


# -----------------------------------------------------------------------------
# --table
# -----------------------------------------------------------------------------

def test_table_of_short_runs(runs, capsys):
    """Each cell against the runs' own metrics.jsonl: mean ± std of the last probe top-1, the count, † for the
    crashed run (and any run that ended collapsed), k-NN where the runs have it, and README's paper number."""
    lines = train.main(["--table", *(str(runs / n) for n in ("dp0", "iso1", "dp1", "crash", "iso0"))])
    assert capsys.readouterr().out.startswith(lines[0])
    rows = {r[0]: r[1:] for r in table_rows(lines)}
    paper = {" ".join(r[:3]): r[4] for r in readme_rows()}           # CIFAR-10's column
    small = "--image-size 16 --proj-hidden 32 --proj-dim 16 --epochs 2 --batch-size 4 --limit 8"
    crashing = small.replace("16 --e", "16 --lr 1e+30 --e")      # the crashed run's lr: a setting of its own
    assert list(rows) == [f"DirectPred `{small}`", f"DirectPred `{crashing}`", f"IsoLoss `{small}`"]
    for setting, names, ema in (("DirectPred", ("dp0", "dp1"), "no"), ("IsoLoss", ("iso0", "iso1"), "yes")):
        metrics = [read_metrics(runs / n) for n in names]
        dagger = "†" * any(m[-1]["collapsed"] for m in metrics)
        text = f"{mean_std([m[-1]['acc1'] for m in metrics])} (2){dagger}"
        if setting == "DirectPred":
            text += f"; k-NN {mean_std([m[-1]['knn_acc1'] for m in metrics])}"
        assert rows[f"{setting} `{small}`"] == ["0.5", ema, f"{text}; paper {paper[f'{setting} 0.5 {ema}']}"]
    crash = read_metrics(runs / "crash")
    last = f"{crash[0]['acc1']:.1f}" if len(crash) > 1 else "–"
    assert crash[-1]["crashed"] and rows[f"DirectPred `{crashing}`"][2] == \
        f"{last} (1)†; paper {paper['DirectPred 0.5 no']}"


def write_run(root, name, flags, rows, dataset="cifar10"):
    """A run folder by hand: config.json of the resolved `flags`, metrics.jsonl of `rows`."""
    out = root / name
    out.mkdir()
    cfg = vars(train.get_config([f"--dataset={dataset}", "--device=cpu", *flags]))
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


def rows_of(*acc, collapsed=False, **extra):
    return [dict(epoch=e, step=2 * e, acc1=a, collapsed=collapsed and e == len(acc), **extra)
            for e, a in enumerate(acc, 1)]


def test_table_names_every_readme_row_as_the_paper_does(tmp_path):
    """Each command of README's table, three seeds each, run to the end (epoch 1000): a row named by README's
    Method and nothing else, its α and EMA as README has them, in README's order, with the sample mean ± std
    and the paper's number."""
    dirs, expected = [], []
    for i, (name, alpha, ema, command, *numbers) in enumerate(readme_rows()):
        flags = command.strip("`").split()[4:]                          # after `python train.py --dataset $D`
        for s, acc in enumerate(accs := [10.0 + i, 12.5 + i, 20.0 + 2 * i]):
            done = [dict(epoch=1000, acc1=acc)]
            dirs.append(write_run(tmp_path, f"{i}-{s}", [*flags, f"--seed={s}"], done))
        cell = f"{mean_std(accs)} (3); paper {numbers[0].replace(chr(92), '')}"   # README's "92.6\*": 92.6*
        expected.append([name, alpha, ema, cell])
    assert len(expected) == 10
    assert table_rows(train.table(dirs[::-1])) == expected


def test_table_marks_crashes_collapse_unfinished_runs_and_names_other_settings(tmp_path):
    """By hand: the last evaluated top-1 counts (--eval-every), † for a crash or a collapsed last epoch, ‡ for
    a run short of its last epoch, k-NN over the runs that have it, settings off the paper's rows by their
    flags, a column per dataset present."""
    iso = ["--loss=iso_cos", "--epochs=3"]
    dirs = [write_run(tmp_path, "a", iso, rows_of(40, 60, None)),                     # last evaluation: 60
            write_run(tmp_path, "b", iso, rows_of(30, 50, 70, knn_acc1=55)),
            write_run(tmp_path, "c", iso, rows_of(30, 45) + [dict(epoch=3, step=5, crashed=True)]),
            write_run(tmp_path, "d", iso, rows_of(10, 20), dataset="stl10"),                   # unfinished
            write_run(tmp_path, "e", ["--loss=iso_euc", "--epochs=2"], rows_of(5, 9, collapsed=True)),
            write_run(tmp_path, "f", ["--predictor=mlp", "--loss=euc", "--epochs=1", "--arch=resnet34"],
                      rows_of(3)),
            write_run(tmp_path, "g", iso + ["--arch=resnet34"], rows_of(1, 2, 3))]
    lines = train.table(dirs)
    assert lines[0] == "| Setting | α | EMA | CIFAR-10 | STL-10 |"
    paper = {" ".join(r[:3]): r for r in readme_rows()}["IsoLoss 0.5 yes"]
    assert {r[0]: r[1:] for r in table_rows(lines)} == {
        "IsoLoss `--epochs 3`": ["0.5", "yes", f"{mean_std([60, 70, 45])} (3)†; k-NN 55.0; paper {paper[4]}",
                                 f"20.0 (1)‡; paper {paper[6]}"],
        "IsoLoss `--arch resnet34 --epochs 3`": ["0.5", "yes", f"3.0 (1); paper {paper[4]}", ""],
        "`--loss iso_euc --epochs 2`": ["0.5", "yes", "9.0 (1)†", ""],
        "`--predictor mlp --loss euc --arch resnet34 --epochs 1`": ["–", "yes", "3.0 (1)", ""]}


def test_table_and_plot_read_runs_in_progress(runs, tmp_path, capsys):
    """A last line cut short in metrics.jsonl and spectrum.jsonl (a run writing it, or killed) is skipped with
    a warning: the table is the one of the complete files, and --plot draws."""
    before = train.table([str(runs / "dp0")])
    shutil.copytree(runs / "dp0", tmp_path / "dp0")
    for name in ("metrics.jsonl", "spectrum.jsonl"):
        with open(tmp_path / "dp0" / name, "a") as f:
            f.write('{"epoch": 3, "step": 6, "lo')
    capsys.readouterr()
    assert train.table([str(tmp_path / "dp0")]) == before
    err = capsys.readouterr().err
    assert "warning:" in err and "metrics.jsonl" in err and "cut short" in err
    written = train.main(["--plot", str(tmp_path / "dp0")])
    assert len(written) == 2 and capsys.readouterr().err.count("warning:") == 2


def missing(d):
    shutil.rmtree(d)
    return "config.json"


def empty(d):
    for p in d.iterdir():
        p.unlink()
    return "config.json"


def corrupt(name, text):
    def breaks(d):
        (d / name).write_text(text)
        return name
    return breaks


BROKEN = {"missing folder": missing, "empty folder": empty,
          "config.json cut short": corrupt("config.json", '{"dataset": "cifar10", "epo'),
          "config.json a list": corrupt("config.json", "[1, 2]"),
          "config.json without loss": corrupt("config.json", '{"dataset": "cifar10", "epochs": 1}'),
          "metrics.jsonl garbage": corrupt("metrics.jsonl", "not json\n"),
          "metrics.jsonl bad middle line": corrupt("metrics.jsonl", '{"epoch": 1, "ste\n{"epoch": 2}\n'),
          "spectrum.jsonl garbage": corrupt("spectrum.jsonl", "\x00\x01garbage")}


@pytest.mark.parametrize("option", ["--plot", "--table"])
@pytest.mark.parametrize("breakage", BROKEN)
def test_bad_run_folders_stop_with_one_line_naming_the_file(runs, tmp_path, capsys, option, breakage):
    d = tmp_path / "run"
    shutil.copytree(runs / "iso0", d)
    path = d / BROKEN[breakage](d)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        train.main([option, str(d)])
    msg = str(e.value.code)
    assert msg.startswith("train.py: error:") and "\n" not in msg and str(path) in msg
    assert "Traceback" not in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# -----------------------------------------------------------------------------
# The trained backbone in your own code (README)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, stem", [("iso0", "3x3"), ("stem7", "7x7-maxpool"), ("stem3m", "3x3-maxpool")])
def test_readme_backbone_gives_train_py_features(runs, name, stem, monkeypatch):
    """README's lines turn last.pt into a plain torchvision ResNet whose features on the evaluation images
    equal the backbone features that train.py's probe sees (train.features on its own Model)."""
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (snippet,) = [b for b in blocks if "encoder.backbone." in b]
    path = runs / name / "last.pt"
    scope = {}
    exec(compile(re.sub(r'path = ".*?"', f"path = {str(path)!r}", snippet), "README.md", "exec"), scope)
    net = scope["net"]
    assert type(net) is torchvision.models.ResNet and type(net.conv1) is torch.nn.Conv2d
    state = torch.load(path, weights_only=True)
    cfg = train.argparse.Namespace(**state["config"])
    assert cfg.stem == stem
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    loaders, classes = train.build_data(cfg)
    model = train.Model(cfg, classes)
    model.load_state_dict(state["model"])
    h, _ = train.features(model, loaders.eval, cfg)                       # (N, 512)
    with torch.no_grad():
        mine = torch.cat([net(x) for x, _ in loaders.eval])
    diff = (mine - h).abs().max().item()
    print(f"{stem}: largest feature difference {diff:.3g} (features up to {h.abs().max():.3g})")
    assert mine.shape == h.shape == (4, 512) and h.abs().max() > 0 and diff <= 1e-6 * h.abs().max()


# -----------------------------------------------------------------------------
# Contents of CIFAR / STL-10 files and the class count, checked before a run starts
# -----------------------------------------------------------------------------

def rewrite_cifar(root, name, change):
    path = root / "cifar-10-batches-py" / name
    entry = pickle.loads(path.read_bytes())
    change(entry)
    path.write_bytes(pickle.dumps(entry))


def cifar(name, change):
    def prepare(root):
        write_cifar(str(root))
        rewrite_cifar(root, name, change)
        return ["--dataset=cifar10"]
    return prepare


def stl10_label(split, value):
    def prepare(root):
        write_stl10(str(root))
        path = root / "stl10_binary" / f"{split}_y.bin"
        path.write_bytes(bytes([value]) + path.read_bytes()[1:])
        return ["--dataset=stl10"]
    return prepare


def one_class(root):
    write_folder(str(root), classes=("cat",), val_classes=("cat",))
    return ["--dataset=folder"]


BAD_CONTENTS = [  # (name, function(root) -> argv that writes the data, message)
    ("CIFAR-10 test label 10", cifar("test_batch", lambda e: e["labels"].__setitem__(0, 10)),
     "evaluation files hold labels other than integers in [0, 10), e.g. 10"),
    ("CIFAR-10 label -1", cifar("data_batch_3", lambda e: e["labels"].__setitem__(2, -1)), "e.g. -1"),
    ("CIFAR-10 label 2.5", cifar("data_batch_1", lambda e: e["labels"].__setitem__(1, 2.5)), "e.g. 2.5"),
    ("CIFAR-10 float images", cifar("data_batch_2", lambda e: e.update(data=e["data"].astype(np.float64))),
     "training files hold 20 images of float64 and 20 labels"),
    ("CIFAR-10 grey images", cifar("data_batch_1", lambda e: e.update(data=np.zeros((2, 3072), np.uint8),
                                                                     labels=[0] * 6)),   # 6 of 32 x 32 x 1
     "training files hold 18 images of uint8 and 22 labels"),
    ("CIFAR-10 a label short", cifar("test_batch", lambda e: e["labels"].pop()),
     "4 images of uint8 and 3 labels"),
    ("STL-10 train label 11", stl10_label("train", 11),
     "training files hold labels other than integers in [0, 10), e.g. 10"),
    ("STL-10 test label 0", stl10_label("test", 0),                                # 0 - 1 in uint8
     "evaluation files hold labels other than integers in [0, 10), e.g. 255"),
    ("one class", one_class, "1 class under"),
]


@pytest.mark.parametrize("name, prepare, message", BAD_CONTENTS, ids=[b[0] for b in BAD_CONTENTS])
def test_bad_contents_stop_before_the_run_starts(tmp_path, no_md5, capsys, name, prepare, message):
    """One `train.py: error:` line, exit code 1, nothing written. Before this check, CIFAR labels outside the
    class count trained until the probe's loss raised IndexError, after the run folder was made."""
    argv = prepare(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        train.main([*argv, f"--data-dir={tmp_path}", f"--out={tmp_path / 'run'}", "--image-size=16", *SMALL])
    msg = str(e.value.code)
    assert msg.startswith("train.py: error:") and "\n" not in msg and message in msg, msg
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_stl10_unlabelled_images_pass_the_check(tmp_path, no_md5):
    write_stl10(str(tmp_path))
    cfg = train.get_config(["--dataset=stl10", f"--data-dir={tmp_path}", "--device=cpu"])
    tr, _, classes = train.load_datasets(cfg, None, None)
    assert classes == 10 and list(tr.labels) == list(range(8)) + [-1] * 8
