"""Train the embedding network with an ArcFace head.

    python -m steps.train --data-dir D --out-dir O [--param epochs=3 --param lr=0.01 ...]

Data is held as tensors and batched by indexing (no DataLoader workers: MNIST fits in
memory and worker processes only cost time on 2 cores). One JSON line per epoch goes to
stdout as ``EPOCH {...}`` so a log watcher can follow progress.

Several GPUs: one process per GPU (torch.multiprocessing spawn) under DDP; each rank
takes its shard of the same seeded permutation and rank 0 evaluates and saves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from steps.params import TrainParams

__all__ = ["TrainParams", "train", "main"]

N_CLASSES = 10
# kNN val_top1 compares the val split with at most this many training images: enough to
# rank the configs of a sweep, and it keeps the check to a couple of seconds on a CPU.
VAL_GALLERY_MAX = 20000


def load_training_data(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Every training image: data.npz, or the rows ingest wrote with the pixels read from
    the shard cache (steps.dataset)."""
    from steps import dataset

    path = Path(data_dir) / "data.npz"
    x, y = dataset.images(data_dir, "data")
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise ValueError(f"{path}: x must be uint8 (N,28,28), got {x.dtype} {x.shape}")
    if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= N_CLASSES)):
        raise ValueError(f"{path}: y must hold one label 0-9 per image: run validate first")
    if len(x) < 2:
        raise ValueError(f"{path}: need at least 2 training images, got {len(x)}")
    return x, y.astype(np.int64)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): `fraction` of each class held out, chosen by `seed`."""
    rng = np.random.default_rng(seed)
    if fraction <= 0:
        return rng.permutation(len(y)), np.empty(0, dtype=np.int64)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * fraction))
        if 0 < n_val < len(idx):
            val.append(idx[:n_val])
    val = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    mask = np.ones(len(y), bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda requested but no CUDA device is available")
    return device


# torch imports these on first use, not with torch: the optimiser's first call imports
# torch._dynamo (about 1.5 s on 2 cores) and saving the exported program its tracer (0.85 s).
LAZY_TORCH_MODULES = ("torch._dynamo", "torch.export._trace")
_prefetching = None


def prefetch_lazy_imports() -> None:
    """Start importing LAZY_TORCH_MODULES in a thread (once a process), so they load while
    this process waits on the store for its data and weights, not after. Whoever needs
    one first waits on its import lock for the rest."""
    global _prefetching
    if _prefetching is not None or all(m in sys.modules for m in LAZY_TORCH_MODULES):
        return
    import importlib
    import threading

    def load():
        for name in LAZY_TORCH_MODULES:
            try:
                importlib.import_module(name)
            except Exception:   # noqa: BLE001 - the caller's own import then raises it
                return
    _prefetching = threading.Thread(target=load, name="torch-lazy-imports", daemon=True)
    _prefetching.start()


def train(data_dir: str, out_dir: str, params: TrainParams | dict | None = None, on_epoch=None,
          *, world_size: int | None = None, init_from: str | None = None) -> dict:
    """Train, save model.pt / model_export.pt / params.json / train_metrics.json in out_dir.

    world_size: processes for DDP. Default: the number of GPUs when training on CUDA,
    else 1. A value > 1 on CPU runs DDP over gloo (how the DDP path is tested here).
    init_from: a model directory (mode=warm: production's) whose weights, network and
    ArcFace head, training starts from; its architecture must be the one asked for.
    """
    import torch

    prefetch_lazy_imports()
    if not isinstance(params, TrainParams):
        params = TrainParams.from_dict(params)
    params.check()
    device = resolve_device(params.device)
    if world_size is None:
        world_size = torch.cuda.device_count() if device == "cuda" else 1
    x, y = load_training_data(data_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    init = _initial_weights(init_from, params) if init_from else None
    if world_size > 1:
        return _train_ddp(x, y, out_dir, params, device, world_size, on_epoch, init)
    return _fit(x, y, out_dir, params, device, rank=0, world=1, emit=on_epoch, init=init)


def _initial_weights(model_dir: str, params: TrainParams) -> dict:
    """model.pt's weights from model_dir, once its network matches the one params describe."""
    import torch

    from steps.model import MODEL_FILE, arch_config

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {model_dir} to start from")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    have, want = saved["config"], arch_config(params.embedding_dim, params.layers.split(","))
    spec = lambda c: f"layers={','.join(c['layers'])} embedding_dim={c['embedding_dim']}"  # noqa: E731
    if (list(have["layers"]), int(have["embedding_dim"])) != (want["layers"], want["embedding_dim"]):
        raise ValueError(f"mode=warm needs the production network: production has {spec(have)}, "
                         f"this run asks for {spec(want)}; train with the production's layers or "
                         "use mode=full")
    n_classes = saved.get("head", {}).get("weight", torch.zeros(N_CLASSES)).shape[0]
    if n_classes != N_CLASSES:
        raise ValueError(f"mode=warm: production's head has {n_classes} classes, need {N_CLASSES}")
    return {"state_dict": saved["state_dict"], "head": saved.get("head")}


def _train_ddp(x, y, out_dir, params, device, world, on_epoch, init=None):
    from queue import Empty

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.spawn(_ddp_worker, args=(world, port, x, y, out_dir, params.to_dict(), device, queue, init),
                     nprocs=world, join=False)
    result = None

    def handle(kind, payload):
        nonlocal result
        if kind == "epoch" and on_epoch:
            on_epoch(payload)
        elif kind == "result":
            result = payload
    while not procs.join(timeout=0.5):
        while not queue.empty():
            handle(*queue.get())
    while result is None:  # rank 0 put its result before exiting; give the pipe a moment
        try:
            handle(*queue.get(timeout=10))
        except Empty:  # rank 0 died without a result
            break
    if result is None:
        raise RuntimeError("DDP training ended without a result from rank 0")
    return result


def _ddp_worker(rank, world, port, x, y, out_dir, params_dict, device, queue, init=None):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        dev = device
        if device == "cuda":
            torch.cuda.set_device(rank)
            dev = f"cuda:{rank}"
        emit = (lambda d: queue.put(("epoch", d))) if rank == 0 else None
        result = _fit(x, y, out_dir, TrainParams.from_dict(params_dict), dev, rank, world, emit, init)
        if rank == 0:
            queue.put(("result", result))
    finally:
        dist.destroy_process_group()


def _shift_all(x_pad, shift: int, gen):
    """A randomly translated copy of every image (uint8, zero fill), made once per epoch:
    one slice per offset instead of per-image indexing keeps it to ~0.1 s for 60k images."""
    import torch

    n = x_pad.shape[0]
    size = x_pad.shape[-1] - 2 * shift
    span = 2 * shift + 1
    offset = torch.randint(0, span * span, (n,), generator=gen).to(x_pad.device)
    out = torch.empty((n, 1, size, size), dtype=x_pad.dtype, device=x_pad.device)
    for k in range(span * span):
        rows = torch.nonzero(offset == k).squeeze(1)
        if len(rows):
            dy, dx = divmod(k, span)
            out[rows] = x_pad[rows, :, dy:dy + size, dx:dx + size]
    return out


def _affine_all(x_u8, rotate: float, scale: float, shift: int, gen, elastic: float = 0.0,
                chunk: int = 8192):
    """Random rotation/zoom/translation of every image (bilinear, zero fill), once per epoch.
    elastic > 0 adds a smooth random warp of up to that many pixels: a 4x4 field of random
    offsets, upsampled, the cheap cousin of Simard et al.'s Gaussian-smoothed distortions."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x_u8.shape
    u = lambda: torch.rand(n, generator=gen) * 2 - 1  # noqa: E731 - uniform in [-1, 1]
    angle = u() * math.radians(rotate)
    zoom = 1.0 + u() * scale
    tx, ty = u() * (2.0 * shift / w), u() * (2.0 * shift / h)  # affine_grid works in [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    out = torch.empty_like(x_u8)
    for i in range(0, n, chunk):
        t = theta[i:i + chunk].to(x_u8.device)
        xb = x_u8[i:i + chunk].float()
        grid = F.affine_grid(t, list(xb.shape), align_corners=False)
        if elastic:
            m = len(xb)
            field = (torch.rand(m, 2, 4, 4, generator=gen) * 2 - 1) * (2.0 * elastic / w)
            field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1).to(grid.device)
        out[i:i + chunk] = F.grid_sample(xb, grid, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return out


def _param_groups(modules, weight_decay):
    """Decay weight matrices and kernels; leave BatchNorm and biases alone."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:   # frozen layers (freeze) take no step, and no decay either
                (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class _Ema:
    """An exponential moving average of the network's weights and BatchNorm statistics,
    updated after every step with one fused lerp."""

    def __init__(self, net, decay: float):
        self.decay = float(decay)
        self.live = [t for t in net.state_dict().values() if t.is_floating_point()]
        self.avg = [t.detach().clone() for t in self.live]
        self.steps = 0

    def update(self) -> None:
        import torch
        self.steps += 1
        # Warm start: early on the average follows the weights closely.
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.avg, [t.detach() for t in self.live], 1.0 - d)

    def copy_to_net(self) -> None:
        import torch
        with torch.no_grad():
            for live, avg in zip(self.live, self.avg, strict=True):
                live.copy_(avg)


def _scheduler(opt, params, total_steps):
    import torch
    warm = params.warmup
    if params.lr_schedule == "onecycle":
        # OneCycleLR divides by (warm * total_steps - 1): exactly 0 for e.g. 5 steps at 0.2
        # (1 epoch of 1,425 images at batch 256). Move the peak one step later there.
        if abs(warm * total_steps - 1.0) < 1e-9:
            warm = 2.0 / total_steps if total_steps >= 4 else 0.5 / total_steps
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=params.lr, total_steps=total_steps, pct_start=warm,
            div_factor=10.0, final_div_factor=100.0)
    if params.lr_schedule == "cosine":
        n_warm = int(warm * total_steps)

        def factor(step):  # linear warm-up, then cosine down to 1e-3 of the peak
            if step < n_warm:
                return (step + 1) / n_warm
            t = (step - n_warm) / max(1, total_steps - n_warm)
            return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return None


