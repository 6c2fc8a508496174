"""`ctan audit` and `ctan evaluate` against damage behind the numbers (issue 13 items 2, 3, 4).

One tiny run is built once with the package's own functions (HAM10000 demo, 2D, STL and HPS, one
epoch); every test damages a copy of it and checks that the damage is named, with the rows it affects
and the command that rebuilds them, and that nothing is lost.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_folder, work_in_copy
from ctan.cli import main
from ctan.config import load_params

REPO = Path(__file__).resolve().parents[1]
DATASET = "ham10000_demo"
ARCHS = ["stl", "hps"]


def _params_file(root: Path) -> Path:
    override = {
        "run": {"datasets": [DATASET], "architectures": ARCHS, "seeds": [0]},
        # A file store: creating a SQLite one costs ~15 s of migrations, more than the rest of the run.
        "mlflow": {"tracking_uri": "mlruns", "experiment": "audit-test"},
        "training": {"epochs": 1, "batch_size": 4, "cache_mb": 0},
        "datasets": {DATASET: {"demo": {"train": 4, "validation": 2, "test": 3, "seed": 5}}},
    }
    path = root / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A complete tiny run with relative paths (as the workflow has them), so copies of it still work."""
    from ctan.config import dataset_settings
    from ctan.evaluation import evaluate
    from ctan.fetch import download_dataset
    from ctan.preprocess.pipeline import preprocess_dataset
    from ctan.summary import summarize
    from ctan.tracking import init_tracking
    from ctan.training.trainer import train

    root = tmp_path_factory.mktemp("audit") / "run"
    with run_folder(root):
        params = load_params([Path("params.yaml"), _params_file(root).relative_to(root)])
        settings = dataset_settings(params, DATASET)
        download_dataset(settings)
        preprocess_dataset(settings)
        init_tracking(params)
        for arch in ARCHS:
            train(params, DATASET, arch, 0)
            evaluate(params, DATASET, arch, 0)
        summarize(params, Path("results/summary.csv"))
    return root


