"""Tests of the sample fetch step (pipeline/fetch.py, sample_data/sources.yaml, `cartiq fetch`).

The network path is exercised with file:// URLs and an unreachable local port: no test
needs network access.  Real-mirror tests skip when no mirror of shared/data is present.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import tarfile
from pathlib import Path

import pytest

from cartiq.data import fetch as F
from cartiq.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _mirror() -> Path | None:
    env = os.environ.get("CARTIQ_DATA_MIRROR")
    for cand in (env, REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture
def mirror() -> Path:
    m = _mirror()
    if m is None:
        pytest.skip("no data mirror (set CARTIQ_DATA_MIRROR or provide ../shared/data)")
    return m


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A two-sample registry whose URLs are file:// URLs of files in tmp_path/remote."""
    remote = tmp_path / "remote"
    (remote / "ser").mkdir(parents=True)
    blobs = {"one/a.bin": b"alpha" * 1000, "ser/s1.dcm": b"slice-1", "ser/s2.dcm": b"slice-2"}
    for rel, data in blobs.items():
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_bytes(data)

    def sf(rel: str) -> F.SampleFile:
        return F.SampleFile(path=f"local/{rel}", url=(remote / rel).as_uri(),
                            sha256=_sha(blobs[rel]), size=len(blobs[rel]))

    reg = {
        "single": F.Sample(name="single", kind="file", path="local/one/a.bin", description="",
                           license="MIT", citation="", source="", files=(sf("one/a.bin"),)),
        "series": F.Sample(name="series", kind="folder", path="local/ser", description="",
                           license="MIT", citation="", source="",
                           files=(sf("ser/s1.dcm"), sf("ser/s2.dcm"))),
    }
    monkeypatch.setattr(F, "_registry", lambda path=None: reg)
    return reg, remote, blobs


# ----------------------------------------------------------------------------- registry


def test_sources_yaml_lists_every_sample_with_pinned_urls():
    F._registry.cache_clear()
    names = F.list_samples()
    assert names == ["pykneer_qdess", "pykneer_qdess_fc_reference", "pymskt_mese_t2", "dicom_single", "pymskt_dess_labels",
                     "spl_knee_atlas_labels", "spl_knee_atlas_colors", "mskt_right_knee_labels",
                     "mskt_t2_left_knee_labels"]
    counts = {n: len(F.sample_info(n).files) for n in names}
    assert counts == {"pykneer_qdess": 160, "pykneer_qdess_fc_reference": 4, "pymskt_mese_t2": 192, "dicom_single": 1,
                      "pymskt_dess_labels": 1, "spl_knee_atlas_labels": 1,
                      "spl_knee_atlas_colors": 1, "mskt_right_knee_labels": 1,
                      "mskt_t2_left_knee_labels": 1}
    commits = {"pykneer_qdess": "d7a36d6ceacdf25dbe9d52c67668f9b6ca50e93c",
               "pykneer_qdess_fc_reference": "d7a36d6ceacdf25dbe9d52c67668f9b6ca50e93c",
               "pymskt_mese_t2": "0f56f055fd154befe1e67ce82b2fa2de22dfdff5",
               "pymskt_dess_labels": "0f56f055fd154befe1e67ce82b2fa2de22dfdff5",
               "dicom_single": "126ee906165a8b2f984f08259a4a2d32cf3b3409",
               "spl_knee_atlas_labels": "a033300264aec8625a56512be3865c10cdbcb61b",
               "spl_knee_atlas_colors": "a033300264aec8625a56512be3865c10cdbcb61b"}
    for n in names:
        s = F.sample_info(n)
        assert s.license and s.citation
        for f in s.files:
            if f.member is None:  # a raw file at a fixed commit
                assert f.url.startswith("https://raw.githubusercontent.com/")
                assert f"/{commits[n]}/" in f.url
            else:  # a member of a released source distribution on PyPI
                assert f.url == "https://files.pythonhosted.org/packages/source/m/mskt/" \
                                "mskt-0.1.22.tar.gz"
                assert f.member.startswith("mskt-0.1.22/data/")
            assert len(f.sha256) == 64 and not Path(f.path).is_absolute()
            assert f.path.startswith(s.path.split("/")[0])
    echo_dirs = {Path(f.path).parent.name for f in F.sample_info("pykneer_qdess").files}
    assert echo_dirs == {"echo1", "echo2"}