def _fit(x, y, out_dir, params: TrainParams, device, rank, world, emit, init=None) -> dict:
    """Train on (x, y) and, on rank 0, save the package's weights and metrics to out_dir."""
    import torch

    from steps.model import count_params, embed_images

    t0 = time.time()
    gen = _seed(params, device, world)
    tr_idx, val_idx = stratified_split(y, params.val_fraction, params.seed)
    x_tr = torch.from_numpy(x[tr_idx]).unsqueeze(1).to(device)   # uint8 stays small on device
    y_tr = torch.from_numpy(y[tr_idx]).to(device)
    cfg, net, head, mem = _build(params, device, init)
    model = _trainable(net, head, device, world)
    n_tr = len(tr_idx)
    batch, steps_per_epoch = _batching(n_tr, world, params)
    opt = torch.optim.AdamW(_param_groups([net, head], params.weight_decay), lr=params.lr)
    loop = _Loop(model, opt, _scheduler(opt, params, params.epochs * steps_per_epoch),
                 _Ema(net, params.ema) if params.ema else None, x_tr, y_tr, params, gen, mem, device)
    history = []
    for epoch in range(1, params.epochs + 1):
        te = time.time()
        perm = torch.randperm(n_tr, generator=gen)[rank::world][:steps_per_epoch * batch].to(device)
        info = loop.epoch(epoch, perm, batch, steps_per_epoch)
        if loop.ema is not None and epoch == params.epochs:
            loop.ema.copy_to_net()   # what is validated and saved is the average
        if rank == 0 and len(val_idx) and epoch == params.epochs:
            info["val_top1"] = round(_val_knn(net, x, y, tr_idx, val_idx, params.seed, device,
                                              embed_images), 5)
        info["seconds"] = round(time.time() - te, 2)
        info["rss_mb"] = peak_rss_mb()
        if rank == 0:
            history.append(info)
            print("EPOCH " + json.dumps(info), flush=True)
            if emit:
                emit(dict(info))
    if rank != 0:
        return {}
    _save(Path(out_dir), cfg, net, head, params)
    result = {"epochs": params.epochs, "final_loss": history[-1]["loss"],
              "val_top1": history[-1].get("val_top1"), "seconds": round(time.time() - t0, 2),
              "peak_rss_mb": peak_rss_mb(),
              "n_params": count_params(net), "n_train": n_tr, "n_val": int(len(val_idx)),
              "batch": batch, "steps_per_epoch": steps_per_epoch,
              "device": str(device), "world_size": world}
    (Path(out_dir) / "train_metrics.json").write_text(json.dumps({**result, "history": history}, indent=1))
    return result


