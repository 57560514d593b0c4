"""Model throughput and worker memory: frames per second and peak RSS.

For the simulated reference pack (``deploy/models/sononode-us-sim``) and SonoNet-16
(``workers.models.sononet.SonoNet16`` with the published weights from
``../shared/sononet/SonoNet16.npz`` or ``SONONODE_SONONET_DIR``; skipped with a message when
absent) it prints:

- frames per second of the network on the CPU (inputs already at the network's size, float32,
  ``torch.inference_mode``) at batch 1 and at each of ``--batch-sizes``, and the best;
- with CUDA, the same on the GPU with float16 autocast (mixed precision), as the node runs;
- the peak resident memory (RSS) of a fresh worker process that loads the node's packs and
  analyses one 120-frame cine loop (decoding, QC, inference) as a worker does: with the
  default sampling of ``SONONODE_MAX_FRAMES_PER_LOOP`` (16) frames and with all 120 frames.

Timings depend on the machine and on what else runs on it; take them as approximate.

    python bench/models.py [--batch-sizes 1 8 16 32 64] [--seconds 2] [--loop-frames 120]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT

REFERENCE_PACK = ROOT / "deploy" / "models" / "sononode-us-sim"
SONONET_DIR = Path(os.environ.get("SONONODE_SONONET_DIR", ROOT.parent / "shared" / "sononet"))


@dataclass
class Throughput:
    """Frames per second of one network at each batch size on one device."""

    model: str
    device: str
    parameters: int
    fps: dict[int, float]

    @property
    def best(self) -> tuple[int, float]:
        batch = max(self.fps, key=lambda b: self.fps[b])
        return batch, self.fps[batch]


def _frames_per_second(
    forward: Callable[[object], object],
    make_batch: Callable[[int], object],
    batch: int,
    *,
    seconds: float,
    synchronise: Callable[[], None],
) -> float:
    """Frames per second of ``forward`` on batches of ``batch``: a warm-up, then as many
    batches as fit in ``seconds`` (at least 3)."""
    x = make_batch(batch)
    for _ in range(2):
        forward(x)
    synchronise()
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        forward(x)
        runs += 1
    synchronise()
    return runs * batch / (time.perf_counter() - started)


def measure(
    name: str,
    net: object,
    input_shape: tuple[int, int, int],
    batch_sizes: Sequence[int],
    *,
    device: str,
    seconds: float,
) -> Throughput:
    import torch

    model = net.to(device).eval()  # type: ignore[attr-defined]
    parameters = sum(p.numel() for p in model.parameters())
    cuda = device.startswith("cuda")

    def make_batch(n: int) -> torch.Tensor:
        return torch.randn(n, *input_shape, device=device)

    def forward(x: object) -> object:
        with (
            torch.inference_mode(),
            torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16, enabled=cuda),
        ):
            return model(x)

    def synchronise() -> None:
        if cuda:
            torch.cuda.synchronize()

    fps = {
        b: _frames_per_second(forward, make_batch, b, seconds=seconds, synchronise=synchronise)
        for b in batch_sizes
    }
    return Throughput(name, device + (" fp16 autocast" if cuda else " fp32"), parameters, fps)


def networks() -> list[tuple[str, object, tuple[int, int, int]]]:
    """(name, network, input shape) of the reference pack and of SonoNet-16 when present."""
    from workers.models.packs import ModelPack

    out: list[tuple[str, object, tuple[int, int, int]]] = []
    pack = ModelPack.load(REFERENCE_PACK, device="cpu")
    spec = pack.input
    out.append(
        (
            f"{pack.name} {pack.manifest.version}",
            pack.networks[0],
            (spec.channels, spec.height, spec.width),
        )
    )
    npz = SONONET_DIR / "SonoNet16.npz"
    if npz.is_file():
        from modelkit.sononet_import import load_sononet
        from workers.models.sononet import INPUT_SIZE

        out.append(("SonoNet-16", load_sononet(npz), (1, *INPUT_SIZE)))
    else:
        print(f"SonoNet-16 skipped: no weights at {npz} (set SONONODE_SONONET_DIR)")
    return out


# ---------------------------------------------------------------------------------------
# Peak memory of a worker analysing one cine loop (run in a fresh process)
# ---------------------------------------------------------------------------------------
#: Run by a fresh ``python -c`` (argv: loop file, frames): loads the node's packs as a worker
#: does, then decodes, checks and analyses the loop; prints JSON. Memory is the kernel's
#: high-water mark of the process (``VmHWM``; ``ru_maxrss`` would include the parent's peak,
#: which Linux carries across ``exec``), measured without the benchmark's own imports.
WORKER_CODE = """
import json, sys, time
from pathlib import Path

