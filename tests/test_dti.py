"""Drug-target interaction: featurisation, TDC CSV loading, the synthetic generator, the scaffold-skew partition,
the DTI bundle under MONAI's checks and CLI, and a short federated run with DP-SGD and secure aggregation."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

BUNDLE = REPO / "bundles" / "drug_target_interaction"
CONFIGS = BUNDLE / "configs"
SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAAS"


def _write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("Drug_ID", "Drug", "Target_ID", "Target", "Y")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_dti(tmp_path_factory):
    """(dataset_dir, datalist, partition_dir) of a ~150-pair synthetic DTI set split over 3 sites by scaffold family."""
    from monai_fl_ext.data.dti import SyntheticDTISpec
    from monai_fl_ext.dti_demo import prepare_dti

    spec = SyntheticDTISpec(num_drugs=24, num_targets=8, num_drug_families=4, num_target_families=2, seed=1)
    return prepare_dti(tmp_path_factory.mktemp("tiny_dti"), spec, num_sites=3, alpha=1.0, min_site_size=5)


# ---- featurisation ---------------------------------------------------------------------------------------
def test_morgan_fingerprint_is_deterministic_and_distinguishes_compounds():
    from monai_fl_ext.data.dti import Featurizer, morgan_fingerprint

    aspirin = morgan_fingerprint("CC(=O)Oc1ccccc1C(=O)O")
    assert aspirin.shape == (1024,) and aspirin.dtype == np.float32 and set(np.unique(aspirin)) == {0.0, 1.0}
    same = morgan_fingerprint("O=C(O)c1ccccc1OC(C)=O")  # another SMILES of the same molecule
    np.testing.assert_array_equal(aspirin, same)
    assert not np.array_equal(aspirin, morgan_fingerprint("CC(=O)Nc1ccc(O)cc1"))
    assert Featurizer(radius=3, n_bits=2048).drug("c1ccccc1").shape == (2048,)


@pytest.mark.parametrize("smiles,reason", [("C1CC", "invalid SMILES"), ("c1cccc1", "invalid SMILES"), ("CN(C)(C)(C)C", "invalid SMILES"),
                                           ("not a molecule", "invalid SMILES"), ("", "empty SMILES")])
def test_bad_smiles_raise_a_clear_input_error(smiles, reason):
    from monai_fl_ext.data.dti import morgan_fingerprint
    from monai_fl_ext.errors import InputError

    with pytest.raises(InputError, match=f"dti.csv: line 7: {reason}"):
        morgan_fingerprint(smiles, where="dti.csv: line 7")


def test_kmer_composition_counts_dimers_relative_to_uniform():
    from monai_fl_ext.data.dti import AMINO_ACIDS, kmer_composition

    vec = kmer_composition("acaca", k=2)  # dimers AC, CA, AC, CA: 4 dimers, expected 4/400 each under uniform
    ac, ca = AMINO_ACIDS.index("A") * 20 + AMINO_ACIDS.index("C"), AMINO_ACIDS.index("C") * 20 + AMINO_ACIDS.index("A")
    assert vec.shape == (400,) and vec[ac] == vec[ca] == pytest.approx(2 * 400 / 4)
    assert vec.sum() == pytest.approx(400) and np.count_nonzero(vec) == 2
    mono = kmer_composition(SEQ.replace("U", ""), k=1)
    assert mono.shape == (20,) and mono.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("seq,match", [(SEQ, r"unknown residue\(s\) 'U' \(first at position 222 of 225"), ("MKXB", r"'BX' \(first at position 3"),
                                       ("MK-LV", "'-'"), ("M", "shorter than k=2")])
def test_unknown_residues_and_short_sequences_are_named(seq, match):
    from monai_fl_ext.data.dti import kmer_composition
    from monai_fl_ext.errors import InputError

    with pytest.raises(InputError, match=match):
        kmer_composition(seq, where="kiba.csv: line 3")


# ---- loaders -------------------------------------------------------------------------------------------------
def test_davis_style_csv_labels_by_pkd_threshold_and_merges_duplicates(tmp_path):
    from monai_fl_ext.data.dti import build_dti_dataset, read_dti_csv

    rows = [["11314340", "CC(=O)Oc1ccccc1C(=O)O", "AAK1", "MKKFFDSRREQ", "100"],     # Kd 100 nM -> pKd 7: positive
            ["11314340", "CC(=O)Oc1ccccc1C(=O)O", "ABL1", "MLEICLKLVGC", "10000"],   # DAVIS' "no binding": pKd 5
            ["24889392", "CC(=O)Nc1ccc(O)cc1", "AAK1", "MKKFFDSRREQ", "1"],          # pKd 9
            ["24889392", "CC(=O)Nc1ccc(O)cc1", "AAK1", "MKKFFDSRREQ", "1000"],       # duplicate: mean pKd (9 + 6) / 2 = 7.5
            ["24889392", "CC(=O)Nc1ccc(O)cc1", "ABL1", "MLEICLKLVGC", "101"]]        # just above 100 nM: negative
    path = _write_csv(tmp_path / "davis.csv", rows)
    records, skipped = read_dti_csv(path, affinity="nM")
    assert skipped == [] and len(records) == 4
    pkd = {(r.drug_id, r.target_id): r.affinity for r in records}
    assert pkd[("11314340", "AAK1")] == pytest.approx(7.0) and pkd[("11314340", "ABL1")] == pytest.approx(5.0)
    assert pkd[("24889392", "AAK1")] == pytest.approx(7.5) and records[2].rows == [4, 5]
    datalist = build_dti_dataset(path, tmp_path / "ds", fractions=(1.0, 0.0, 0.0))
    items = {(i["drug_id"], i["target_id"]): i for i in datalist["training"]}
    assert {k: v["label"] for k, v in items.items()} == {("11314340", "AAK1"): [1], ("11314340", "ABL1"): [0],
                                                          ("24889392", "AAK1"): [1], ("24889392", "ABL1"): [0]}
    item = items[("24889392", "AAK1")]
    assert item["patient"] == "24889392" and item["scaffold"] == "c1ccccc1" and item["drug_family"] == "c1ccccc1"
    drug, target = np.load(tmp_path / "ds" / item["image"]), np.load(tmp_path / "ds" / item["target"])
    assert drug.shape == (1024, 1) and target.shape == (400, 1) and drug.dtype == np.float32
    summary = json.loads((tmp_path / "ds" / "featurisation.json").read_text())
    assert summary["label"] == "pKd >= 7.0" and summary["counts"]["pairs"] == 4 and summary["featurizer"]["in_channels"] == 1424


def test_kiba_scores_use_their_own_threshold(tmp_path):
    from monai_fl_ext.data.dti import build_dti_dataset

    rows = [["CHEMBL1", "c1ccccc1O", "O00141", "MTVKTEAAK", "12.5"], ["CHEMBL2", "c1ccccc1N", "O00141", "MTVKTEAAK", "11.2"]]
    datalist = build_dti_dataset(_write_csv(tmp_path / "kiba.csv", rows), tmp_path / "ds", affinity="kiba", fractions=(1.0, 0.0, 0.0))
    assert {i["drug_id"]: i["label"] for i in datalist["training"]} == {"CHEMBL1": [1], "CHEMBL2": [0]}


def test_bad_rows_stop_with_file_and_line_or_are_skipped_and_listed(tmp_path):
    from monai_fl_ext.data.dti import build_dti_dataset, read_dti_csv
    from monai_fl_ext.errors import InputError

    rows = [["D1", "CCO", "T1", "MKVL", "5"], ["D2", "C1CC", "T1", "MKVL", "50000"], ["D3", "CCN", "T2", "MKXL", "5"],
            ["D4", "CCC", "T1", "MKVL", "n/a"], ["D5", "CCCl", "T1", "MKVL", "-3"], ["D6", "c1ccccc1", "T1", "MKVL", "5000"]]
    path = _write_csv(tmp_path / "bindingdb.csv", rows)
    with pytest.raises(InputError, match=r"bindingdb.csv: line 3: invalid SMILES 'C1CC'"):
        read_dti_csv(path)
    records, skipped = read_dti_csv(path, on_invalid="skip")
    assert [r.drug_id for r in records] == ["D1", "D6"]
    assert [s["line"] for s in skipped] == [3, 4, 5, 6]
    assert "unknown residue" in skipped[1]["reason"] and "not a number" in skipped[2]["reason"] and "must be > 0" in skipped[3]["reason"]
    build_dti_dataset(path, tmp_path / "ds", on_invalid="skip", fractions=(1.0, 0.0, 0.0))
    assert len(json.loads((tmp_path / "ds" / "featurisation.json").read_text())["skipped"]) == 4
    assert not (tmp_path / "strict").exists()
    with pytest.raises(InputError, match="line 3"):
        build_dti_dataset(path, tmp_path / "strict")
    assert not (tmp_path / "strict" / "datalist.json").exists()  # nothing half-written


def test_loader_refuses_missing_columns_and_ids_naming_two_structures(tmp_path):
    from monai_fl_ext.data.dti import read_dti_csv
    from monai_fl_ext.errors import InputError

    with pytest.raises(InputError, match=r"missing column\(s\) \['Y'\]"):
        read_dti_csv(_write_csv(tmp_path / "a.csv", [["D1", "CCO", "T1", "MKVL"]], header=("Drug_ID", "Drug", "Target_ID", "Target")))
    with pytest.raises(InputError, match="line 3: drug id 'D1' has a different SMILES than at line 2"):
        read_dti_csv(_write_csv(tmp_path / "b.csv", [["D1", "CCO", "T1", "MKVL", "5"], ["D1", "CCN", "T2", "MKVA", "5"]]))
    with pytest.raises(InputError, match="file not found"):
        read_dti_csv(tmp_path / "missing.csv")


# ---- generator and partition -------------------------------------------------------------------------------
def test_generator_is_deterministic_valid_and_learnable(tmp_path):
    from rdkit import Chem

    from monai_fl_ext.data.dti import SyntheticDTISpec, generate_synthetic_dti, kmer_composition

    spec = SyntheticDTISpec(num_drugs=40, num_targets=12, seed=5)
    a, b = generate_synthetic_dti(tmp_path / "a", spec), generate_synthetic_dti(tmp_path / "b", spec)
    assert a.read_bytes() == b.read_bytes() and (tmp_path / "a" / "generation.json").read_bytes() == (tmp_path / "b" / "generation.json").read_bytes()
    assert a.read_bytes() != generate_synthetic_dti(tmp_path / "c", SyntheticDTISpec(num_drugs=40, num_targets=12, seed=6)).read_bytes()
    rows = list(csv.DictReader(a.open()))
    assert {"Drug_ID", "Drug", "Target_ID", "Target", "Y", "Drug_Family", "Target_Family"} <= set(rows[0])
    assert all(Chem.MolFromSmiles(r["Drug"]) is not None for r in rows)
    for r in rows[:50]:
        kmer_composition(r["Target"])
    pkd = np.array([float(r["pKd"]) for r in rows])
    assert 0.25 < (pkd >= 7).mean() < 0.35
    np.testing.assert_allclose(9 - np.log10([float(r["Y"]) for r in rows]), pkd, atol=1e-3)
    # the ground truth depends on drug family x target family: the cell means explain most of the variance
    cells: dict[tuple[str, str], list[float]] = {}
    for r, v in zip(rows, pkd):
        cells.setdefault((r["Drug_Family"], r["Target_Family"]), []).append(v)
    explained = np.array([np.mean(cells[(r["Drug_Family"], r["Target_Family"])]) for r in rows])
    assert np.corrcoef(explained, pkd)[0, 1] > 0.8


def test_dirichlet_field_partition_skews_scaffold_families_and_keeps_compounds_together(tiny_dti, tmp_path):
    from collections import Counter

    from monai_fl_ext.errors import InputError
    from monai_fl_ext.partition import partition_datalist

    _, datalist_path, partition_dir = tiny_dti
    datalist = json.loads(datalist_path.read_text())
    manifest = json.loads((partition_dir / "manifest.json").read_text())
    assert manifest["spec"]["strategy"] == "dirichlet_field" and manifest["spec"]["field"] == "drug_family"
    owner = {}
    families = {}
    for site in manifest["sites"]:
        site_dl = json.loads((partition_dir / site["file"]).read_text())
        items = [i for s in ("training", "validation", "test") for i in site_dl[s]]
        families[site["name"]] = Counter(i["drug_family"] for i in items)
        for i in items:
            assert owner.setdefault(i["drug_id"], site["name"]) == site["name"]
    assert sum(len(site_dl) for site_dl in families.values()) >= 3
    assert len(owner) == len({i["drug_id"] for s in ("training", "validation", "test") for i in datalist[s]})
    skewed = partition_datalist(datalist, 3, "dirichlet_field", alpha=0.05, seed=0, field="drug_family")
    dominant = [Counter(i["drug_family"] for i in d["training"]).most_common(1)[0][1] / len(d["training"]) for d in skewed.values()]
    assert max(dominant) > 0.6
    broken = json.loads(datalist_path.read_text())
    broken["training"][0]["drug_family"] = "other-family"
    with pytest.raises(InputError, match="needs one value per patient|no 'drug_family' value|has drug_family"):
        partition_datalist(broken, 3, "dirichlet_field", alpha=1.0, seed=0, field="drug_family")
    del broken["training"][0]["drug_family"]
    with pytest.raises(InputError, match=r"training\[0\].*has no 'drug_family' value"):
        partition_datalist(broken, 3, "dirichlet_field", alpha=1.0, seed=0, field="drug_family")


# ---- the bundle ---------------------------------------------------------------------------------------------
def _monai_bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _cli(tiny_dti, run_dir: Path, **extra: str) -> list[str]:
    dataset_dir, datalist, _ = tiny_dti
    args = ["--bundle_root", str(BUNDLE), "--dataset_dir", str(dataset_dir), "--datalist", str(datalist),
            "--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "eval"), "--batch_size", "16"]
    for key, value in extra.items():
        args += [f"--{key}", value]
    return args


def test_metadata_matches_the_configs_and_model_zoo_layout():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
                "description", "authors", "copyright", "data_source", "data_type", "label_classes", "network_data_format",
                "eval_metrics", "intended_use"):
        assert meta.get(key), key
    assert meta["version"] in meta["changelog"] and "rdkit" in meta["required_packages_version"]
    train = json.loads((CONFIGS / "train.json").read_text())
    inputs = meta["network_data_format"]["inputs"]["image"]
    assert inputs["num_channels"] == train["fingerprint_bits"] + 20 ** train["kmer_k"] == 1424 and inputs["spatial_shape"] == [1]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(train["labels"]) == 1
    assert train["network_def"]["spatial_dims"] == 1 and train["network_def"]["layers"] == [2, 2, 2, 2]
    assert train["norm"] == "batch" and json.loads((CONFIGS / "train_dp.json").read_text())["norm"] == "group"
    assert not any(t["_target_"].startswith("Rand") for t in train["deterministic_transforms"])
    for name in ("train.json", "evaluate.json", "inference.json", "train_dp.json", "logging.conf"):
        assert (CONFIGS / name).is_file(), name
    for name in ("docs/README.md", "LICENSE"):
        assert (BUNDLE / name).is_file(), name


@pytest.mark.parametrize("workflow_type,configs", [("train", ["train.json"]), ("infer", ["inference.json"])])
def test_check_properties_reports_nothing_missing(workflow_type, configs, tiny_dti, tmp_path):
    from monai.bundle import ConfigWorkflow

    dataset_dir, datalist, _ = tiny_dti
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
                              workflow_type=workflow_type, bundle_root=str(BUNDLE), dataset_dir=str(dataset_dir), datalist=str(datalist),
                              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"))
    workflow.initialize()
    assert not workflow.check_properties()
    if workflow_type == "train":  # the transforms produce what the metadata promises
        batch = next(iter(workflow.parser.get_parsed_content("train#dataloader")))
        assert batch["image"].shape[1:] == (1424, 1) and batch["label"].shape[1:] == (1,) and "target" not in batch


def test_verify_net_in_out():
    out = _monai_bundle("verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json")
    assert "verified" in (out.stdout + out.stderr)


@pytest.mark.slow
def test_train_evaluate_infer_export_and_dp_with_stock_monai_cli(tiny_dti, tmp_path):
    run = tmp_path / "run"
    _monai_bundle("run", "--config_file", "configs/train.json", "--train#trainer#max_epochs", "2", *_cli(tiny_dti, run))
    assert (run / "models" / "model.pt").is_file() and list((run / "eval").glob("events.out.tfevents.*"))
    _monai_bundle("run", "--config_file", "['configs/train.json','configs/evaluate.json']", *_cli(tiny_dti, run))
    values = dict(line.split("\t", 1) for line in (run / "eval" / "metrics.csv").read_text().splitlines())
    assert 0.0 <= float(values["val_auc"]) <= 1.0
    _monai_bundle("run", "--config_file", "configs/inference.json", *_cli(tiny_dti, run))
    rows = list(csv.reader((run / "eval" / "predictions.csv").open()))
    test_items = json.loads(tiny_dti[1].read_text())["test"]
    assert [r[0] for r in rows] == [f"{i['drug_id']}|{i['target_id']}" for i in test_items]
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)

    ts = run / "model.ts"
    _monai_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(run / "models" / "model.pt"),
                  "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json")
    from monai.bundle import ConfigParser

    from monai_fl_ext.bundle import load_checkpoint

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    eager = load_checkpoint(parser.get_parsed_content("network_def"), run / "models" / "model.pt").eval()
    x = torch.rand(3, 1424, 1)
    torch.testing.assert_close(torch.jit.load(str(ts))(x), eager(x))

    dp = _monai_bundle("run", "--config_file", "['configs/train.json','configs/train_dp.json']", "--train#trainer#max_epochs", "1",
                       "--dp#delta", "0.001", *_cli(tiny_dti, tmp_path / "dp"))
    line = next(line for line in dp.stdout.splitlines() if line.startswith("DP-SGD: epsilon"))
    assert float(line.split()[2]) > 0


# ---- federated -------------------------------------------------------------------------------------------
def test_validation_curve_assigns_each_metric_to_the_model_it_evaluated():
    from monai_fl_ext.dti_demo import validation_curve

    report = {"rounds": [{"round": 0, "global_metrics": {"val_auc": 0.5}}, {"round": 1, "global_metrics": {"val_auc": 0.8}},
                         {"round": 2, "global_metrics": {}}],
              "final_validation": {"global_metrics": {"val_auc": 0.9}}}
    assert validation_curve(report) == [{"after_round": 1, "val_auc": 0.8}, {"after_round": 3, "val_auc": 0.9}]


def test_dti_consortium_cli_defaults_are_the_scenario_schedule():
    from monai_fl_ext.cli import build_parser
    from monai_fl_ext.dti_demo import SCENARIO_SCHEDULE

    args = build_parser().parse_args(["dti-consortium"])
    assert (args.rounds, args.local_epochs, args.algorithm, args.server_opt, args.server_lr, args.server_momentum) == tuple(
        SCENARIO_SCHEDULE[k] for k in ("rounds", "local_epochs", "algorithm", "server_optimizer", "server_lr", "server_momentum"))
    assert args.central_epochs is None  # the central baseline defaults to rounds x local epochs


def test_torch_threads_restores_the_thread_count():
    from monai_fl_ext.baseline import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_three_site_flare_simulation_with_dp_sgd_and_secure_aggregation(tiny_dti, tmp_path):
    from monai_fl_ext.dti_demo import audit_verdict, round_time_split
    from monai_fl_ext.federated import run_federated
    from monai_fl_ext.flare.job import FederatedJobSpec

    dataset_dir, datalist, partition_dir = tiny_dti
    spec = FederatedJobSpec(bundle="drug_target_interaction", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(tmp_path / "fl"), num_rounds=2, cross_site_eval=False, wait_time_after_min_received=60,
                            overrides={"batch_size": 16}, privacy={"target_epsilon": 8.0, "delta": 1e-3}, secure_aggregation={},
                            name="dti_secure_dp")
    report = run_federated(spec, datalist, mode="sim", progress=False)
    assert report["status"] == "completed" and len(report["rounds"]) == 2
    history = json.loads((tmp_path / "fl" / "server" / "history.json").read_text())
    for r in history["rounds"]:
        assert r["aggregated"] and r["secure_aggregation"]["contributors"] == ["site-1", "site-2", "site-3"] and r["weights"] == {}
    assert 7.0 < max(p["epsilon"] for p in report["privacy"].values()) <= 8.0 + 1e-6
    assert 0.0 <= report["test"]["macro_auc"] <= 1.0 and set(report["per_site_test"]) <= {"site-1", "site-2", "site-3"}
    split = round_time_split(tmp_path / "fl" / "server")
    assert len(split) == 2 and all(0 < r["train_seconds_max"] <= r["seconds"] for r in split)
    verdict = audit_verdict(tmp_path / "fl" / "server", tmp_path / "fl" / "server_keys" / "audit_signing_key.pem")
    assert verdict is not None and verdict["ok"] and verdict["complete"]
