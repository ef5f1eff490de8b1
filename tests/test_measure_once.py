"""A batch measures each scan exactly once: scoring and every comparison reuse the
scan's saved surfaces (``measurement.npz``) instead of measuring its label map again."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom
from cartiq.io.labels import default_scheme
from cartiq.io.volume import write_volume


def test_batch_with_follow_ups_measures_each_scan_once(tmp_path, monkeypatch):
    import cartiq
    import cartiq.measurement.measure as M

    ph = make_phantom(PhantomSpec(seed=4, spacing_mm=(1.0, 1.0, 2.0)))
    paths = write_phantom(ph, tmp_path / "ph")
    thin = ph.labels.array.copy()  # follow-up: 2 voxels of femoral cartilage eroded at the top
    fc = thin == default_scheme()["femoral_cartilage"]
    thin[fc & (np.cumsum(fc, axis=2) <= 1)] = default_scheme()["femur"]
    write_volume(tmp_path / "fu.nii.gz", thin, ph.labels.geometry)
    rows = ["subject_id,timepoint,image,seg,side,arm,kl_grade",
            f"S1,baseline,{paths['image']},{paths['seg']},right,MSC,2",
            f"S1,m12,{paths['image']},{tmp_path / 'fu.nii.gz'},right,MSC,2",
            f"S2,baseline,{paths['image']},{paths['seg']},right,placebo,3",
            f"S2,m6,{paths['image']},{paths['seg']},right,placebo,3",
            f"S2,m12,{paths['image']},{tmp_path / 'fu.nii.gz'},right,placebo,3"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")

    calls = []
    original = M.measure_labels
    monkeypatch.setattr(M, "measure_labels",
                        lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    res = cartiq.run_batch(manifest, tmp_path / "out", workers=1, reports=False)
    assert not res.failures
    assert len(calls) == 5  # five scans, three comparisons, five scorings: five measurements
    for sid, tp in (("S1", "m12"), ("S2", "m6"), ("S2", "m12")):
        change = pd.read_csv(next((tmp_path / "out" / sid).glob(f"*{tp}*/change.csv")))
        fem = change[(change.structure == "femoral_cartilage") & (change.region == "all")
                     & (change.metric == "volume")].iloc[0]
        if tp == "m6":
            assert fem.change == pytest.approx(0.0, abs=1e-6)
        else:
            assert fem.change < -100  # mm3: the eroded layer is seen as a loss
