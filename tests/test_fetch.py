"""`ctan download`: sources, pinned digests, safe extraction and all-or-nothing installation."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from ctan import fetch
from ctan.config import dataset_settings, load_params
from ctan.datasets.demo import generate
from ctan.errors import CtanError
from ctan.fetch import download_dataset, download_url, unsafe_entry_name
from ctan.provenance import file_sha256, tree_sha256

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"train": 2, "validation": 1, "test": 1}


def settings_for(tmp_path: Path, name: str = "ds", **dataset):
    """DatasetSettings of one dataset (default: a small ham10000 demo) with every path in tmp_path."""
    entry = {"format": "ham10000", "source": "demo", "demo": {**COUNTS, "seed": 1}, "tasks": ["lesion"]}
    entry.update(dataset)
    override = {
        "run": {"datasets": [name]},
        "paths": {k: str(tmp_path / k) for k in ("raw", "preprocessed", "models", "results")},
        "datasets": {name: entry},
    }
    path = tmp_path / f"params.{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return dataset_settings(load_params([REPO / "params.yaml", path]), name)


@pytest.fixture
def ham_folder(tmp_path: Path) -> Path:
    """A tiny valid HAM10000-layout dataset, as a folder wrapped in one top-level directory."""
    return generate("ham10000", tmp_path / "src" / "ham-release", COUNTS, seed=3).parent


def make_archive(folder: Path, out: Path) -> Path:
    """Archive ``folder``'s contents as .zip or as a tar with the compression its suffix names."""
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as zf:
            for file in sorted(folder.rglob("*")):
                zf.write(file, file.relative_to(folder).as_posix())
        return out
    mode = {".gz": "w:gz", ".tgz": "w:gz", ".xz": "w:xz", ".bz2": "w:bz2", ".tar": "w"}[out.suffix]
    with tarfile.open(out, mode) as tf:
        for child in sorted(folder.iterdir()):
            tf.add(child, child.name)
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "a/..", "/etc/passwd", "C:\\x", "\\\\server\\share\\x"]
)
def test_unsafe_names_are_refused(name):
    assert unsafe_entry_name(name) is not None


@pytest.mark.parametrize("name", ["a/b", "a/b..c/d", "a/..b", "./a", "provided-data/pt_1/ct.csv"])
def test_ordinary_names_pass(name):
    assert unsafe_entry_name(name) is None


def test_demo_download_is_idempotent_and_guarded(tmp_path, capsys):
    settings = settings_for(tmp_path)
    out = download_dataset(settings)
    record = json.loads((out / "source.json").read_text())
    assert record["kind"] == "demo" and record["demo"] == {"format": "ham10000", "counts": COUNTS, "seed": 1}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"source.json"}
    assert set(record["files"]) == on_disk
    assert record["files"]["HAM10000_metadata.csv"] == file_sha256(out / "HAM10000_metadata.csv")
    assert record["sha256"] == record["tree_sha256"]

    capsys.readouterr()
    assert download_dataset(settings) == out
    assert "nothing to do" in capsys.readouterr().out

    other = settings_for(tmp_path, demo={**COUNTS, "seed": 2})
    with pytest.raises(CtanError, match="pass --force"):
        download_dataset(other)
    assert json.loads((out / "source.json").read_text())["demo"]["seed"] == 1
    download_dataset(other, force=True)
    assert json.loads((out / "source.json").read_text())["demo"]["seed"] == 2
    assert leftovers(out.parent) == ["ds"]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".zip"])
def test_every_archive_format_gives_the_same_tree(tmp_path, ham_folder, suffix):
    archive = make_archive(ham_folder, tmp_path / f"release{suffix}")
    sha = file_sha256(archive)
    out = download_dataset(settings_for(tmp_path, source=str(archive), sha256=sha))
    record = json.loads((out / "source.json").read_text())
    assert record["sha256"] == sha and record["kind"] == "archive" and record["root"] == "ham-release"
    _, expected = fetch.hash_tree(ham_folder)
    assert record["files"] == expected
    assert leftovers(out.parent) == ["ds"]  # no partial folders, no decompressed scratch tar


