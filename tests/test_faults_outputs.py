"""Fault injection on the output side: damaged folders, short writes, full disks, refused
folders, relative paths on a cluster, a killed batch process.

Every case asserts the exit code, the one line on stderr (naming the file, no traceback) and
the state on disk (no folder marked complete with missing or partial content).  Inputs are
one coarse phantom (0.8 x 0.8 x 1.5 mm) written once per module into a world-readable
folder (the permission test runs its command as an unprivileged user).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cartiq.cli import main
from cartiq.io.outputs import INCOMPLETE_MARK, is_complete, why_incomplete

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def ph():
    """A phantom (image.nii.gz, seg.nii.gz) in a folder every user can read."""
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

    d = Path(tempfile.mkdtemp(prefix="cartiq-faults-"))
    d.chmod(0o755)
    paths = write_phantom(make_phantom(PhantomSpec(seed=1, spacing_mm=(0.8, 0.8, 1.5))),
                          d / "phantom")
    for p in (d / "phantom", *paths.values()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def finished(ph):
    """One finished `cartiq measure` folder (copied by the tests that damage it)."""
    out = ph / "finished"
    assert _main(["measure", *_inputs(ph), "-o", str(out)]) == 0
    return out


def _inputs(ph: Path) -> list[str]:
    return [str(ph / "phantom" / "image.nii.gz"), "--seg", str(ph / "phantom" / "seg.nii.gz"),
            "--side", "right"]


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(["-q", *argv])
    return e.value.code


def _cli(argv: list[str], *, shell_prefix: str = "", wrap: list[str] = (), cwd=None,
         timeout: float = 300) -> tuple[int, str]:
    """``cartiq ARGV`` in a subprocess (``shell_prefix``: bash commands run first in the
    same shell, e.g. ``ulimit -f``; ``wrap``: a command the shell runs it under)."""
    cmd = " ".join([shell_prefix, "exec", *wrap, '"$@"'])
    proc = subprocess.run(["bash", "-c", cmd, "_", sys.executable, "-m", "cartiq", "-q", *argv],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)
    return proc.returncode, proc.stderr


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("cartiq: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_not_complete(folder: Path) -> None:
    assert not (folder / "manifest.json").exists()
    assert not is_complete(folder)


# ----------------------------------------------------------------------------- the contract


def test_manifest_lists_every_file_with_size_and_hash(finished):
    files = json.loads((finished / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(finished).as_posix() for p in finished.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"manifest.json"}
    assert {"measurements.csv", "thickness.nii.gz", "segmentation.nii.gz"} <= set(files)
    assert any(f.startswith("meshes/") for f in files)
    for rel, entry in files.items():
        assert entry["size"] == (finished / rel).stat().st_size
        assert entry["sha256"] == _sha(finished / rel)
    assert not (finished / INCOMPLETE_MARK).exists() and is_complete(finished)


def test_a_changed_byte_makes_the_folder_incomplete(finished, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(finished, out)
    f = out / "measurements.csv"
    data = bytearray(f.read_bytes())
    data[-3] = ord("9") if data[-3] != ord("9") else ord("8")  # same size, other content
    f.write_bytes(bytes(data))
    assert why_incomplete(out) == "measurements.csv differs from the file the manifest " \
                                  "records (sha256)"
    rc, err = _cli(["score", str(out), "-o", str(tmp_path / "score")])
    line = _one_error_line(err)
    assert rc == 2 and "damaged output folder: measurements.csv differs" in line
    assert str(out) in line and not (tmp_path / "score" / "manifest.json").exists()


def test_recompute_leaves_no_file_of_the_earlier_run(ph, finished, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(finished, out)
    (out / "meshes" / "lateral_tibial_cartilage_old.vtk").write_bytes(b"old mesh")
    (out / ".qc-x1y2.png").write_bytes(b"temporary")
    (out / "extra").mkdir()
    (out / "extra" / "stale.csv").write_text("a,b\n")
    assert _main(["measure", *_inputs(ph), "-o", str(out)]) == 0
    assert not (out / "meshes" / "lateral_tibial_cartilage_old.vtk").exists()
    assert not (out / ".qc-x1y2.png").exists() and not (out / "extra").exists()
    assert is_complete(out)
    files = set(json.loads((out / "manifest.json").read_text())["files"])
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == \
        files | {"manifest.json"}


def test_output_folder_holding_an_input_is_refused(ph, finished, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(finished, out)  # a cartiq folder: a recompute would empty it
    seg = out / "segmentation.nii.gz"
    before = _sha(seg)
    manifest_before = (out / "manifest.json").read_bytes()
    rc, err = _cli(["measure", str(ph / "phantom" / "image.nii.gz"), "--seg", str(seg),
                    "--side", "right", "-o", str(out)])
    line = _one_error_line(err)
    assert rc == 2
    assert f"{out}: output folder holds the input {seg}" in line
    assert _sha(seg) == before  # nothing written, nothing emptied
    assert (out / "manifest.json").read_bytes() == manifest_before


# ----------------------------------------------------------------------------- short writes


@pytest.mark.parametrize("limit_kib, name, problem", [
    (40, "thickness.nii.gz", "written file is damaged"),  # ITK leaves a cut gzip stream
    (200, "meshes/femoral_cartilage.vtk", "cannot write (File too large)"),  # EFBIG
])
def test_file_size_limit(ph, tmp_path, limit_kib, name, problem):
    out = tmp_path / "m"
    rc, err = _cli(["measure", *_inputs(ph), "-o", str(out)],
                   shell_prefix=f"ulimit -f {limit_kib};")
    line = _one_error_line(err)
    assert rc == 2, err
    assert line.startswith(f"cartiq: error: {out / name}: {problem}")
    _assert_not_complete(out)
    assert (out / INCOMPLETE_MARK).exists()
    assert not (out / name).exists()  # the short file was never renamed into place
    assert not [p for p in out.rglob(".*") if p.name != INCOMPLETE_MARK]  # no temporaries


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs (needs root or "
                    "user namespaces)")
def test_full_disk(ph, tmp_path):
    disk, left = tmp_path / "disk", tmp_path / "left.txt"
    disk.mkdir()
    out = disk / "m"
    # a 300 KiB file system in a private mount namespace, filled by the run; what the run
    # left there is listed before the namespace (and the file system) goes
    script = (f'mount -t tmpfs -o size=300k tmpfs {disk} || exit 99; "$@"; rc=$?; '
              f'ls -A {out} > {left}; exit $rc')
    proc = subprocess.run(["unshare", "-m", "bash", "-c", script, "_", sys.executable, "-m",
                           "cartiq", "-q", "measure", *_inputs(ph), "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert re.match(rf"cartiq: error: {re.escape(str(out))}/\S+: cannot write \(No space left "
                    r"on device\)$", line), line
    names = left.read_text().split()
    assert "manifest.json" not in names and INCOMPLETE_MARK in names
    assert not [n for n in names if n.startswith(".") and n != INCOMPLETE_MARK]


def test_permission_denied(ph, tmp_path):
    parent = Path(tempfile.mkdtemp(prefix="cartiq-ro-"))
    try:
        parent.chmod(0o555)
        out = parent / "m"
        wrap: list[str] = []
        if os.geteuid() == 0:  # root writes anyway: run as an unprivileged user
            if shutil.which("unshare") is None or subprocess.run(
                    ["unshare", "-U", "true"], capture_output=True).returncode != 0:
                pytest.skip("running as root without user namespaces")
            wrap = ["unshare", "-U"]
        rc, err = _cli(["measure", *_inputs(ph), "-o", str(out)], wrap=wrap)
        line = _one_error_line(err)
        assert rc == 2, err
        assert line == f"cartiq: error: {out}: output folder is not writable"
        assert not out.exists()
    finally:
        parent.chmod(0o755)
        shutil.rmtree(parent, ignore_errors=True)


# ----------------------------------------------------------------------------- batch

HEADER = "subject_id,timepoint,image,seg,side"


def _manifest(ph: Path, path: Path, subjects: int) -> Path:
    img, seg = ph / "phantom" / "image.nii.gz", ph / "phantom" / "seg.nii.gz"
    rows = [HEADER] + [f"S{i:02d},baseline,{img},{seg},right" for i in range(1, subjects + 1)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _batch(manifest: Path, out: Path, *extra: str) -> int:
    return _main(["batch", str(manifest), "-o", str(out), "--no-progress", "--no-report",
                  *extra])


def _summary(out: Path) -> tuple[int, int, int]:
    lines = [ln for ln in (out / "batch.log").read_text().splitlines() if "batch finished" in ln]
    m = re.search(r"(\d+) done, (\d+) skipped \(up to date\), (\d+) failed", lines[-1])
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


def _cohort_subjects(out: Path) -> list[str]:
    import pandas as pd

    return sorted(set(pd.read_csv(out / "measurements.csv").subject_id))


def test_batch_resume_recomputes_a_damaged_scan(ph, tmp_path):
    manifest, out = _manifest(ph, tmp_path / "manifest.csv", 2), tmp_path / "out"
    assert _batch(manifest, out, "--workers", "1") == 0
    assert _summary(out) == (2, 0, 0) and _cohort_subjects(out) == ["S01", "S02"]

    # 1. a deleted measurements.csv: that scan is recomputed, the log says why
    (out / "S01" / "baseline" / "measurements.csv").unlink()
    assert _batch(manifest, out, "--workers", "1") == 0
    assert _summary(out) == (1, 1, 0)
    assert "S01/baseline: recomputed: measurements.csv is missing" in \
        (out / "batch.log").read_text()
    assert "recomputed: measurements.csv is missing" in \
        (out / "S01" / "baseline" / "scan.log").read_text()
    assert is_complete(out / "S01" / "baseline")
    assert _cohort_subjects(out) == ["S01", "S02"]

    # 2. a truncated thickness map: recomputed, the log names the file and its size
    f = out / "S02" / "baseline" / "thickness.nii.gz"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    assert _batch(manifest, out, "--workers", "1") == 0
    assert _summary(out) == (1, 1, 0)
    assert f"S02/baseline: recomputed: thickness.nii.gz has {size // 2} bytes, the manifest " \
           f"records {size}" in (out / "batch.log").read_text()
    assert f.stat().st_size == size and is_complete(out / "S02" / "baseline")

    # 3. nothing damaged: nothing recomputed
    assert _batch(manifest, out, "--workers", "1") == 0
    assert _summary(out) == (0, 2, 0)


def test_batch_scan_folder_holding_an_input_fails_that_scan(ph, tmp_path):
    out = tmp_path / "out"
    folder = out / "S01" / "baseline"
    folder.mkdir(parents=True)
    seg = folder / "given_seg.nii.gz"
    shutil.copy(ph / "phantom" / "seg.nii.gz", seg)
    img = ph / "phantom" / "image.nii.gz"
    (tmp_path / "m.csv").write_text(f"{HEADER}\nS01,baseline,{img},{seg},right\n")
    assert _batch(tmp_path / "m.csv", out, "--workers", "1") == 3
    import pandas as pd

    fail = pd.read_csv(out / "failures.csv")
    assert fail[["subject_id", "timepoint", "stage"]].values.tolist() == [["S01", "baseline",
                                                                           "output"]]
    assert f"output folder holds the input {seg}" in fail.error[0]
    assert seg.is_file() and not (folder / "manifest.json").exists()


def test_batch_file_size_limit_is_the_scans_failure_row(ph, tmp_path):
    import pandas as pd

    manifest, out = _manifest(ph, tmp_path / "manifest.csv", 1), tmp_path / "out"
    rc, err = _cli(["batch", str(manifest), "-o", str(out), "--workers", "1", "--no-progress",
                    "--no-report"], shell_prefix="ulimit -f 40;")
    assert rc == 3, err
    assert "Traceback" not in err
    fail = pd.read_csv(out / "failures.csv")
    assert fail[["subject_id", "timepoint", "stage"]].values.tolist() == [["S01", "baseline",
                                                                           "measure"]]
    scan = out / "S01" / "baseline"
    assert fail.error[0].startswith(f"{scan / 'thickness.nii.gz'}: written file is damaged")
    _assert_not_complete(scan)
    assert (scan / INCOMPLETE_MARK).exists() and not (scan / "thickness.nii.gz").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_batch_relative_out_with_a_dask_scheduler(ph, tmp_path):
    """The workers run in another folder: ``-o out`` must mean the caller's ``out``."""
    client_dir, worker_dir = tmp_path / "here", tmp_path / "worker"
    client_dir.mkdir()
    worker_dir.mkdir()
    manifest = _manifest(ph, client_dir / "manifest.csv", 1)
    addr = f"tcp://127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                               "127.0.0.1", "--port", addr.rsplit(":", 1)[1], "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=worker_dir)]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
             "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=worker_dir))
        rc, err = _cli(["batch", manifest.name, "-o", "out", "--scheduler", addr,
                        "--no-progress", "--no-report"], cwd=client_dir)
        assert rc == 0, err
        assert is_complete(client_dir / "out" / "S01" / "baseline")
        assert _cohort_subjects(client_dir / "out") == ["S01"]
        assert not (worker_dir / "out").exists()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_batch_leaves_no_worker_behind(ph, tmp_path, sig):
    psutil = pytest.importorskip("psutil")
    manifest, out = _manifest(ph, tmp_path / "manifest.csv", 6), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cartiq", "-q", "batch", str(manifest), "-o",
                             str(out), "--workers", "2", "--no-progress", "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            start_new_session=True)
    main_proc = psutil.Process(proc.pid)
    family: list = []
    try:
        deadline = time.monotonic() + 120
        while True:  # both workers forked and a scan under way
            assert proc.poll() is None and time.monotonic() < deadline
            family = main_proc.children(recursive=True)
            busy = any((d / "scan.log").exists() for d in out.glob("*/*"))
            forkservers = [p for p in family if "forkserver" in " ".join(_cmdline(p))]
            if busy and forkservers and len(_children(forkservers[0])) >= 2:
                break
            time.sleep(0.05)
        family = main_proc.children(recursive=True)
        os.kill(proc.pid, sig)  # the main process only, not its process group
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL if sig == signal.SIGKILL else \
            proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err.decode(errors="replace")
        deadline = time.monotonic() + 20
        while [p for p in family if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in family if _alive(p)] == []
        for d in out.glob("*/*"):  # whatever was cut short is not marked complete
            assert is_complete(d) or not (d / "manifest.json").exists()
    finally:
        for p in family:  # clean up after a failure: only the processes this test started
            if _alive(p):
                p.kill()


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # gone, or a zombie
        return []


def _children(p) -> list:
    try:
        return p.children()
    except Exception:
        return []


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
