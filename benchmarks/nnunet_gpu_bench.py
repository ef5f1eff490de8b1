#!/usr/bin/env python
"""Time an nnU-Net v2 model through cartiq's segmenter: load, first and steady-state
inference per volume, peak GPU and process memory.  Anyone with a GPU can run it::

    pip install -c scripts/constraints.txt -e ".[nnunet]"      # (a CUDA torch for the GPU)
    python benchmarks/nnunet_gpu_bench.py                        # tiny test cascade, cuda
    cartiq models fetch nnunet_knee                              # ~1 GB, needs the hub
    python benchmarks/nnunet_gpu_bench.py --model nnunet_knee --image dess.nii.gz --repeats 3
    python benchmarks/nnunet_gpu_bench.py --device cpu           # the CPU path

Without ``--model`` it registers the committed tiny cascade (tests/data/nnunet_tiny) in a
temporary models folder; without ``--image`` it uses that model's synthetic phantom (tiny
model) or a cartiq knee phantom (other models).  Prints one JSON object (also ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _phantom_volume(tiny: bool):
    import numpy as np

    from cartiq.io.volume import Geometry, Volume

    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from _nnunet_tiny import SPACING, phantom

        img, _ = phantom(11)
        return Volume(img, Geometry(shape=img.shape, spacing=SPACING, origin=(0, 0, 0),
                                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    from cartiq.data.phantom import make_phantom

    ph = make_phantom()
    return Volume(np.asarray(ph.image.array, np.float32), ph.image.geometry)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="registered name or path (default: the tiny test cascade)")
    ap.add_argument("--image", type=Path, help="scan to segment (default: a phantom)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the first")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    import torch

    from cartiq.io.volume import read_volume
    from cartiq.segmentation.segmenter import Segmenter

    model = args.model
    if model is None:
        from cartiq.segmentation.model_store import add_model

        tmp = Path(tempfile.mkdtemp(prefix="nnunet_bench_"))
        _, folder = add_model(ROOT / "tests" / "data" / "nnunet_tiny", name="tinyknee",
                              orientation="LPS", tta=False, models_dir=tmp)
        model = str(folder)
    vol = read_volume(args.image, kind="image") if args.image else \
        _phantom_volume(tiny=args.model is None)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    t0 = time.perf_counter()
    seg = Segmenter(model, device=args.device)
    load_s = time.perf_counter() - t0
    runner = seg.model.network

    cpu_times: list[float] = []

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        runner.predict(vol)
        if cuda:
            torch.cuda.synchronize()
        cpu_times.append(time.process_time() - c)
        return time.perf_counter() - t

    first = once()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [once() for _ in range(args.repeats)]
    t = time.perf_counter()
    seg.run(vol)  # the whole segmenter: prediction, clean-up, mapping into the cartiq scheme
    full_s = time.perf_counter() - t
    result = {
        "model": seg.model.metadata.name, "device": seg.device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "nnunet": {k: seg.model.extra["nnunet"][k] for k in ("configuration", "use_mirroring")},
        "input_shape": list(vol.geometry.shape), "spacing_mm": list(vol.geometry.spacing),
        "load_s": round(load_s, 3), "first_inference_s": round(first, 3),
        "inference_s": [round(x, 3) for x in times],
        "inference_median_s": round(sorted(times)[len(times) // 2], 3) if times else None,
        "inference_cpu_s": [round(x, 3) for x in cpu_times[1:]],
        "segment_run_s": round(full_s, 3),
        "load_average": [round(x, 2) for x in __import__("os").getloadavg()],
        "peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