def test_folder_source_digest_and_pin(tmp_path, ham_folder):
    digest = tree_sha256(ham_folder)
    with pytest.raises(CtanError, match="SHA-256 mismatch"):
        download_dataset(settings_for(tmp_path, source=str(ham_folder), sha256="0" * 64))
    assert not (tmp_path / "raw" / "ds").exists()
    out = download_dataset(settings_for(tmp_path, source=str(ham_folder), sha256=digest))
    record = json.loads((out / "source.json").read_text())
    assert record["sha256"] == digest == record["tree_sha256"] and record["kind"] == "folder"
    assert (out / "ham-release" / "HAM10000_metadata.csv").is_file()
    assert tree_sha256(out / "ham-release") == tree_sha256(ham_folder / "ham-release")


def test_sha256_argument_overrides_params(tmp_path, ham_folder):
    archive = make_archive(ham_folder, tmp_path / "release.tar.gz")
    settings = settings_for(tmp_path, source=str(archive), sha256="1" * 64)
    out = download_dataset(settings, sha256=file_sha256(archive).upper())
    assert (out / "source.json").is_file()


def test_interrupted_download_leaves_nothing(tmp_path, ham_folder, monkeypatch):
    archive = make_archive(ham_folder, tmp_path / "release.tar.gz")

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "hash_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_dataset(settings_for(tmp_path, source=str(archive), sha256=file_sha256(archive)))
    assert leftovers(tmp_path / "raw") == []


def test_incomplete_raw_dir_is_not_mistaken_for_a_download(tmp_path, ham_folder):
    settings = settings_for(tmp_path, source=str(ham_folder))
    settings.raw_dir.mkdir(parents=True)
    (settings.raw_dir / "half-written.csv").write_text("x")
    with pytest.raises(CtanError, match="not a complete download"):
        download_dataset(settings)
    out = download_dataset(settings, force=True)
    assert not (out / "half-written.csv").exists() and (out / "source.json").is_file()


def test_url_source_is_pinned_and_installed(tmp_path, ham_folder, monkeypatch):
    archive = make_archive(ham_folder, tmp_path / "release.zip")
    sha = file_sha256(archive)

    def fake_download(url: str, dest: Path) -> str:  # no network in tests
        shutil.copy(archive, dest)
        return file_sha256(dest)

    monkeypatch.setattr(fetch, "download_url", fake_download)
    url = "https://example.org/release.zip"
    with pytest.raises(CtanError, match=f"its SHA-256 is {sha}"):
        download_dataset(settings_for(tmp_path, source=url))
    assert leftovers(tmp_path / "raw") == []
    out = download_dataset(settings_for(tmp_path, source=url, sha256=sha))
    record = json.loads((out / "source.json").read_text())
    assert record["kind"] == "url" and record["sha256"] == sha and record["source"] == url
    assert not any(p.name == "download" for p in out.rglob("*"))


def test_download_url_streams_and_hashes(tmp_path):
    payload = bytes(range(256)) * 5000
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    dest = tmp_path / "dest.bin"
    assert download_url(src.as_uri(), dest) == hashlib.sha256(payload).hexdigest()
    assert dest.read_bytes() == payload
    with pytest.raises(CtanError, match="download failed"):
        download_url((tmp_path / "absent.bin").as_uri(), tmp_path / "x")


@pytest.mark.parametrize(
    "source", ["s3://stoic2021-training", "https://stoic2021-training.s3.amazonaws.com/"]
)
def test_stoic_bucket_explains_how_to_sync(tmp_path, source):
    with pytest.raises(CtanError, match="aws s3 sync --no-sign-request"):
        download_dataset(settings_for(tmp_path, format="stoic", tasks=["covid"], source=source))


def test_official_sources_are_documented():
    assert fetch.OFFICIAL_SOURCES["openkbp"].endswith("ce625e62f3b04203f22bd9d1634f3e8fb0245e46.zip")
    assert "10.7910/DVN/DBW86T" in fetch.OFFICIAL_SOURCES["ham10000"]
    assert fetch.OFFICIAL_SOURCES["stoic"] == "s3://stoic2021-training"
    for url in fetch.OFFICIAL_SOURCES.values():
        assert url in (fetch.__doc__ or "") or url.split("?")[0] in (fetch.__doc__ or "")


def test_a_folder_source_that_holds_the_download_folder_is_refused(tmp_path, ham_folder):
    """It was copied into its own copy until the path grew too long (a traceback several KB long)."""
    settings = settings_for(tmp_path)
    with pytest.raises(CtanError, match="holds the download's own folder"):
        download_dataset(settings, source=str(tmp_path), force=True)
    assert not (tmp_path / "raw" / "ds").exists()


