"""bf16 on CPU against fp32, side by side: one training step and one embedding batch of
ctbot's default network, timed in alternating rounds in one process; and, beside
them, an fp32 step with AdamW's fused CPU kernel instead of its per-tensor loop.

    .venv/bin/python bench/bench_precision.py [--rounds 2] [--steps 15] [--threads 2] [--smoke]

bf16 is `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward pass, with
channels-last as in training. It only pays on a CPU with native bf16 (avx512_bf16 or
AMX); elsewhere oneDNN emulates it. The first line says what this CPU has, so the
ratios can be read for what they are.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:   # not Linux: no flags to report
        lines = []
    return next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="alternating fp32/bf16 rounds")
    ap.add_argument("--steps", type=int, default=15, help="timed training steps (batch 256) per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="one round of one step: the script still runs (no figures judged)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 1, 1

    import torch

    from steps.model import ArcFace, EmbeddingNet, arch_config, fuse_for_inference

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = cpu_flags()
    native = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16"))
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels; native bf16: "
          f"{', '.join(native) or 'none (emulated)'}; {args.threads} threads")
    net = EmbeddingNet(arch_config()).to(memory_format=torch.channels_last)
    head = ArcFace(128)
    opts = {fused: torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=1e-3, fused=fused)
            for fused in (False, True)}
    x = torch.rand(256, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,))

    def step(bf16: bool, fused: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = net(x)
        loss, _ = head.loss_and_cosine(emb.float(), y)
        opt = opts[fused]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fused = fuse_for_inference(net)
    xe = torch.rand(512, 1, 28, 28).contiguous(memory_format=torch.channels_last)

    def embed(bf16: bool) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fused(xe)

    train = {False: [], True: [], "fused": []}
    infer = {False: [], True: []}
    for _ in range(args.rounds):
        for bf16 in (False, True, "fused"):
            kind = (bf16 is True, bf16 == "fused")
            step(*kind)   # warm: oneDNN picks its kernels on the first call
            t = time.perf_counter()
            for _ in range(args.steps):
                step(*kind)
            train[bf16].append((time.perf_counter() - t) / args.steps)
            if bf16 == "fused":
                continue
            embed(bf16)
            t = time.perf_counter()
            for _ in range(5):
                embed(bf16)
            infer[bf16].append((time.perf_counter() - t) / 5)
    tr = {k: min(v) * 1e3 for k, v in train.items()}
    em = {k: min(v) * 1e3 for k, v in infer.items()}
    print(f"{'':28}{'fp32 ms':>10}{'bf16 ms':>10}{'bf16/fp32':>11}")
    print(f"{'train step, batch 256':<28}{tr[False]:>10.1f}{tr[True]:>10.1f}{tr[True] / tr[False]:>10.2f}x")
    print(f"{'train step, AdamW fused':<28}{tr['fused']:>10.1f}{'-':>10}{tr['fused'] / tr[False]:>10.2f}x "
          "(against the fp32 step)")
    print(f"{'embed, batch 512 (folded)':<28}{em[False]:>10.1f}{em[True]:>10.1f}{em[True] / em[False]:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