def test_unknown_sample_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="unknown sample 'nope'.*pymskt_dess_labels"):
        F.fetch_sample("nope", cache_dir=tmp_path)


# ----------------------------------------------------------------------------- download


def test_download_via_file_url_verifies_and_caches(fake_registry, tmp_path, monkeypatch):
    reg, remote, blobs = fake_registry
    cache = tmp_path / "cache"
    p = F.fetch_sample("series", cache_dir=cache)
    assert p == cache / "local" / "ser" and p.is_dir()
    assert sorted(x.name for x in p.iterdir()) == ["s1.dcm", "s2.dcm"]
    assert (p / "s2.dcm").read_bytes() == b"slice-2"
    assert not [x for x in cache.rglob("*") if x.is_file() and x.parent.name != "ser"]
    # second call: the cached files have the right hash, nothing is fetched again
    monkeypatch.setattr(F, "_downloader",
                        lambda *a, **k: lambda *b, **c: pytest.fail("downloaded again"))
    assert F.fetch_sample("series", cache_dir=cache) == p


def test_download_replaces_a_corrupted_cache_file(fake_registry, tmp_path):
    cache = tmp_path / "cache"
    p = F.fetch_sample("single", cache_dir=cache)
    p.write_bytes(b"garbage")
    assert F.fetch_sample("single", cache_dir=cache).read_bytes() == b"alpha" * 1000


def test_download_checksum_mismatch_leaves_nothing(fake_registry, tmp_path):
    reg, remote, blobs = fake_registry
    (remote / "one" / "a.bin").write_bytes(b"tampered")
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=r"file://.*a\.bin: sha256 of download does not match"):
        F.fetch_sample("single", cache_dir=cache)
    assert not [x for x in cache.rglob("*") if x.is_file()]


