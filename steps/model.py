"""The embedding network, the ArcFace head, and loading a trained model back.

The network takes float32 images (N, 1, 28, 28) with pixels in [0, 1] and returns
L2-normalised embeddings (N, D). Input normalisation lives inside the network, so the
exported model needs nothing but torch to serve.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from steps.cpus import available_cpus  # noqa: F401  (steps.model's name for it)
from steps.params import TrainParams

log = logging.getLogger("steps.model")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# Layer specs: "c<N>" = 3x3 conv to N channels + BN + ReLU, "c<N>s2" = the same with
# stride 2, "p" = 2x2 max-pool; then global average pool and a linear projection, or,
# with a final "f", the feature map flattened into it (the projection sees where ink is).
# The default ends at 64 channels at 7x7, where most of the FLOPs sit (0.8x the c128
# stack's time, preset v0's), then pools to 3x3 and flattens: an average over the map
# threw away where the strokes are, and keeping it (with m=0.4) lifted the five-seed mean
# from 99.48% to 99.56% at no cost (README, "Benchmarks"). Full MNIST kNN top-1 (k=5
# vote): 99.63% with the defaults (4 epochs), 99.51% with preset v0 (8 epochs).
DEFAULT_LAYERS = tuple(TrainParams.layers.split(","))   # one default: TrainParams

MODEL_FILE = "model.pt"
EXPORT_FILE = "model_export.pt"


def arch_config(embedding_dim: int = 128, layers=DEFAULT_LAYERS) -> dict:
    arch = "cnn-flat" if list(layers)[-1:] == ["f"] else "cnn-gap"   # for readers of model.pt
    return {"arch": arch, "layers": list(layers), "embedding_dim": int(embedding_dim),
            "input": {"shape": [1, 28, 28], "dtype": "float32", "range": [0.0, 1.0]},
            "normalize": {"mean": MNIST_MEAN, "std": MNIST_STD}}


class EmbeddingNet(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        layers, c_in, side = [], 1, 28
        specs = list(config["layers"])
        self.flatten = bool(specs) and specs[-1] == "f"
        for spec in specs[:-1] if self.flatten else specs:
            if spec == "p":
                layers.append(nn.MaxPool2d(2))
                side //= 2
                continue
            c_out, _, stride = spec[1:].partition("s")
            c_out, stride = int(c_out), int(stride or 1)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, side = c_out, (side - 1) // stride + 1
        self.features = nn.Sequential(*layers)
        width = c_in * side * side if self.flatten else c_in
        self.project = nn.Linear(width, config["embedding_dim"], bias=False)
        self.bn = nn.BatchNorm1d(config["embedding_dim"])
        self.mean = config["normalize"]["mean"]
        self.std = config["normalize"]["std"]

    def unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before its L2 normalisation."""
        h = self.features((x - self.mean) / self.std)
        return self.bn(self.project(h.flatten(1) if self.flatten else h.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unnormalised(x), dim=1)


class ArcFace(nn.Module):
    """Additive angular margin head (Deng et al. 2019): logits s*cos(theta_y + m) for the
    true class and s*cos(theta_j) for the others, where theta is the angle between the
    normalised embedding and the normalised class weight.

    When theta_y + m would pass pi, cos(theta + m) stops decreasing; there we use the
    usual linear fallback cos(theta) - m*sin(m) so the target logit stays monotonic.
    """

    def __init__(self, embedding_dim: int, n_classes: int = 10, scale: float = 30.0,
                 margin: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = float(scale), float(margin)
        self.label_smoothing = float(label_smoothing)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1))

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._margin_logits(self.cosine(emb), labels)

    def _margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
        m = self.margin
        sin = torch.sqrt(1.0 - cos * cos)
        cos_m = cos * math.cos(m) - sin * math.sin(m)             # cos(theta + m)
        cos_m = torch.where(cos > math.cos(math.pi - m), cos_m, cos - m * math.sin(m))
        onehot = F.one_hot(labels.long(), cos.shape[1]).to(torch.bool)
        return self.scale * torch.where(onehot, cos_m, cos)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_and_cosine(emb, labels)[0]

    def loss_and_cosine(self, emb: torch.Tensor, labels: torch.Tensor):
        """(loss, detached cosines): training reports accuracy from the same matmul."""
        cos = self.cosine(emb)
        loss = F.cross_entropy(self._margin_logits(cos, labels), labels.long(),
                               label_smoothing=self.label_smoothing)
        return loss, cos.detach()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fuse_for_inference(net: EmbeddingNet) -> EmbeddingNet:
    """An eval-mode copy with every BatchNorm folded into the conv/linear before it: the
    same function up to float rounding, with one pass over the activations fewer per layer."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    net = copy.deepcopy(net).eval()
    mods, out = list(net.features), []
    i = 0
    while i < len(mods):
        if isinstance(mods[i], nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
            out.append(fuse_conv_bn_eval(mods[i], mods[i + 1]))
            i += 2
        else:
            out.append(mods[i])
            i += 1
    net.features = nn.Sequential(*out)
    if isinstance(net.bn, nn.BatchNorm1d):
        net.project = fuse_linear_bn_eval(net.project, net.bn)
        net.bn = nn.Identity()
    return net


def export_bytes(net: EmbeddingNet) -> bytes:
    """Serving-ready torch.export program with a dynamic batch dimension (BatchNorm folded)."""
    net = fuse_for_inference(net)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(net, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def load_embedder(model_dir: str | Path, prefer: str = "export"):
    """A callable images(N,1,28,28 float [0,1]) -> embeddings, from a model directory or a
    published package. Uses the torch.export program when present (no project code
    needed), else rebuilds the network from model.pt's config and weights."""
    model_dir = Path(model_dir)
    export, ckpt = model_dir / EXPORT_FILE, model_dir / MODEL_FILE
    order = [export, ckpt] if prefer == "export" else [ckpt, export]
    for path in order:
        if not path.is_file():
            continue
        if path.name == EXPORT_FILE:
            return torch.export.load(io.BytesIO(path.read_bytes())).module()
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = EmbeddingNet(state["config"])
        net.load_state_dict(state["state_dict"])
        return fuse_for_inference(net)
    raise FileNotFoundError(f"no {EXPORT_FILE} or {MODEL_FILE} in {model_dir}")


