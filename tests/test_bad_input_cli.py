"""Bad input through the CLI: exit status 2, one line on stderr naming the file, and no output left behind.

Archive problems are caught by `ctan download` before anything is extracted; broken case files are
caught by `ctan preprocess` through the real readers (the dataset is first downloaded from a folder).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from ctan.cli import main
from ctan.datasets.demo import generate
from ctan.provenance import file_sha256

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"train": 2, "validation": 1, "test": 1}
TASKS = {
    "openkbp": ["dose", "structures"],
    "ham10000": ["lesion", "diagnosis"],
    "stoic": ["covid", "severity"],
    "nifti_cases": ["dose", "structures"],
}


def params(tmp_path: Path, fmt: str, source: str | Path, sha256: str | None = None, shape=None) -> list[str]:
    dataset = {"format": fmt, "source": str(source), "sha256": sha256, "tasks": TASKS[fmt]}
    if shape is not None:
        dataset["preprocess"] = {"shape": shape}
    override = {
        "run": {"datasets": ["bad"]},
        "paths": {k: str(tmp_path / k) for k in ("raw", "preprocessed", "models", "results")},
        "datasets": {"bad": dataset},
    }
    path = tmp_path / "params.override.yaml"
    path.write_text(yaml.safe_dump(override))
    return ["--params", str(REPO / "params.yaml"), "--params", str(path), "bad"]


def fails(capsys, command: str, args: list[str], *names: str) -> str:
    """Run a command that must fail cleanly; return its one stderr line."""
    capsys.readouterr()
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ctan: error: ")
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def nothing_left(tmp_path: Path, stage: str) -> None:
    """The stage's output folder is absent, and so is any hidden partial folder beside it."""
    parent = tmp_path / stage
    assert not (parent / "bad").exists()
    assert [p.name for p in parent.iterdir()] == [] if parent.exists() else True


# ----------------------------------------------------------------------------------------------------
# Archives: refused by `ctan download`


@pytest.fixture
def ham_tar(tmp_path: Path) -> Callable[..., Path]:
    """Build a .tar.gz of a valid tiny HAM10000 dataset plus extra (possibly evil) entries."""
    folder = generate("ham10000", tmp_path / "src" / "release", COUNTS, seed=5)

    def build(*extra: tuple[tarfile.TarInfo, bytes | None], name: str = "release.tar.gz") -> Path:
        out = tmp_path / name
        with tarfile.open(out, "w:gz") as tf:
            tf.add(folder, "release")
            for info, data in extra:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return out

    return build


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (entry("release/../../escaped.txt"), "'..'"),
        (entry("/tmp/ctan-absolute-escape.txt"), "absolute path"),
        (entry("release/link", tarfile.SYMTYPE, link="/etc/passwd"), "link"),
        (entry("release/hard", tarfile.LNKTYPE, link="release/HAM10000_metadata.csv"), "link"),
        (entry("release/dev", tarfile.CHRTYPE), "device"),
        (entry("release/fifo", tarfile.FIFOTYPE), "device"),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device", "fifo"],
)
def test_unsafe_tar_entries(tmp_path, capsys, ham_tar, extra, problem):
    archive = ham_tar(extra)
    line = fails(
        capsys, "download", params(tmp_path, "ham10000", archive, file_sha256(archive)), str(archive)
    )
    assert problem in line and extra[0].name in line
    nothing_left(tmp_path, "raw")
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/ctan-absolute-escape.txt").exists()


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_unsafe_zip_entries(tmp_path, capsys, kind):
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("release/HAM10000_metadata.csv", "lesion_id,image_id,dx\n")
        if kind == "dotdot":
            zf.writestr("release/../../escaped.txt", "x")
        else:
            info = zipfile.ZipInfo("release/link")
            info.create_system = 3
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    line = fails(
        capsys, "download", params(tmp_path, "ham10000", archive, file_sha256(archive)), str(archive)
    )
    assert ("'..'" if kind == "dotdot" else "link") in line
    nothing_left(tmp_path, "raw")