def test_offline_error_names_the_url(tmp_path, monkeypatch):
    with socket.socket() as s:  # a local port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a.bin"
    reg = {"single": F.Sample(name="single", kind="file", path="local/a.bin", description="",
                              license="MIT", citation="", source="",
                              files=(F.SampleFile(path="local/a.bin", url=url,
                                                  sha256=_sha(b"x")),))}
    monkeypatch.setattr(F, "_registry", lambda path=None: reg)
    with pytest.raises(InputError) as info:
        F.fetch_sample("single", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert msg.startswith(url) and "cannot download" in msg and "--mirror" in msg
    assert "\n" not in msg
    assert not (tmp_path / "cache" / "local" / "a.bin").exists()


def test_mirror_first_then_download_for_missing_files(fake_registry, tmp_path, monkeypatch,
                                                     caplog):
    reg, remote, blobs = fake_registry
    mirror = tmp_path / "mirror"
    (mirror / "local" / "ser").mkdir(parents=True)
    (mirror / "local" / "ser" / "s1.dcm").write_bytes(b"slice-1")
    downloaded = []
    real = F._downloader

    def spy(url, progress):
        downloaded.append(url)
        return real(url, progress)

    monkeypatch.setattr(F, "_downloader", spy)
    p = F.fetch_sample("series", mirror=mirror, cache_dir=tmp_path / "cache")
    assert downloaded == [reg["series"].files[1].url]  # only the file the mirror lacks
    assert (p / "s1.dcm").read_bytes() == b"slice-1"
    assert (p / "s2.dcm").read_bytes() == b"slice-2"
    # again: the missing file is cached and verified now, so nothing is (said to be) downloaded
    downloaded.clear()
    caplog.clear()  # (the first call's records, captured when another test set DEBUG)
    with caplog.at_level(logging.INFO, logger="cartiq.data.fetch"):
        assert F.fetch_sample("series", mirror=mirror, cache_dir=tmp_path / "cache") == p
    assert downloaded == [] and "downloading" not in caplog.text


def test_archive_member_is_extracted_and_verified(tmp_path, monkeypatch):
    data = b"nrrd" * 5000
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("pkg-1.0/data/map.nrrd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def reg_with(sha: str) -> dict:
        f = F.SampleFile(path="labels/map.nrrd", url=archive.as_uri(), sha256=sha,
                         member="pkg-1.0/data/map.nrrd")
        return {"m": F.Sample(name="m", kind="file", path="labels/map.nrrd", description="",
                              license="MIT", citation="", source="", files=(f,))}

    monkeypatch.setattr(F, "_registry", lambda path=None: reg_with(_sha(data)))
    p = F.fetch_sample("m", cache_dir=tmp_path / "cache")
    assert p.read_bytes() == data
    monkeypatch.setattr(F, "_registry", lambda path=None: reg_with(_sha(b"other")))
    with pytest.raises(InputError, match="sha256 of pkg-1.0/data/map.nrrd does not match"):
        F.fetch_sample("m", cache_dir=tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "labels" / "map.nrrd").exists()


def test_mirror_with_wrong_content_is_rejected(fake_registry, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "local" / "one").mkdir(parents=True)
    bad = mirror / "local" / "one" / "a.bin"
    bad.write_bytes(b"not alpha")
    with pytest.raises(InputError, match="sha256 of mirror file does not match") as info:
        F.fetch_sample("single", mirror=mirror, cache_dir=tmp_path / "cache")
    assert str(bad) in str(info.value)


def test_missing_mirror_folder(tmp_path):
    with pytest.raises(InputError, match="mirror folder does not exist"):
        F.fetch_sample("dicom_single", mirror=tmp_path / "nowhere", cache_dir=tmp_path)


# ----------------------------------------------------------------------------- real mirror


def test_fetch_all_real_samples_from_mirror(mirror, tmp_path):
    F._registry.cache_clear()
    cache = tmp_path / "cache"
    q = F.fetch_sample("pykneer_qdess", mirror=mirror, cache_dir=cache)
    assert len(list((q / "echo1").iterdir())) == 80 and len(list((q / "echo2").iterdir())) == 80
    t2 = F.fetch_sample("pymskt_mese_t2", mirror=mirror, cache_dir=cache)
    assert len(list(t2.iterdir())) == 192
    assert F.fetch_sample("dicom_single", mirror=mirror, cache_dir=cache).name == "DICOM_KNEE.dcm"
    for name, fname in (("pymskt_dess_labels", "pymskt_dess_right_label.nrrd"),
                        ("spl_knee_atlas_labels", "spl_knee_atlas_labels.nrrd"),
                        ("spl_knee_atlas_colors", "spl_knee_atlas_colors.ctbl"),
                        ("mskt_right_knee_labels", "mskt_right_knee_example_label.nrrd"),
                        ("mskt_t2_left_knee_labels", "mskt_t2_left_knee_label.nrrd")):
        p = F.fetch_sample(name, mirror=mirror, cache_dir=cache)
        assert p.name == fname and p.is_file()
        assert F._sha256(p) == F.sample_info(name).files[0].sha256


def test_cli_fetch_reads_env_mirror(mirror, tmp_path, monkeypatch, capsys):
    from cartiq.cli import main

    monkeypatch.setenv("CARTIQ_DATA_MIRROR", str(mirror))
    with pytest.raises(SystemExit) as ex:
        main(["fetch", "pymskt_dess_labels", "dicom_single", "--cache", str(tmp_path)])
    assert ex.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()  # log lines go to stderr
    assert out == [str(tmp_path / "labels" / "pymskt_dess_right_label.nrrd"),
                   str(tmp_path / "dicom_single" / "DICOM_KNEE.dcm")]


def test_cli_fetch_lists_and_rejects_unknown(tmp_path, capsys):
    from cartiq.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["fetch"])
    assert ex.value.code == 0
    listing = capsys.readouterr().out
    assert "pykneer_qdess" in listing and "MIT" in listing
    with pytest.raises(SystemExit) as ex:
        main(["fetch", "nope", "--cache", str(tmp_path)])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sample 'nope'" in err[0]