def test_force_replaces_a_download_whose_record_is_damaged(tmp_path, ham_folder):
    """--force is the remedy the error names; a damaged source.json used to block it too."""
    settings = settings_for(tmp_path)
    download_dataset(settings, source=str(ham_folder))
    (settings.raw_dir / fetch.SOURCE_JSON).write_text("{broken")
    with pytest.raises(CtanError, match="pass --force"):
        download_dataset(settings, source=str(ham_folder))
    download_dataset(settings, source=str(ham_folder), force=True)
    assert json.loads((settings.raw_dir / fetch.SOURCE_JSON).read_text())["kind"] == "folder"


def test_an_mlflow_store_whose_folder_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    from ctan.tracking import init_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    (tmp_path / "file").write_text("")
    params = load_params([REPO / "params.yaml"])
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/file/sub/mlflow.db"
    with pytest.raises(CtanError, match="cannot create the MLflow store's folder"):
        init_tracking(params)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_folder_source_with_a_symlink_loop_or_a_dangling_link_is_refused(tmp_path, ham_folder, kind):
    """A loop was copied into itself until the path grew too long (a shutil.Error traceback); a link to
    nothing was hard-linked as a symlink into the download."""
    release = ham_folder / "ham-release"
    link = release / ("loop" if kind == "loop" else "notes.txt")
    link.symlink_to(".." if kind == "loop" else tmp_path / "gone.txt")
    with pytest.raises(CtanError, match="a loop" if kind == "loop" else "symlink to nothing") as err:
        download_dataset(settings_for(tmp_path, source=str(ham_folder)))
    assert err.value.path == str(link)
    assert leftovers(tmp_path / "raw") == []


def test_symlinks_in_a_folder_source_are_followed(tmp_path, ham_folder):
    """An image folder kept on another disk, linked in: the download holds the images (its digest
    covers them), not symlinks, which a relative link would leave pointing nowhere."""
    release = ham_folder / "ham-release"
    elsewhere = tmp_path / "disk" / "images"
    elsewhere.parent.mkdir()
    shutil.move(release / "HAM10000_images", elsewhere)
    (release / "HAM10000_images").symlink_to(Path("..", "..", "disk", "images"))
    out = download_dataset(settings_for(tmp_path, source=str(ham_folder)))
    copied = out / "ham-release" / "HAM10000_images"
    assert not copied.is_symlink() and not any(p.is_symlink() for p in copied.iterdir())
    record = json.loads((out / "source.json").read_text())
    images = sorted(p.name for p in elsewhere.iterdir())
    assert images and all(f"ham-release/HAM10000_images/{n}" in record["files"] for n in images)
    assert record["sha256"] == record["tree_sha256"] == tree_sha256(out, (fetch.SOURCE_JSON,))
    # Pinned to that digest, the same folder is recognised as already downloaded.
    again = settings_for(tmp_path, source=str(ham_folder), sha256=record["sha256"])
    assert download_dataset(again) == out


@pytest.mark.parametrize("kind", ["archive", "folder"])
def test_read_only_folders_in_a_source_are_writable_in_the_download(tmp_path, ham_folder, kind):
    """A 0555 folder (a read-only mirror, or an archive of one) copied as it came would refuse, to a
    non-root user, a `--force` replacement and the deletion of the download (and, extracted, the files
    after it: tar's "data" filter keeps that from happening; the folder copy kept the mode)."""
    images = next(p for p in ham_folder.rglob("*") if p.is_dir() and p.name.startswith("HAM10000_images"))
    member = images.relative_to(ham_folder)
    images.chmod(0o555)
    try:
        if kind == "archive":
            source = make_archive(ham_folder, tmp_path / "release.tar")
            with tarfile.open(source) as tf:  # the archive does record the folder as read-only
                assert tf.getmember(member.as_posix()).mode & 0o777 == 0o555
            out = download_dataset(settings_for(tmp_path, source=str(source), sha256=file_sha256(source)))
        else:
            out = download_dataset(settings_for(tmp_path, source=str(ham_folder)))
    finally:
        images.chmod(0o755)
    assert (out / member).is_dir() and (out / member).stat().st_mode & 0o200
