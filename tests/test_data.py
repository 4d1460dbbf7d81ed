"""Download, verification and preprocessing, called through each script's main()."""

from __future__ import annotations

import json

import download
import numpy as np
import preprocess
import pytest

from cnnstudy import cifar
from cnnstudy.errors import JobError

from conftest import CLASS_NAMES, make_cifar_archive, require_mirror


def _leftovers(root):
    """Everything under ``root``: after a failure there must be nothing (no staging dirs)."""
    return sorted(p.name for p in root.rglob("*"))


def test_fake_archive_downloads_verifies_and_preprocesses(fake_archive, tmp_path):
    archive, md5 = fake_archive
    raw = tmp_path / "resources" / "cifar-10-batches-py"
    download.main(str(archive), str(raw), md5=md5)
    assert sorted(p.name for p in raw.iterdir()) == sorted(cifar.MD5)
    assert _leftovers(tmp_path / "resources") == sorted(["cifar-10-batches-py", *cifar.MD5])

    out, manifest = tmp_path / "d.npz", tmp_path / "d.json"
    info = preprocess.main(str(raw), str(out), str(manifest), val_fraction=0.1, seed=0)
    data = np.load(out)
    assert info["counts"] == {"train": 450, "val": 50, "test": 100}
    for split, n in info["counts"].items():
        x, y, labels = data[f"x_{split}"], data[f"y_{split}"], data[f"labels_{split}"]
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert y.shape == (n, 10) and y.dtype == np.float32
        np.testing.assert_array_equal(y.argmax(1), labels)
    assert list(data["class_names"]) == CLASS_NAMES
    assert np.bincount(data["labels_val"]).tolist() == [5] * 10  # stratified
    assert json.loads(manifest.read_text())["md5"] == info["md5"]


def test_pixels_keep_the_channel_layout(tmp_path):
    """The 3072 bytes of a row are R plane, G plane, B plane: check one pixel end to end."""
    archive = tmp_path / "a.tar.gz"
    md5 = make_cifar_archive(archive, per_batch=20, test_size=20)
    raw = tmp_path / "raw"
    download.main(archive.as_uri(), str(raw), md5=md5)  # file:// URL
    x, _ = cifar.read_batch(raw / "test_batch")
    import pickle

    row = pickle.loads((raw / "test_batch").read_bytes(), encoding="bytes")[b"data"][3]
    assert x[3, 0, 1].tolist() == [row[1], row[1024 + 1], row[2048 + 1]]


def test_subsets_are_stratified_and_split_independent(fake_archive, tmp_path):
    archive, md5 = fake_archive
    raw = tmp_path / "raw"
    download.main(str(archive), str(raw), md5=md5)
    full = preprocess.main(str(raw), str(tmp_path / "f.npz"), str(tmp_path / "f.json"))
    small = preprocess.main(
        str(raw), str(tmp_path / "s.npz"), str(tmp_path / "s.json"), subset_train=100, subset_val=20, subset_test=30
    )
    assert small["counts"] == {"train": 100, "val": 20, "test": 30}
    assert small["class_counts"]["train"] == [10] * 10
    assert full["counts"]["val"] == 50
    # The validation subset is drawn from the same held-out images as the full split.
    f, s = np.load(tmp_path / "f.npz"), np.load(tmp_path / "s.npz")
    full_rows = {row.tobytes() for row in f["x_val"]}
    assert all(row.tobytes() in full_rows for row in s["x_val"])
    with pytest.raises(JobError, match="subset.train=10000 is larger than"):
        preprocess.main(str(raw), str(tmp_path / "x.npz"), str(tmp_path / "x.json"), subset_train=10000)
    assert not (tmp_path / "x.npz").exists()


def test_preprocess_names_a_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        preprocess.main(str(tmp_path / "nowhere"), str(tmp_path / "o.npz"), str(tmp_path / "o.json"))
    assert not (tmp_path / "o.npz").exists()


# ---- corrupt inputs: clear error naming the problem, nothing left behind ----------------


def _expect_failure(source, tmp_path, md5, match, error=JobError):
    out = tmp_path / "out" / "cifar-10-batches-py"
    with pytest.raises(error, match=match):
        download.main(str(source), str(out), md5=md5)
    assert not out.exists()
    assert _leftovers(tmp_path / "out") == []


def test_member_with_wrong_checksum(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = make_cifar_archive(archive, tamper="data_batch_3")
    _expect_failure(archive, tmp_path, md5, rf"data_batch_3: expected md5 {md5['data_batch_3']}, got [0-9a-f]{{32}}")


def test_flipped_byte_in_the_archive(fake_archive, tmp_path):
    archive, md5 = fake_archive
    blob = bytearray(archive.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    bad = tmp_path / "flipped.tar.gz"
    bad.write_bytes(bytes(blob))
    # A flipped compressed byte breaks the gzip stream or a member's md5: either way, named.
    _expect_failure(bad, tmp_path, md5, r"flipped\.tar\.gz: (not a complete gzip|checksum mismatch)")


def test_truncated_archive(fake_archive, tmp_path):
    archive, md5 = fake_archive
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    _expect_failure(bad, tmp_path, md5, r"truncated\.tar\.gz: not a complete gzip-compressed tar archive")


def test_not_a_gzip_file(fake_archive, tmp_path):
    _, md5 = fake_archive
    bad = tmp_path / "page.html"
    bad.write_text("<html>404 Not Found</html>")
    _expect_failure(bad, tmp_path, md5, r"page\.html: not a complete gzip-compressed tar archive")


def test_missing_member(tmp_path):
    archive = tmp_path / "a.tar.gz"
    md5 = make_cifar_archive(archive, skip=("test_batch",))
    _expect_failure(archive, tmp_path, md5, r"missing member\(s\) cifar-10-batches-py/test_batch")


def test_wrong_path(tmp_path):
    _expect_failure(tmp_path / "nope.tar.gz", tmp_path, None, r"archive not found: .*nope\.tar\.gz", FileNotFoundError)


def test_unreachable_url_fails_clearly(tmp_path):
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    _expect_failure("http://127.0.0.1:9/cifar-10-python.tar.gz", tmp_path, None, r"could not download http://127")


def test_cli_reports_one_error_line(tmp_path, capsys):
    code = download.cli.run(download.main, argv=["--source", str(tmp_path / "x"), "--outdir", str(tmp_path / "o")])
    assert code == 1
    assert "ERROR CIFAR-10 archive not found" in capsys.readouterr().err


# ---- the real data --------------------------------------------------------------------------


def test_real_mirror_full_dataset(tmp_path, full_data):
    mirror = require_mirror()
    download.main(mirror.as_uri(), str(tmp_path / "raw"))  # official md5s, from a file:// URL
    # The workflow's own preprocess job on the full data (shared with test_verify_published.py).
    info = json.loads((full_data / "results" / "data" / "cifar10.json").read_text())
    assert info["counts"] == {"train": 45000, "val": 5000, "test": 10000}
    assert info["class_counts"]["val"] == [500] * 10
    assert info["class_counts"]["test"] == [1000] * 10
    assert info["class_names"] == CLASS_NAMES


class _RunsCode:
    """What a malicious 'batch' would hold: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "code-ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": [0]}))
    with pytest.raises(cifar.UnsafePickleError, match=r"data_batch_1: refused to unpickle posix\.system"):
        cifar.read_batch(path)
    assert not marker.exists()  # nothing ran
    # The preprocessing job reports it as one clear error line, not a traceback.
    assert issubclass(cifar.UnsafePickleError, JobError)