class _BySize:
    """Small batches on the frozen graph, large ones on the oneDNN one (measured one
    thread, 2026-11-30, ms per image: frozen 0.49 / 0.36 / 0.38 at batch 1 / 8 / 64,
    oneDNN 0.84 / 0.37 / 0.29, the export program 0.80 / 0.44 / 0.33)."""

    LARGE = 16

    def __init__(self, small, large):
        self.small, self.large = small, large

    def __call__(self, x):
        return (self.large if x.shape[0] >= self.LARGE else self.small)(x)


def optimize_for_cpu(program) -> tuple[object, str]:
    """(callable, "torchscript" or "export"): the export program traced and frozen by
    TorchScript (BatchNorm folded), and for large batches also optimised for inference
    (oneDNN convolutions). Checked against the program on random images; on any mismatch
    or failure the program itself serves."""
    import warnings

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # TracerWarnings about the program's shape asserts

            def frozen():
                return torch.jit.freeze(torch.jit.trace(program, torch.zeros(2, 1, 28, 28), check_trace=False).eval())
            fast = _BySize(frozen(), torch.jit.optimize_for_inference(frozen()))
            probe = torch.rand(_BySize.LARGE + 1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
            for xb in (probe[:1], probe):
                if not torch.allclose(fast(xb), program(xb), atol=1e-4):
                    log.warning("the TorchScript embedder differs from the export program; serving the program")
                    return program, "export"
        return fast, "torchscript"
    except Exception as e:  # an unusual program: the export itself still serves
        log.warning("no TorchScript embedder (%s: %s); serving the export program", type(e).__name__, e)
        return program, "export"


def to_input(x) -> torch.Tensor:
    """uint8 (N,28,28) or (N,1,28,28) array/tensor -> float32 (N,1,28,28) in [0, 1]."""
    t = torch.as_tensor(x)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


# CPU time per 70k images with BatchNorm folded, on a busy 2-core machine (2026-11-30):
# 128: 1.53x, 256: 1.0x, 512: 0.77x, 1024: 0.71x of batch 256 (unfolded 256: 1.17x). An idle
# machine once favoured 256 (2.0 s vs 3.1 s at 1024 for 10k); 512 is the middle ground.
EMBED_BATCH = 512


@torch.inference_mode()
def embed_images(fn, x, batch_size: int = EMBED_BATCH, device: str | torch.device = "cpu") -> torch.Tensor:
    """Embeddings (N, D) float32 on the CPU, computed batch by batch."""
    out = []
    for i in range(0, len(x), batch_size):
        out.append(fn(to_input(x[i:i + batch_size]).to(device)).float().cpu())
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)