def zip_flagged(path: Path, kind: str) -> Path:
    """A stored zip of a tiny HAM10000 dataset whose entries say they are encrypted, or compressed
    with Deflate64 (method 9, what Windows Explorer writes for large files): zipfile reads neither."""
    folder = generate("ham10000", path.parent / "src" / "release", COUNTS, seed=5)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for file in sorted(folder.rglob("*")):
            zf.write(file, file.relative_to(folder.parent).as_posix())
    data = bytearray(path.read_bytes())
    for signature, flags, method in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = data.find(signature)
        while at >= 0:
            if kind == "encrypted":
                data[at + flags] |= 1
            else:
                data[at + method : at + method + 2] = (9).to_bytes(2, "little")
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("kind", "problem"), [("encrypted", "encrypted"), ("deflate64", "7-Zip")])
def test_zip_that_zipfile_cannot_unpack(tmp_path, capsys, kind, problem):
    """Was a RuntimeError / NotImplementedError traceback from zipfile."""
    archive = zip_flagged(tmp_path / "release.zip", kind)
    line = fails(
        capsys, "download", params(tmp_path, "ham10000", archive, file_sha256(archive)), str(archive)
    )
    assert problem in line
    nothing_left(tmp_path, "raw")


def test_checksum_mismatch(tmp_path, capsys, ham_tar):
    archive = ham_tar()
    line = fails(capsys, "download", params(tmp_path, "ham10000", archive, "ab" * 32), str(archive))
    assert "expected " + "ab" * 32 in line and file_sha256(archive) in line
    nothing_left(tmp_path, "raw")


def test_archive_without_pinned_sha256(tmp_path, capsys, ham_tar):
    archive = ham_tar()
    line = fails(capsys, "download", params(tmp_path, "ham10000", archive), str(archive), "--sha256")
    assert file_sha256(archive) in line  # the digest to pin
    nothing_left(tmp_path, "raw")


def test_truncated_archive(tmp_path, capsys, ham_tar):
    archive = ham_tar()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    fails(capsys, "download", params(tmp_path, "ham10000", cut, file_sha256(cut)), str(cut), "truncated")
    nothing_left(tmp_path, "raw")


def test_not_an_archive(tmp_path, capsys):
    junk = tmp_path / "release.tar.gz"
    junk.write_bytes(os.urandom(4096))
    fails(capsys, "download", params(tmp_path, "ham10000", junk, file_sha256(junk)), str(junk))
    nothing_left(tmp_path, "raw")


def test_archive_of_another_dataset(tmp_path, capsys, ham_tar):
    archive = ham_tar()
    line = fails(capsys, "download", params(tmp_path, "openkbp", archive, file_sha256(archive)), str(archive))
    assert "openkbp" in line and "provided-data" in line
    nothing_left(tmp_path, "raw")


def test_empty_dataset(tmp_path, capsys):
    archive = tmp_path / "empty.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in ("open-kbp", "open-kbp/provided-data", "open-kbp/provided-data/train-pats"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    line = fails(capsys, "download", params(tmp_path, "openkbp", archive, file_sha256(archive)), str(archive))
    assert "provided-data" in line
    nothing_left(tmp_path, "raw")


def test_missing_source(tmp_path, capsys):
    fails(capsys, "download", params(tmp_path, "ham10000", tmp_path / "nowhere.tar.gz"), "nowhere.tar.gz")
    nothing_left(tmp_path, "raw")


def test_bucket_source(tmp_path, capsys):
    fails(capsys, "download", params(tmp_path, "stoic", "s3://stoic2021-training"), "s3://", "aws s3 sync")
    nothing_left(tmp_path, "raw")


def test_preprocess_before_download(tmp_path, capsys):
    fails(
        capsys, "preprocess", params(tmp_path, "ham10000", "demo"), str(tmp_path / "raw" / "bad"), "download"
    )
    nothing_left(tmp_path, "preprocessed")


# ----------------------------------------------------------------------------------------------------
# Broken case files: refused by `ctan preprocess` through the readers


def corrupt_then_preprocess(tmp_path, capsys, fmt: str, corrupt: Callable[[Path], Path], shape=None) -> str:
    """Demo dataset in ``fmt``'s real format, one file broken, downloaded from the folder, preprocessed."""
    folder = generate(fmt, tmp_path / "src", COUNTS, seed=7)
    broken = corrupt(folder).relative_to(folder)
    args = params(tmp_path, fmt, folder, shape=shape)
    assert main(["download", *args]) == 0
    line = fails(capsys, "preprocess", args, broken.as_posix())
    nothing_left(tmp_path, "preprocessed")
    return line


def first(folder: Path, pattern: str) -> Path:
    return sorted(folder.rglob(pattern))[0]


