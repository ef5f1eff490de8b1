"""Peer agreement on real anatomy: cartiq's plate mean thickness vs pymskt's normal ray casting.

Usage (from the repository root)::

    python benchmarks/peer_bench.py --mirror ../shared/data --mskt-python /work/mskt_venv/bin/python

pymskt (``mskt`` on PyPI) runs in its own environment (``--mskt-python``), never as a cartiq
dependency: this script calls itself there with ``--pymskt-json`` and reads the numbers back.
pymskt: ``BoneMesh(label_idx=bone).create_mesh()`` then ``calc_cartilage_thickness`` with one
cartilage label at a time (its defaults: Gaussian variance 0.3125/2, rays of 10 mm along the
bone-surface normals, 25% of them started inside the bone; thickness = distance between the
ray's two intersections with the cartilage mesh).  Its plate mean is taken over the bone
vertices with thickness > 0, area-weighted (cartiq's means are area-weighted) and, for
reference, per vertex.  cartiq runs ``measure_labels`` with ``thickness_method`` nearest
(default) and normal.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MAPS = {  # file, cartiq mapping, {plate: (cartilage label, bone label)} in the file's labels
    "pymskt_dess_right": ("labels/pymskt_dess_right_label.nrrd", "pymskt_dess",
                          {"femoral_cartilage": (1, 5), "medial_tibial_cartilage": (2, 6),
                           "lateral_tibial_cartilage": (3, 6), "patellar_cartilage": (4, 7)}),
    "mskt_right_example": ("labels/mskt_right_knee_example_label.nrrd", "pymskt_dess",
                           {"femoral_cartilage": (1, 5), "medial_tibial_cartilage": (2, 6),
                            "lateral_tibial_cartilage": (3, 6), "patellar_cartilage": (4, 7)}),
    "mskt_t2_left": ("labels/mskt_t2_left_knee_label.nrrd", "pymskt_dess",
                     {"femoral_cartilage": (1, 5), "medial_tibial_cartilage": (2, 6),
                      "lateral_tibial_cartilage": (3, 6), "patellar_cartilage": (4, 7)}),
    "spl_atlas_left": ("labels/spl_knee_atlas_labels.nrrd", "spl_knee_atlas",
                       {"femoral_cartilage": (83, 95), "medial_tibial_cartilage": (85, 96),
                        "lateral_tibial_cartilage": (84, 96), "patellar_cartilage": (86, 98)}),
}
SHORT = {"femoral_cartilage": "F", "medial_tibial_cartilage": "MT",
         "lateral_tibial_cartilage": "LT", "patellar_cartilage": "P"}


def run_pymskt(mirror: Path, out: Path) -> None:
    """Runs inside the mskt environment."""
    import numpy as np
    from pymskt.mesh import BoneMesh

    res: dict = {}
    for key, (rel, _, plates) in MAPS.items():
        res[key] = {}
        for bone in sorted({b for _, b in plates.values()}):
            t0 = time.perf_counter()
            bm = BoneMesh(path_seg_image=str(mirror / rel), label_idx=bone)
            bm.create_mesh()
            pts = np.asarray(bm.points)
            faces = np.asarray(bm.faces).reshape(-1, 4)[:, 1:]
            tri = pts[faces]
            area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
            w = np.zeros(len(pts))
            np.add.at(w, faces.ravel(), np.repeat(area / 3, 3))
            for plate, (cart, b) in plates.items():
                if b != bone:
                    continue
                bm._list_cartilage_meshes = None
                bm.calc_cartilage_thickness(list_cartilage_labels=[cart])
                t = np.asarray(bm.point_data["thickness (mm)"])
                sel = t > 0
                res[key][plate] = {"area_weighted_mean_mm": float(np.average(t[sel], weights=w[sel])),
                                   "vertex_mean_mm": float(t[sel].mean()),
                                   "covered_area_mm2": float(w[sel].sum())}
            print(key, bone, f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out.write_text(json.dumps(res, indent=2))


def run_cartiq(mirror: Path) -> dict:
    import logging

    from cartiq.config import MeasureConfig, ThicknessConfig
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.io.volume import read_volume
    from cartiq.measurement.measure import measure_labels

    logging.disable(logging.WARNING)
    res: dict = {}
    for key, (rel, mapping, plates) in MAPS.items():
        vol = read_volume(mirror / rel, kind="labels")
        labels, info = to_default_scheme(vol.array, load_mapping(mapping), vol.geometry.affine)
        res[key] = {}
        for method in ("nearest", "normal"):
            cfg = MeasureConfig(thickness=ThicknessConfig(thickness_method=method))
            r = measure_labels(labels, vol.geometry, side=info["side"], config=cfg)
            v = {(row["structure"], row["region"], row["metric"]): row["value"] for row in r.rows}
            for plate in plates:
                res[key].setdefault(plate, {})[method] = v[(plate, "all", "thickness_mean")]
                res[key][plate]["covered_area_mm2"] = v[(plate, "all", "covered_area")]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirror", type=Path, default=Path("../shared/data"))
    ap.add_argument("--mskt-python", default="/work/mskt_venv/bin/python")
    ap.add_argument("--pymskt-json", type=Path, help="(internal) run pymskt, write here")
    ap.add_argument("--reuse", type=Path, help="pymskt numbers from an earlier run")
    a = ap.parse_args()
    if a.pymskt_json:
        run_pymskt(a.mirror.resolve(), a.pymskt_json)
        return
    peer_path = a.reuse or Path("/tmp/cartiq_peer_pymskt.json")
    if a.reuse is None:
        subprocess.run([a.mskt_python, __file__, "--mirror", str(a.mirror.resolve()),
                        "--pymskt-json", str(peer_path)], check=True)
    peer = json.loads(peer_path.read_text())
    ours = run_cartiq(a.mirror)
    print("| map | plate | pymskt rays (area-wt / per vertex) mm | cartiq nearest mm | diff | "
          "cartiq normal mm | diff | nearest vs normal | cAB cartiq / pymskt mm2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, plates in ours.items():
        for plate, v in plates.items():
            p = peer[key][plate]
            ref = p["area_weighted_mean_mm"]
            print(f"| {key} | {SHORT[plate]} | {ref:.2f} / {p['vertex_mean_mm']:.2f} | "
                  f"{v['nearest']:.2f} | {100 * (v['nearest'] / ref - 1):+.1f}% | "
                  f"{v['normal']:.2f} | {100 * (v['normal'] / ref - 1):+.1f}% | "
                  f"{100 * (v['nearest'] / v['normal'] - 1):+.1f}% | "
                  f"{v['covered_area_mm2']:.0f} / {p['covered_area_mm2']:.0f} |")


if __name__ == "__main__":
    main()