def hwm_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")

from node.config import Settings
from workers.imaging.types import PreparedInstance
from workers.models.inference import Analyser
from workers.models.packs import ModelPack
from workers.imaging.pixels import load_instance
from workers.imaging.qc import assess_instance

loop, frames = Path(sys.argv[1]), int(sys.argv[2])
settings = Settings()
packs = [ModelPack.load(Path(p), device="cpu") for p in settings.effective_model_packs]
analyser = Analyser(packs, batch_size=settings.inference_batch_size, max_frames=frames)
loaded = hwm_mb()
started = time.perf_counter()
decoded = load_instance(loop, max_frames=frames)
qc = assess_instance(decoded)
result = analyser.analyse_study(decoded.study_instance_uid, [PreparedInstance(decoded, qc)])
print(json.dumps({
    "packs": [p.name for p in packs],
    "frames_used": result.images[0].frames_used,
    "seconds": time.perf_counter() - started,
    "rss_after_load_mb": loaded,
    "peak_rss_mb": hwm_mb(),
}))
"""


def worker_memory(loop_frames: int, max_frames: Sequence[int]) -> list[dict[str, object]]:
    """Peak RSS of a fresh worker-like process per number of frames analysed."""
    from simulator import simulate_study

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        study = simulate_study(
            Path(tmp) / "study",
            seed=7,
            vendor="Aurora Imaging",
            n_images=0,
            n_loops=1,
            frames_per_loop=loop_frames,
            views=["thyroid_transverse"],
        )
        for frames in max_frames:
            done = subprocess.run(
                [sys.executable, "-c", WORKER_CODE, str(study.files[0]), str(frames)],
                cwd=ROOT,
                env={**os.environ, "SONONODE_DEVICE": "cpu"},
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append({"max_frames": frames, **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per batch size")
    parser.add_argument("--loop-frames", type=int, default=120)
    args = parser.parse_args()

    import torch

    batches = sorted({1, *args.batch_sizes})
    results: list[Throughput] = []
    nets = networks()
    for name, net, shape in nets:
        results.append(measure(name, net, shape, batches, device="cpu", seconds=args.seconds))
    if torch.cuda.is_available():
        for name, net, shape in nets:
            results.append(measure(name, net, shape, batches, device="cuda", seconds=args.seconds))
    else:
        print("no CUDA device: GPU mixed-precision figures skipped")

    print(
        f"\nframes per second (torch {torch.__version__}, {torch.get_num_threads()} CPU threads;"
        " approximate, the machine may be shared)\n"
    )
    header = ["model", "params", "device", *[f"b{b}" for b in batches], "best"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        batch, fps = r.best
        cells = [
            r.model,
            f"{r.parameters:,}",
            r.device,
            *[f"{r.fps[b]:.1f}" for b in batches],
            f"{fps:.1f} (b{batch})",
        ]
        print("| " + " | ".join(cells) + " |")

    rows = worker_memory(args.loop_frames, [16, args.loop_frames])
    print(f"\nworker process analysing one {args.loop_frames}-frame cine loop (CPU)\n")
    print("| packs | frames analysed | RSS after loading packs (MB) | peak RSS (MB) | seconds |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {', '.join(row['packs'])} | {row['frames_used']} | "  # type: ignore[arg-type]
            f"{row['rss_after_load_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
            f"{row['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