def test_truncated_csv(tmp_path, capsys):
    def corrupt(folder):
        path = first(folder, "dose.csv")
        text = path.read_text()
        path.write_text(text[: len(text) // 2].rsplit(",", 1)[0])  # cut mid-row: last voxel has no value
        return path

    corrupt_then_preprocess(tmp_path, capsys, "openkbp", corrupt)


def test_nan_dose(tmp_path, capsys):
    def corrupt(folder):
        path = first(folder, "dose.csv")
        lines = path.read_text().splitlines()
        lines[5] = lines[5].split(",")[0] + ",nan"
        path.write_text("\n".join(lines) + "\n")
        return path

    line = corrupt_then_preprocess(tmp_path, capsys, "openkbp", corrupt)
    assert "NaN" in line


def test_unknown_structure(tmp_path, capsys):
    """Refused by `ctan download`, which lists the patients: nothing is unpacked."""
    folder = generate("openkbp", tmp_path / "src", COUNTS, seed=7)
    source = first(folder, "PTV70.csv")
    source.with_name("Cochlea.csv").write_text(source.read_text())
    line = fails(capsys, "download", params(tmp_path, "openkbp", folder), "Cochlea.csv")
    assert "unknown structure" in line
    nothing_left(tmp_path, "raw")


def test_missing_split(tmp_path, capsys):
    folder = generate("openkbp", tmp_path / "src", COUNTS, seed=7)
    for path in sorted((folder / "provided-data" / "test-pats").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (folder / "provided-data" / "test-pats").rmdir()
    args = params(tmp_path, "openkbp", folder)
    assert main(["download", *args]) == 0
    line = fails(capsys, "preprocess", args, str(tmp_path / "raw" / "bad"))
    assert "test" in line
    nothing_left(tmp_path, "preprocessed")


def test_corrupt_png(tmp_path, capsys):
    def corrupt(folder):
        path = first(folder, "*_segmentation.png")
        path.write_bytes(path.read_bytes()[:60])
        return path

    corrupt_then_preprocess(tmp_path, capsys, "ham10000", corrupt, shape=[32, 32])


def test_corrupt_jpeg(tmp_path, capsys):
    def corrupt(folder):
        path = first(folder, "*.jpg")
        path.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(64))
        return path

    corrupt_then_preprocess(tmp_path, capsys, "ham10000", corrupt, shape=[32, 32])


def test_corrupt_mha(tmp_path, capsys):
    def corrupt(folder):
        path = first(folder, "*.mha")
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
        return path

    corrupt_then_preprocess(tmp_path, capsys, "stoic", corrupt)


def test_corrupt_nifti(tmp_path, capsys):
    def corrupt(folder):
        path = first(folder, "dose.nii.gz")
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[: len(data) // 2]))
        return path

    corrupt_then_preprocess(tmp_path, capsys, "nifti_cases", corrupt)


def test_probability_mask_nifti(tmp_path, capsys):
    def corrupt(folder):
        import nibabel as nib

        path = first(folder, "PTV.nii.gz")
        image = nib.load(path)
        nib.save(nib.Nifti1Image(image.get_fdata(dtype="float32") * 0.3, image.affine), path)
        return path

    line = corrupt_then_preprocess(tmp_path, capsys, "nifti_cases", corrupt)
    assert "not a binary mask" in line and "0.3" in line


def test_one_patient_in_two_splits_is_refused(tmp_path, capsys):
    """A training patient copied into test-pats (under another name) leaks the test set into training."""

    def corrupt(folder):
        data = folder / "provided-data"
        shutil.copytree(data / "train-pats" / "pt_1", data / "test-pats" / "pt_250")
        return data / "test-pats" / "pt_250"

    line = corrupt_then_preprocess(tmp_path, capsys, "openkbp", corrupt)
    assert "pt_1 (train), pt_250 (test) hold the same image" in line and "leaks the test set" in line


def test_one_case_twice_in_a_split_is_a_note(tmp_path, capsys):
    folder = generate("openkbp", tmp_path / "src", COUNTS, seed=7)
    data = folder / "provided-data"
    shutil.copytree(data / "train-pats" / "pt_1", data / "train-pats" / "pt_9")
    args = params(tmp_path, "openkbp", folder)
    assert main(["download", *args]) == 0
    capsys.readouterr()
    assert main(["preprocess", *args]) == 0
    assert (
        "note: cases pt_1 (train), pt_9 (train) hold the same image: counted 2 times"
        in capsys.readouterr().out
    )