def _seed(params: TrainParams, device, world):
    """Threads and seeds, before anything draws a random number; the shuffling generator."""
    import torch

    from steps.model import available_cpus
    cpu_threads = params.threads or available_cpus()
    if str(device).startswith("cpu"):
        torch.set_num_threads(max(1, cpu_threads // world))
    torch.manual_seed(params.seed)
    np.random.seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed + 1)
    if str(device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    return gen


def _build(params: TrainParams, device, init=None):
    """(config, embedding net, ArcFace head, memory format) on ``device``; ``init`` (mode=warm)
    starts them where production's weights are."""
    import torch

    from steps.model import ArcFace, EmbeddingNet, arch_config
    cfg = arch_config(params.embedding_dim, params.layers.split(","))
    net = EmbeddingNet(cfg)
    head = ArcFace(params.embedding_dim, N_CLASSES, params.scale, params.margin, params.label_smoothing)
    if init is not None:
        net.load_state_dict(init["state_dict"])
        if init.get("head"):
            head.load_state_dict(init["head"])
    _freeze_leading(net, params.freeze)
    # channels_last runs the CPU (oneDNN) convolutions ~15% faster here.
    mem = torch.contiguous_format if str(device).startswith("cuda") else torch.channels_last
    return cfg, net.to(device, memory_format=mem), head.to(device), mem


def _freeze_leading(net, n: int) -> None:
    """The first ``n`` conv layers and their BatchNorms keep their weights. Nothing before
    them trains either, so autograd records none of them: the backward pass stops at the
    first trained layer and skips the first ones, where the feature maps are largest. Their BatchNorms still
    follow the data's statistics, as in any training step."""
    import torch.nn as nn
    if not n:
        return
    convs = [i for i, m in enumerate(net.features) if isinstance(m, nn.Conv2d)]
    for module in net.features[:convs[n - 1] + 2]:   # up to and with the n-th conv's BatchNorm
        for p in module.parameters():
            p.requires_grad_(False)


def _trainable(net, head, device, world):
    """Net and head as one module, so DDP syncs the head's gradients too."""
    import torch.nn as nn

    class Trainable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.head = net, head

        def forward(self, xb, yb):
            return self.head.loss_and_cosine(self.net(xb), yb)

    model = Trainable()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(str(device).split(":")[1])] if ":" in str(device) else None)
    return model


