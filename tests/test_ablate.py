"""The ablation runner's own parts: the room's variant (every training case labeled) and the table of
differences paired by seed."""
import json

import ablate
from test_train import tiny_cfg


def write_summary(folder, name, seed, dice):
    path = folder / name / f"seed{seed}" / "test"
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"dice": {"mean": dice}}))


def test_paired_table_subtracts_the_baseline_seed_by_seed(tmp_path):
    for seed, dice in ((1, 0.70), (2, 0.72), (3, 0.90)):
        write_summary(tmp_path, "supervised_only", seed, dice)
    for seed, dice in ((1, 0.75), (2, 0.71)):                  # seed 3 missing: not paired, not counted
        write_summary(tmp_path, "no_references", seed, dice)
    write_summary(tmp_path, "cers", 1, 0.80)                   # its baseline (no_references) has seed 1
    lines = ablate.paired_table(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert rows["no_references − supervised_only"] == ["1: +5.00, 2: -1.00", "+2.00 ± 4.24", "1 of 2"]
    assert rows["cers − no_references"] == ["1: +5.00", "+5.00", "1 of 1"]  # one seed: no spread
    assert len(rows) == 2                                       # no pair, no row
    assert "cers − no_references" in ablate.ablation_table(tmp_path, "t")


def test_table_spread_is_the_sample_std_over_seeds(tmp_path):
    for seed, dice in ((1, 0.70), (2, 0.74)):
        write_summary(tmp_path, "supervised_only", seed, dice)
    row = next(line for line in ablate.ablation_table(tmp_path, "t").splitlines() if "supervised_only" in line)
    assert row.split("|")[3].strip() == "72.00 ± 2.83"          # sqrt((2² + 2²) / (2 - 1)), not 2.00


def test_paired_table_is_empty_without_pairs(tmp_path):
    write_summary(tmp_path, "supervised_only", 1, 0.7)
    assert ablate.paired_table(tmp_path) == []
    assert "baseline" not in ablate.ablation_table(tmp_path, "t")


def test_supervised_all_labels_every_training_case_but_the_validation_split(tiny_la, tmp_path):
    cfg = tiny_cfg(tiny_la, tmp_path / "run", val_cases=2)      # 6 IDs in train.list, 2 held out
    changes = ablate.resolved(ablate.ABLATIONS["supervised_all"], cfg)
    assert changes["num_labeled"] == 4 and changes["labeled_bs"] == cfg.batch_size
    assert changes["consistency"] == 0 and changes["references"] is False
    assert ablate.resolved(ablate.ABLATIONS["cers"], cfg) == {}


def test_every_variant_is_a_valid_config_and_paper_turns_every_reference_extension_off(tiny_la, tmp_path):
    """Each row gives a config that passes the checks; `paper` is the default reference path (image features
    only) even from a config with every reference extension on, and names each reference switch."""
    import dataclasses
    from config import Config, check_config
    extended = tiny_cfg(tiny_la, tmp_path / "run", ref_masks="true", ref_align="true",
                        ref_counterfactual=0.3, ref_proto_weight=1.0, retrieval="morph")
    for name, changes in ablate.ABLATIONS.items():
        check_config(dataclasses.replace(extended, **ablate.resolved(changes, extended)))
    paper = dataclasses.replace(extended, **ablate.ABLATIONS["paper"])
    defaults = Config()
    switches = [f.name for f in dataclasses.fields(Config) if f.name.startswith("ref_")
                and f.name not in ("ref_temperature", "ref_warmup")]
    assert set(switches) <= set(ablate.PAPER), "a reference switch the paper row does not name"
    assert all(getattr(paper, key) == getattr(defaults, key) for key in ablate.PAPER)