@pytest.fixture
def run(built, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the tiny run, as the working directory."""
    return work_in_copy(built, tmp_path, monkeypatch)


def _rows() -> list[dict[str, str]]:
    with open("results/summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _audit(capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["audit", "results/summary.csv"])
    return code, capsys.readouterr().out.splitlines()


def _changed(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("CHANGED")]


def _file_line(lines: list[str], path: str) -> str:
    found = [line for line in lines if line.startswith(f"FILE {path}")]
    assert len(found) == 1, lines
    return found[0]


def _rebuild(lines: list[str]) -> str:
    (line,) = [line for line in lines if line.startswith("REBUILD")]
    return line


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_untouched_run_passes(run, capsys):
    code, lines = _audit(capsys)
    assert code == 0, lines
    assert not _changed(lines) and lines[-1].endswith(f"{len(_rows())} of {len(_rows())} rows unchanged")


def test_a_value_edited_in_metrics_json(run, capsys):
    path = Path(f"results/{DATASET}/hps/seed0/metrics.json")
    doc = json.loads(path.read_text())
    doc["tasks"]["lesion"]["dice"] = 0.999
    path.write_text(json.dumps(doc, indent=1))

    code, lines = _audit(capsys)
    assert code == 1
    rows = _rows()
    hps = [i for i, r in enumerate(rows, start=2) if r["architecture"] == "hps"]
    assert [int(c.split()[2].rstrip(":")) for c in _changed(lines)] == hps  # hps rows only, each once
    (dice,) = [c for c in _changed(lines) if "/hps/seed 0/lesion/dice:" in c]
    assert "value " in dice and "(the files give 0.999)" in dice
    assert "SHA-256 changed" in _file_line(lines, str(path))
    assert f"--forcerun {path}" in _rebuild(lines)


def test_a_value_edited_in_summary_csv(run, capsys):
    rows = _rows()
    line = next(
        i for i, r in enumerate(rows, start=2) if r["row_type"] == "metric" and r["metric"] == "auc_macro"
    )
    text = Path("results/summary.csv").read_text().splitlines()
    fields = next(csv.reader([text[line - 1]]))
    value_column = list(rows[0]).index("value")
    fields[value_column] = "0.12345"
    text[line - 1] = ",".join(fields)
    Path("results/summary.csv").write_text("\n".join(text) + "\n")

    code, lines = _audit(capsys)
    assert code == 1
    (changed,) = _changed(lines)
    assert changed.startswith(f"CHANGED line {line}:") and "value 0.12345 (the files give " in changed
    assert f"behind line(s) {line}" in _file_line(lines, "results/summary.csv")
    assert "--forcerun results/summary.csv" in _rebuild(lines)


def test_line_numbers_count_the_blank_lines_of_a_hand_edited_summary(run, capsys):
    """csv skips blank lines; the audit names the line an editor shows."""
    text = Path("results/summary.csv").read_text().splitlines()
    value_column = text[0].split(",").index("value")
    line = next(i for i, t in enumerate(text, start=1) if ",auc_macro," in t and t.startswith("metric,"))
    fields = next(csv.reader([text[line - 1]]))
    fields[value_column] = "0.12345"
    text[line - 1] = ",".join(fields)
    text[2:2] = ["", ""]  # two blank lines after the first row
    Path("results/summary.csv").write_text("\n".join(text) + "\n")

    code, lines = _audit(capsys)
    assert code == 1
    (changed,) = _changed(lines)
    assert changed.startswith(f"CHANGED line {line + 2}:") and "value 0.12345" in changed


def test_a_raw_file_deleted(run, capsys):
    victim = sorted(Path(f"data/raw/{DATASET}").rglob("*.jpg"))[0]
    victim.unlink()

    code, lines = _audit(capsys)
    assert code == 1
    assert len(_changed(lines)) == len(_rows())  # every row of the dataset comes from its raw data
    assert _file_line(lines, str(victim)).startswith(f"FILE {victim}: missing; behind line(s) 2-")
    rebuild = _rebuild(lines)
    assert f"--forcerun data/raw/{DATASET}" in rebuild and "dvc repro" in rebuild


def test_a_raw_file_changed_and_its_record_edited_to_match(run, capsys):
    """source.json alone is not trusted: the preprocessed manifest (pinned by data_hash) names it too."""
    from ctan.provenance import file_sha256

    raw = Path(f"data/raw/{DATASET}")
    victim = sorted(raw.rglob("*.jpg"))[0]
    _flip_a_bit(victim)
    record = json.loads((raw / "source.json").read_text())
    record["files"][victim.relative_to(raw).as_posix()] = file_sha256(victim)
    (raw / "source.json").write_text(json.dumps(record))

    code, lines = _audit(capsys)
    assert code == 1 and "SHA-256 changed" in _file_line(lines, str(victim))


def test_a_flipped_bit_in_a_zarr_chunk(run, capsys):
    victim = next(Path(f"data/preprocessed/{DATASET}/test.zarr").glob("*/image/c/*/*/*"))
    _flip_a_bit(victim)

    code, lines = _audit(capsys)
    assert code == 1 and len(_changed(lines)) == len(_rows())
    damaged = _file_line(lines, f"data/preprocessed/{DATASET}")
    assert "content changed" in damaged and "arrays changed: test/" in damaged
    assert f"--forcerun data/preprocessed/{DATASET}" in _rebuild(lines)


def test_a_flipped_bit_in_a_model(run, capsys):
    model = Path(f"models/{DATASET}/stl/seed0/lesion/model.pt")
    _flip_a_bit(model)

    code, lines = _audit(capsys)
    assert code == 1
    # STL's lesion model is behind STL's rows and, through stl_value, behind every row of seed 0.
    assert len(_changed(lines)) == len(_rows())
    assert "SHA-256 changed" in _file_line(lines, str(model))
    assert f"--forcerun {model}" in _rebuild(lines)


def test_a_raw_folder_that_is_absent_is_reported_but_not_a_change(run, capsys):
    shutil.rmtree(f"data/raw/{DATASET}")
    code, lines = _audit(capsys)
    assert code == 0
    assert any(line.startswith(f"NOT CHECKED data/raw/{DATASET}") for line in lines)


def test_evaluate_refuses_a_model_with_a_flipped_bit(run, capsys):
    """Item 3: one line naming the file, exit 2, the earlier results kept, the audit still failing."""
    model = Path(f"models/{DATASET}/hps/seed0/model.pt")
    results = Path(f"results/{DATASET}/hps/seed0")
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    _flip_a_bit(model)

    capsys.readouterr()
    args = ["evaluate", "--params", "params.yaml", "--params", "override.yaml"]
    assert main([*args, "--dataset", DATASET, "--arch", "hps", "--seed", "0"]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(f"ctan: error: {model}: SHA-256 ") and "model.pt.sha256" in err
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before
    assert _audit(capsys)[0] == 1


def test_evaluate_refuses_a_model_without_its_recorded_hash(run, capsys):
    model = Path(f"models/{DATASET}/hps/seed0/model.pt")
    Path(f"{model}.sha256").unlink()
    capsys.readouterr()
    args = ["evaluate", "--params", "params.yaml", "--params", "override.yaml"]
    assert main([*args, "--dataset", DATASET, "--arch", "hps", "--seed", "0"]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert str(model) in err and "no recorded SHA-256" in err


def test_an_old_summary_without_the_new_columns_is_refused_in_one_line(run, capsys):
    rows = _rows()
    with open("results/summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "metrics_sha256"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != "metrics_sha256"})
    capsys.readouterr()
    assert main(["audit", "results/summary.csv"]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert "results/summary.csv" in err and "metrics_sha256" in err and "ctan summarize" in err


def test_a_data_hash_edited_in_summary_csv_is_that_rows_edit(run, capsys):
    """The data are what the other rows record: the edited row is named, and the summary rebuilt, not
    the preprocessed data (which every row would otherwise have been reported as changed against)."""
    rows = _rows()
    text = Path("results/summary.csv").read_text().splitlines()
    fields = next(csv.reader([text[1]]))
    fields[list(rows[0]).index("data_hash")] = "0" * 32 + ".dir"
    text[1] = ",".join(fields)
    Path("results/summary.csv").write_text("\n".join(text) + "\n")

    code, lines = _audit(capsys)
    assert code == 1
    (changed,) = _changed(lines)
    assert changed.startswith("CHANGED line 2:") and "data_hash 00000000" in changed
    assert not [line for line in lines if line.startswith(f"FILE {rows[0]['data_path']}")], lines
    assert "--forcerun results/summary.csv" in _rebuild(lines)


def test_a_summary_that_is_not_text_is_refused_in_one_line(run, capsys):
    Path("results/summary.csv").write_bytes(b"\xff\xfe\x00garbage\x81\n")
    assert main(["audit", "results/summary.csv"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not a summary CSV" in err[0]


def _write_rows(rows: list[dict[str, str]]) -> None:
    with open("results/summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_summary_without_its_stl_rows_is_still_recomputed(run, capsys):
    """Removing the STL rows once stopped the recomputation (exit 0), so any other number could be edited."""
    rows = [r for r in _rows() if r["architecture"] != "stl"]
    for row in rows:
        if row["row_type"] == "delta_mtl":
            row["value"] = "42"
    _write_rows(rows)

    code, lines = _audit(capsys)
    assert code == 1
    (changed,) = _changed(lines)
    assert "delta_mtl_pct" in changed and "value 42 (the files give " in changed
    assert "lacks " in _file_line(lines, "results/summary.csv") and "/stl/" in _file_line(
        lines, "results/summary.csv"
    )


def test_a_metrics_json_copied_from_another_architecture(run, capsys):
    """The copy's numbers are self-consistent, so only its own record of whose results it holds shows it."""
    rows = _rows()
    stl, hps = (Path(f"results/{DATASET}/{a}/seed0/metrics.json") for a in ("stl", "hps"))
    shutil.copy(stl, hps)
    # The summary rebuilt from the copy, as `ctan summarize` before this check would have written it.
    code, lines = _audit(capsys)
    assert code == 1
    problem = _file_line(lines, str(hps))
    assert "records architecture 'stl' where its folder is for architecture 'hps'" in problem
    assert len(_changed(lines)) == len(rows)  # every row of the dataset: none can be vouched for


def test_a_row_cut_short_is_refused_in_one_line(run, capsys):
    text = Path("results/summary.csv").read_text()
    Path("results/summary.csv").write_text(text[: -len(text.splitlines()[-1]) // 2 - 1] + "\n")
    assert main(["audit", "results/summary.csv"]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert "results/summary.csv: line " in err and "ctan summarize" in err


def _audit_with_params(capsys, *extra: dict) -> tuple[int, list[str]]:
    """The audit given the run's parameter files (and overrides after them)."""
    files = ["params.yaml", "override.yaml"]
    for i, override in enumerate(extra):
        Path(f"extra{i}.yaml").write_text(yaml.safe_dump(override))
        files.append(f"extra{i}.yaml")
    capsys.readouterr()
    code = main(["audit", "results/summary.csv", *(a for f in files for a in ("--params", f))])
    return code, capsys.readouterr().out.splitlines()


def test_a_whole_architecture_removed_is_seen_only_with_the_parameters(run, capsys):
    """Its rows gone, the rows left agree with their files: the parameters say what should be there."""
    _write_rows([r for r in _rows() if r["architecture"] != "hps"])
    assert _audit(capsys)[0] == 0  # the limitation the parameters lift
    code, lines = _audit_with_params(capsys)
    assert code == 1
    problem = _file_line(lines, "results/summary.csv")
    assert "lacks " in problem and f"{DATASET}/hps/0/" in problem


def test_a_whole_dataset_or_other_settings_are_named_with_the_parameters(run, capsys):
    code, lines = _audit_with_params(capsys)
    assert code == 0 and lines[-1].endswith(f"{len(_rows())} of {len(_rows())} rows unchanged"), lines

    code, lines = _audit_with_params(capsys, {"run": {"datasets": [DATASET, "openkbp_demo"]}})
    assert code == 1
    assert "lacks every row of openkbp_demo, which params.yaml, override.yaml, extra0.yaml ask for" in (
        _file_line(lines, "results/summary.csv")
    )

    code, lines = _audit_with_params(capsys, {"training": {"epochs": 3}})
    assert code == 1
    assert f"rows of {DATASET} were made with other settings" in _file_line(lines, "results/summary.csv")
    assert len(_changed(lines)) == len(_rows())
