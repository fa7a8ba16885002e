"""train on tiny synthetic digits: outputs, progress reporting, determinism, export, DDP."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from steps.model import EXPORT_FILE, MODEL_FILE, load_embedder, to_input
from steps.synthetic import make_digits
from steps.train import TrainParams, stratified_split, train

TINY = {"epochs": 1, "batch_size": 32, "seed": 3, "threads": 1, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    x, y = make_digits(320, seed=21)
    np.savez(d / "data.npz", x=x, y=y, src=np.zeros(len(x), np.int32))
    return d


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    epochs = []
    result = train(str(data_dir), str(out), TrainParams.from_dict({**TINY, "epochs": 2}),
                   on_epoch=epochs.append)
    return out, result, epochs


def test_outputs_and_result(trained):
    out, result, epochs = trained
    assert result["epochs"] == 2 and result["n_train"] == 260 and result["n_val"] == 60  # 6 of 32 per class
    assert 50_000 < result["n_params"] < 150_000
    assert 0.0 <= result["val_top1"] <= 1.0 and np.isfinite(result["final_loss"])
    assert {p.name for p in out.iterdir()} >= {MODEL_FILE, EXPORT_FILE, "params.json", "train_metrics.json"}
    assert json.loads((out / "params.json").read_text())["epochs"] == 2
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["val_top1"] == result["val_top1"]
    ckpt = torch.load(out / MODEL_FILE, weights_only=True)
    assert ckpt["params"]["seed"] == 3 and ckpt["config"]["embedding_dim"] == 128


def test_on_epoch_reports_each_epoch(trained):
    _, result, epochs = trained
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["epochs"] == 2 for e in epochs)
    assert all(set(e) >= {"loss", "train_acc", "seconds"} for e in epochs)
    assert epochs[-1]["val_top1"] == result["val_top1"] and "val_top1" not in epochs[0]
    assert epochs[1]["loss"] < epochs[0]["loss"]  # it learns


def test_export_loads_without_project_code_and_matches_the_checkpoint(trained, tmp_path):
    out, _, _ = trained
    x, _ = make_digits(7, seed=99)
    via_ckpt = load_embedder(out, prefer="checkpoint")(to_input(x))
    np.testing.assert_allclose(torch.linalg.norm(via_ckpt, dim=1).detach().numpy(), 1.0, rtol=1e-5)
    # load the export in a bare interpreter from a copy of the file alone
    (tmp_path / "m.pt").write_bytes((out / EXPORT_FILE).read_bytes())
    np.save(tmp_path / "x.npy", to_input(x).numpy())
    # sys.modules[...] = None makes any import of the project's packages fail
    code = ("import io, sys, numpy as np, torch; sys.modules.update(steps=None, core=None, pipelines=None);"
            f"m = torch.export.load(io.BytesIO(open({str(tmp_path / 'm.pt')!r}, 'rb').read())).module();"
            f"np.save({str(tmp_path / 'e.npy')!r}, m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).detach().numpy())")
    subprocess.run([sys.executable, "-I", "-c", code], check=True, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), via_ckpt.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("layers, n_params", [("c16,p,c32,p,c64,c64,p,f", 134_384),  # 64*3*3 inputs to the projection
                                              ("c16,p,c32,p,c64,c64", 68_848)])       # their average: 64
def test_flattened_and_averaged_heads_train_export_and_reload(data_dir, tmp_path, layers, n_params):
    result = train(str(data_dir), str(tmp_path), TrainParams.from_dict({**TINY, "layers": layers}))
    assert result["n_params"] == n_params
    x, _ = make_digits(5, seed=98)
    via_ckpt = load_embedder(tmp_path, prefer="checkpoint")(to_input(x))
    via_export = load_embedder(tmp_path)(to_input(x))
    assert via_export.shape == (5, 128)
    np.testing.assert_allclose(via_export.detach().numpy(), via_ckpt.detach().numpy(), atol=1e-5)


def test_same_seed_same_weights_on_cpu(data_dir, tmp_path):
    params = TrainParams.from_dict(TINY)
    train(str(data_dir), str(tmp_path / "a"), params)
    train(str(data_dir), str(tmp_path / "b"), params)
    train(str(data_dir), str(tmp_path / "c"), TrainParams.from_dict({**TINY, "seed": 4}))
    a, b, c = (torch.load(tmp_path / n / MODEL_FILE, weights_only=True)["state_dict"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_ema_saves_the_average_and_label_smoothing_changes_the_loss(data_dir, tmp_path):
    plain = train(str(data_dir), str(tmp_path / "plain"), TrainParams.from_dict(TINY))
    train(str(data_dir), str(tmp_path / "ema"), TrainParams.from_dict({**TINY, "ema": 0.9}))
    a, e = (torch.load(tmp_path / n / MODEL_FILE, weights_only=True)["state_dict"] for n in ("plain", "ema"))
    conv = next(k for k in a if k.endswith("weight") and a[k].dim() == 4)
    assert not torch.equal(a[conv], e[conv]) and torch.isfinite(e[conv]).all()
    # what is saved is what is exported: the averaged weights, BatchNorm statistics included
    x = to_input(np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    ckpt, export = load_embedder(tmp_path / "ema", prefer="checkpoint"), load_embedder(tmp_path / "ema")
    with torch.inference_mode():
        assert torch.allclose(ckpt(x), export(x), atol=1e-5)
    smooth = train(str(data_dir), str(tmp_path / "ls"), TrainParams.from_dict({**TINY, "label_smoothing": 0.2}))
    assert smooth["final_loss"] != plain["final_loss"]


def test_epoch_lines_on_stdout_and_cli(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "steps.train", "--data-dir", str(data_dir),
                        "--out-dir", str(tmp_path), "--param", "epochs=1", "--param", "batch_size=64",
                        "--param", "lr_schedule=cosine", "--param", "val_fraction=0"],
                       capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    epoch = json.loads(lines[0].removeprefix("EPOCH "))
    assert lines[0].startswith("EPOCH ") and epoch["epoch"] == 1 and epoch["epochs"] == 1
    result = json.loads(lines[-1])
    assert result["epochs"] == 1 and result["val_top1"] is None and result["n_val"] == 0
    bad = subprocess.run([sys.executable, "-m", "steps.train", "--data-dir", str(data_dir),
                          "--out-dir", str(tmp_path), "--param", "epoch=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown training parameter(s): epoch" in bad.stderr


def test_stratified_split_holds_out_each_class():
    y = np.repeat(np.arange(10), 20)
    tr, val = stratified_split(y, 0.1, seed=0)
    assert len(np.intersect1d(tr, val)) == 0 and len(tr) + len(val) == 200
    assert np.bincount(y[val], minlength=10).tolist() == [2] * 10


def test_bad_training_data_is_refused(tmp_path):
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.array([1, 2, 11, 3]))
    with pytest.raises(ValueError, match="label 0-9"):
        train(str(tmp_path), str(tmp_path / "o"), TINY)


@pytest.mark.slow
def test_ddp_path_over_gloo_on_cpu(data_dir, tmp_path):
    """Two processes under DDP (gloo, CPU): the GPU path without GPUs."""
    epochs = []
    result = train(str(data_dir), str(tmp_path), TrainParams.from_dict({**TINY, "batch_size": 64}),
                   on_epoch=epochs.append, world_size=2)
    assert result["world_size"] == 2 and result["n_train"] == 260
    assert [e["epoch"] for e in epochs] == [1]
    assert (tmp_path / EXPORT_FILE).is_file() and (tmp_path / MODEL_FILE).is_file()


def test_shift_augmentation_translates_each_image_within_range():
    from steps.train import _shift_all
    x, _ = make_digits(40, seed=5)
    xt = torch.from_numpy(x).unsqueeze(1)
    pad = torch.nn.functional.pad(xt, (2, 2, 2, 2))
    out = _shift_all(pad, 2, torch.Generator().manual_seed(0))
    assert out.shape == xt.shape and out.dtype == torch.uint8
    offsets = set()
    for i in range(40):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i, 0], pad[i, 0, dy:dy + 28, dx:dx + 28])]
        assert hits, f"image {i} is not a translated copy"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets actually vary


def test_affine_augmentation_identity_and_variation():
    from steps.train import _affine_all
    x, _ = make_digits(16, seed=6)
    xt = torch.from_numpy(x).unsqueeze(1)
    same = _affine_all(xt, 0.0, 0.0, 0, torch.Generator().manual_seed(0))
    assert torch.equal(same, xt)  # no rotation, zoom or shift: the images come back exactly
    moved = _affine_all(xt, 15.0, 0.1, 2, torch.Generator().manual_seed(0))
    assert moved.dtype == torch.uint8 and moved.shape == xt.shape
    assert all(not torch.equal(moved[i], xt[i]) for i in range(16))
    # ink is moved, not created or lost wholesale
    ratio = moved.float().sum() / xt.float().sum()
    assert 0.8 < ratio < 1.2


def test_elastic_warp_moves_ink_by_at_most_its_amplitude():
    from steps.train import _affine_all
    x, _ = make_digits(32, seed=7)
    xt = torch.from_numpy(x).unsqueeze(1)
    warped = _affine_all(xt, 0.0, 0.0, 0, torch.Generator().manual_seed(0), elastic=2.0)
    assert all(not torch.equal(warped[i], xt[i]) for i in range(32))

    def centre(imgs):
        w = imgs.float().squeeze(1)
        grid = torch.arange(28, dtype=torch.float32)
        mass = w.sum((1, 2))
        return torch.stack([(w.sum(2) * grid).sum(1) / mass, (w.sum(1) * grid).sum(1) / mass], 1)
    moved = (centre(warped) - centre(xt)).abs().max()
    assert 0.0 < moved <= 2.0   # a warp of up to 2 px moves no image's ink further on average


def test_available_cpus_respects_affinity():
    import os

    from steps.model import available_cpus
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedules_run_any_number_of_steps(schedule):
    """OneCycleLR divided by zero when warmup * steps == 1 (1 epoch, 1,425 images, batch 256)."""
    from steps.train import _scheduler
    for total in range(1, 13):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
        sched = _scheduler(opt, TrainParams.from_dict({"lr_schedule": schedule, "lr": 0.01, "warmup": 0.2}), total)
        lrs = []
        for _ in range(total):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert all(0 < lr <= 0.01 + 1e-12 for lr in lrs), (total, lrs)


def test_small_data_keeps_min_steps_per_epoch_but_v0_does_not(data_dir, tmp_path):
    new = train(str(data_dir), str(tmp_path / "a"), {**TINY, "batch_size": 256})
    v0 = train(str(data_dir), str(tmp_path / "b"), {**TINY, "preset": "v0", "epochs": 1, "batch_size": 256,
                                                     "threads": 1, "val_fraction": 0.2})
    # 260 training images: batch capped at 16 -> 16 steps; v0 takes one batch of 256 -> 1 step
    assert json.loads((tmp_path / "a" / "params.json").read_text())["min_steps"] == 20
    assert new["steps_per_epoch"] == 16 and v0["steps_per_epoch"] == 1


def test_a_partial_epoch_takes_that_share_of_the_batches_from_all_the_data(data_dir, tmp_path):
    """epoch_fraction: fewer steps, each batch drawn from every training image."""
    whole = train(str(data_dir), str(tmp_path / "a"), {**TINY, "batch_size": 16})
    half = train(str(data_dir), str(tmp_path / "b"), {**TINY, "batch_size": 16, "epoch_fraction": 0.5})
    assert (whole["steps_per_epoch"], half["steps_per_epoch"]) == (16, 8)
    assert half["batch"] == whole["batch"] == 16 and np.isfinite(half["final_loss"])
    tiny = train(str(data_dir), str(tmp_path / "c"), {**TINY, "batch_size": 16, "epoch_fraction": 0.05})
    assert tiny["steps_per_epoch"] == 1     # never none
    with pytest.raises(ValueError, match=r"epoch_fraction=0.01 is out of range \[0.05, 1.0\]"):
        TrainParams.from_dict({"epoch_fraction": 0.01})