def _batching(n_tr: int, world: int, params: TrainParams) -> tuple[int, int]:
    """(batch per rank, steps per epoch)."""
    per_rank = n_tr // world
    # A big batch pays on big data; on a few hundred images it would leave one step per epoch.
    cap = max(16, per_rank // params.min_steps)
    batch = max(2, min(params.batch_size // world, per_rank, cap))
    steps = max(1, per_rank // batch)   # drop the ragged tail: BatchNorm dislikes tiny batches
    return batch, max(1, round(steps * params.epoch_fraction))


class _Loop:
    """One epoch of training: augment, step through the batches, sum loss and accuracy."""

    def __init__(self, model, opt, sched, ema, x_tr, y_tr, params: TrainParams, gen, mem, device):
        import torch
        self.model, self.opt, self.sched, self.ema = model, opt, sched, ema
        self.x_tr, self.y_tr, self.params, self.gen, self.mem, self.device = x_tr, y_tr, params, gen, mem, device
        shift = params.augment_shift
        self.x_pad = torch.nn.functional.pad(x_tr, (shift,) * 4) if shift else None

    def _augmented(self, rows=None):
        """An augmented copy of the training images, or of ``rows`` of them only."""
        p = self.params
        x = self.x_tr if rows is None else self.x_tr[rows]
        if p.augment_rotate or p.augment_scale or p.augment_elastic:
            return _affine_all(x, p.augment_rotate, p.augment_scale, p.augment_shift, self.gen,
                               p.augment_elastic)
        if not p.augment_shift:
            return x
        return _shift_all(self.x_pad if rows is None else self.x_pad[rows], p.augment_shift, self.gen)

    def epoch(self, epoch: int, perm, batch: int, steps: int) -> dict:
        import torch
        self.model.train()
        y_epoch = self.y_tr
        if self.params.epoch_fraction < 1:   # a partial epoch augments only the images it draws
            x_epoch, y_epoch = self._augmented(perm), self.y_tr[perm]
            perm = torch.arange(len(perm), device=perm.device)
        else:
            x_epoch = self._augmented()
        # Sums stay tensors: .item() per step would sync with the device every step.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            xb = x_epoch[idx].float().div_(255.0).contiguous(memory_format=self.mem)
            yb = y_epoch[idx]
            loss, cos = self.model(xb, yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.sched is not None:
                self.sched.step()
            if self.ema is not None:
                self.ema.update()
            loss_sum += loss.detach() * len(idx)
            correct += (cos.argmax(1) == yb).sum()
            seen += len(idx)
        mean_loss = loss_sum.item() / seen
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss became {mean_loss} in epoch {epoch}: "
                                     f"lower lr (now {self.params.lr}) or scale ({self.params.scale})")
        return {"epoch": epoch, "epochs": self.params.epochs, "loss": round(mean_loss, 5),
                "train_acc": round(correct.item() / seen, 5), "lr": self.opt.param_groups[0]["lr"]}


def _save(out: Path, cfg, net, head, params: TrainParams) -> None:
    """The package's weights (with config and head), its exported program and its params."""
    import torch

    from steps.model import EXPORT_FILE, MODEL_FILE, EmbeddingNet, export_bytes
    net.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save({"format": 1, "config": cfg, "state_dict": state, "params": params.to_dict(),
                "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                "classes": list(range(N_CLASSES))}, out / MODEL_FILE)
    cpu_net = EmbeddingNet(cfg)
    cpu_net.load_state_dict(state)
    (out / EXPORT_FILE).write_bytes(export_bytes(cpu_net))
    (out / "params.json").write_text(json.dumps(params.to_dict(), indent=1))


def _val_knn(net, x, y, tr_idx, val_idx, seed, device, embed_images) -> float:
    """kNN (k=1, cosine) top-1 of the held-out split against the training split."""
    net.eval()
    gallery = tr_idx
    if len(gallery) > VAL_GALLERY_MAX:
        gallery = np.sort(np.random.default_rng(seed).choice(gallery, VAL_GALLERY_MAX, replace=False))
    g = embed_images(net, x[gallery], device=device)
    q = embed_images(net, x[val_idx], device=device)
    nearest = (q @ g.T).argmax(1).numpy()
    net.train()
    return float((y[gallery][nearest] == y[val_idx]).mean())


def peak_rss_mb() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="directory with data.npz (from ingest)")
    ap.add_argument("--out-dir", required=True, help="where model.pt and friends go")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a training parameter; repeatable. Keys: " + ", ".join(TrainParams.valid_keys()))
    ap.add_argument("--params-json", help="JSON object of training parameters")
    args = ap.parse_args(argv)
    try:
        d = json.loads(args.params_json) if args.params_json else {}
        d.update(TrainParams.parse_tokens(args.param))
        params = TrainParams.from_dict(d)
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps(train(args.data_dir, args.out_dir, params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
