"""dsv3lab.replicate: the table's rows are well formed, every status follows from (lab, paper, tol) by
the stated rule (re-implemented here by hand), lab values come from code (inputs perturbed, the
lab column moves and the paper column stays), measured rows read recorded results or say why not."""

import json
import math
import os
import time

import pytest

from dsv3lab import replicate as R

# Everything but the three training experiments (their quick runs are exercised separately).
FAST = [n for n in R.CLAIMS if n not in ("params", "flops", "fp8_training", "balancing", "mtp")]

REQUIRED_IDS = {
    "params_total", "params_activated", "params_mtp", "kv_bytes_per_token_v3", "kv_bytes_per_token_qwen25_72b",
    "kv_bytes_per_token_llama31_405b", "train_gflops_per_token_v3", "training_gpu_hours_total",
    "training_cost_usd", "tpot_ib_ms", "tpot_nvl72_ms", "fp8_accum_max_rel_err_k4096",
    "fp8_accum_max_rel_err_k4096_nc128", "fp8_train_rel_loss_err", "fp8_train_rel_loss_err_per_tensor",
    "maxvio_aux_loss", "maxvio_aux_free", "maxvio_batch_wise_aux", "mtp_acceptance_rate", "mtp_speedup",
    "mtp_ablation_val_loss_delta", "pipeline_bubble_1f1b", "pipeline_bubble_zb1p", "pipeline_bubble_dualpipe",
    "day6_cost_per_day_usd", "day6_profit_margin", "flashmla_fp8_kv_bytes_per_token",
}


def reference_status(lab, paper, tol):
    """The rule of dsv3lab.replicate.core, written again from its docstring."""
    if lab is None:
        return "unavailable"
    if paper is None:
        return "unreported"
    k = tol["kind"]
    if k == "exact":
        same = list(lab) == list(paper) if isinstance(lab, (list, tuple)) else lab == paper
        return "match" if same else "differs"
    if k == "abs":
        d = abs(lab - paper)
        eps = 1e-9 * max(1, abs(paper))
        if d <= tol["value"] + eps:
            return "match"
        return "close" if tol.get("close") is not None and d <= tol["close"] + eps else "differs"
    if k == "upper":
        return "match" if lab <= (paper if tol.get("value") is None else tol["value"]) else "differs"
    if k == "lower":
        return "match" if lab >= (paper if tol.get("value") is None else tol["value"]) else "differs"
    if k == "range":
        return "match" if paper[0] <= lab <= paper[1] else "differs"
    raise AssertionError(k)


@pytest.fixture(scope="module")
def empty_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("no_results")
    old = os.environ.get("DSV3LAB_RESULTS")
    os.environ["DSV3LAB_RESULTS"] = str(d)
    yield d
    if old is None:
        os.environ.pop("DSV3LAB_RESULTS")
    else:
        os.environ["DSV3LAB_RESULTS"] = old


@pytest.fixture(scope="module")
def rows(empty_results):
    return R.replicate(FAST)


def by_id(rows):
    return {r["id"]: r for r in rows}


def check_rows(rows):
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    for r in rows:
        assert set(R.FIELDS) <= set(r), r["id"]
        assert r["kind"] in R.KINDS and r["status"] in R.STATUSES
        assert r["id"].isidentifier() and r["id"] == r["id"].lower()
        assert r["claim"] and r["section"] and r["method"] and r["tol"].get("why"), r["id"]
        assert not isinstance(r["lab"], str), r["id"]
        assert r["status"] == reference_status(r["lab"], r["paper"], r["tol"]), r["id"]
        if r["status"] == "unavailable":
            assert r["lab"] is None and r["note"], r["id"]
        if r["lab"] is not None and not isinstance(r["lab"], list):
            assert math.isfinite(r["lab"]), r["id"]


def test_rows_well_formed_and_statuses_follow_the_rule(rows):
    check_rows(rows)


def test_reference_rule_on_hand_cases():
    assert R.status(37.55, 37, R.printed(0)) == "close"             # rounds to 38; truncated print
    assert R.status(2.541, 2.4, R.printed(1)) == "differs"          # MTP activated: no tolerance fudge
    assert R.status(516096 / 70272, 7.28, R.printed(2)) == "differs"  # LLaMA ratio 7.344 vs 7.28
    assert R.status(4.663, 4.66, R.printed(2)) == "match"
    assert R.status(0.5625, 0.563, R.printed(3)) == "match"         # the band edge, in binary floats
    assert R.status(0.002, 0.0025, R.upper()) == "match" and R.status(0.003, 0.0025, R.upper()) == "differs"
    assert R.status(0.87, [0.85, 0.90], R.within()) == "match"
    assert R.status(0.43, [0.85, 0.90], R.within()) == "differs"
    assert R.status([1, 2], [1, 2], R.exact()) == "match" and R.status([1, 3], [1, 2], R.exact()) == "differs"
    assert R.status(None, 1, R.exact()) == "unavailable" and R.status(0.3, None, R.printed(2)) == "unreported"
    with pytest.raises(ValueError):
        R.row("x", "made_up", "c", 1, 1, "", R.exact(), "m")
    with pytest.raises(ValueError):
        R.row("x", "derived", "c", 1, "1.85-1.90", "", R.exact(), "m")  # text is no lab value
    with pytest.raises(ValueError):
        R.absolute(3.0, why="")


def test_issue_fixes(rows, empty_results):
    r = by_id(rows)
    # the ten add-ups of the paper's own inputs are consistency rows, apart from the lab's results
    for i in ("training_gpu_hours_total", "training_cost_usd", "training_cost_pretrain_usd",
              "training_cost_context_usd", "training_cost_post_usd", "pretrain_gpu_hours_from_rate",
              "days_per_trillion_tokens", "pretrain_days", "lr_schedule_tokens_total", "bias_update_tokens"):
        assert r[i]["kind"] == "consistency", i
    assert r["kv_ratio_llama31_405b"]["status"] == "differs"
    assert r["kv_ratio_llama31_405b"]["tol"]["value"] == pytest.approx(0.005)
    # the typed-in MTP row is gone: no lab value anywhere is text, and no row claims "1.85-1.90"
    assert not any("1.85" in str(x["lab"]) for x in rows)


def test_params_rows_from_the_meta_model():
    rows = R.replicate(["params", "flops"])
    check_rows(rows)
    r = by_id(rows)
    assert r["params_total"]["lab"] * 1e9 == pytest.approx(671_026_404_352)
    assert r["params_total"]["status"] == "match"
    assert r["params_activated"]["lab"] * 1e9 == pytest.approx(37_552_282_624)
    assert r["params_mtp"]["lab"] * 1e9 == pytest.approx(11_610_068_224)
    assert r["params_mtp_activated"]["lab"] * 1e9 == pytest.approx(2_541_458_432)
    assert r["params_mtp_activated"]["status"] == "differs"           # 2.54 vs 2.4 at 0.1 printing
    assert r["train_gflops_per_token_v3"]["status"] == "match"


def test_exact_arithmetic(rows):
    r = by_id(rows)
    assert r["kv_bytes_per_token_v3"]["lab"] == 61 * 576 * 2 == 70272
    assert r["kv_bytes_per_token_llama31_405b"]["lab"] == 126 * 8 * 128 * 2 * 2
    assert r["training_gpu_hours_total"]["lab"] == 2664 + 119 + 5
    assert r["tpot_ib_ms"]["lab"] == pytest.approx(3 * 32 * 9 * 7000 / 50e9 * 2 * 61 * 1e3)
    assert r["tpot_ib_ms_config"]["lab"] == pytest.approx(3 * 32 * 9 * 7168 / 50e9 * 2 * 61 * 1e3)
    assert r["day6_cost_per_day_usd"]["lab"] == pytest.approx(226.75 * 8 * 24 * 2)
    rev = 1e3 * (342 * 0.14 + (608 - 342) * 0.55 + 168 * 2.19)
    assert r["day6_revenue_usd"]["lab"] == pytest.approx(rev)
    assert r["day6_revenue_usd"]["tol"]["value"] == pytest.approx(500 * (0.41 + 0.55 + 2.19))
    assert r["day6_profit_margin"]["lab"] == pytest.approx((562027 - 87072) / 87072)
    assert r["flashmla_fp8_kv_bytes_per_token"]["lab"] == 512 + 4 * 4 + 64 * 2 == 656
    assert r["deepgemm_shape_q_a_kv_a"]["lab"] == [1536 + 512 + 64, 7168]
    assert r["deepgemm_shape_o_proj"]["lab"] == [7168, 128 * 128]
    assert r["eplb_readme_layer0_placement"]["lab"] == [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]


def test_consistency_rows_follow_their_inputs(monkeypatch):
    from dsv3lab.replicate import consistency as C
    before = by_id(R.replicate(["cost", "day6", "schedule", "routing"]))
    monkeypatch.setitem(C.TRAINING, "pretrain_kgpuh", 2700)
    monkeypatch.setitem(C.DAY6, "avg_nodes", 230.0)
    monkeypatch.setitem(C.DAY6, "output_btok", 170)
    monkeypatch.setitem(C.LR_SEGMENTS_T, "cosine", 4.0)
    monkeypatch.setitem(C.LINKS, "ib_gbs", 40)
    after = by_id(R.replicate(["cost", "day6", "schedule", "routing"]))
    for i in ("training_gpu_hours_total", "training_cost_usd", "day6_cost_per_day_usd", "day6_revenue_usd",
              "lr_schedule_tokens_total", "ep_experts_per_token_same_ib_cost"):
        assert after[i]["lab"] != before[i]["lab"], i
        assert after[i]["paper"] == before[i]["paper"], i
        assert after[i]["status"] == "differs", i


def test_derived_rows_follow_the_config(monkeypatch):
    from dsv3lab.config import ModelConfig
    from dsv3lab.replicate import kernel_shapes as K
    real = ModelConfig.preset

    def preset(name):
        cfg = real(name)
        return cfg.replace(kv_lora_rank=256, hidden_size=4096) if name == "v3-671b" else cfg
    monkeypatch.setattr(ModelConfig, "preset", staticmethod(preset))
    r = by_id(K.kernels())
    assert r["flashmla_fp8_kv_bytes_per_token"]["lab"] == 256 + 2 * 4 + 64 * 2
    assert r["flashmla_fp8_kv_bytes_per_token"]["status"] == "differs"
    assert r["deepgemm_shape_q_a_kv_a"]["lab"] == [1536 + 256 + 64, 4096]
    from dsv3lab.replicate import inference as I
    assert by_id(I.tpot())["tpot_ib_ms_config"]["lab"] == pytest.approx(3 * 32 * 9 * 4096 / 50e9 * 122e3)


def _fake_result(name, metrics, seeds=(0, 1, 2)):
    return dict(name=name, title="fake", paper="fake", arms=[], config={}, scale="a fake result written by the test",
                quick=False, seeds=list(seeds), command=f"python -m dsv3lab experiment {name}", commit="0" * 40,
                metrics={k: dict(per_seed=v, mean=sum(v) / len(v), std=0.0, min=min(v), max=max(v), n=len(v))
                         for k, v in metrics.items()}, series={})


def test_measured_rows_read_recorded_results(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3LAB_RESULTS", str(tmp_path))
    rows = R.replicate(["balancing", "mtp", "fp8_training"])
    check_rows(rows)
    for r in rows:
        assert r["kind"] == "measured" and r["status"] == "unavailable" and "not recorded" in r["note"]
    res = {
        "balancing": dict(_fake_result("balancing", {
            "seq_aux_a1e-2.maxvio_global": [0.70, 0.74, 0.72], "aux_free_g1e-2.maxvio_global": [0.10, 0.20, 0.30],
            "aux_free_g1e-3.maxvio_global": [0.9, 0.9, 0.9], "batch_aux_a1e-2.maxvio_global": [0.3, 0.3, 0.3],
            "none.maxvio_global": [1.0, 1.2, 1.4], "aux_free_g1e-2.val_loss": [3.0, 3.1, 3.2],
            "aux_free_g1e-3.val_loss": [3.1, 3.1, 3.1], "seq_aux_a1e-2.val_loss": [3.1, 3.1, 3.1],
            "batch_aux_a1e-2.val_loss": [3.1, 3.1, 3.1], "none.val_loss": [3.1, 3.1, 3.1],
            "aux_free_g1e-2.train_maxvio_batch": [0.5, 0.5, 0.5], "aux_free_g1e-2.train_maxvio_drift": [-0.2, -0.2, -0.2],
            "seq_aux_a1e-2.train_maxvio_batch": [0.5, 0.5, 0.5], "seq_aux_a1e-2.train_maxvio_drift": [0.0, 0.0, 0.0]}),
            arms=["aux_free_g1e-3", "aux_free_g1e-2", "seq_aux_a1e-2", "batch_aux_a1e-2", "none"],
            config=dict(train=dict(steps=400), gammas=[1e-3, 1e-2], seq_alphas=[1e-2], batch_alphas=[1e-2])),
        "mtp": _fake_result("mtp", {"mtp.acceptance_rate": [0.86, 0.88, 0.90], "mtp.tokens_per_step": [1.3, 1.4, 1.5],
                                    "val_loss_delta": [-0.01, 0.0, 0.02]}),
        "fp8_training": _fake_result("fp8_training", {
            "fp8.rel_train_loss_err_vs_bf16": [0.001, 0.002, 0.003],
            "fp8_tensor.rel_train_loss_err_vs_bf16": [0.01, 0.02, 0.03],
            "fp8.rel_val_loss_err_vs_bf16": [0.004, 0.004, 0.004]}),
    }
    for name, r in res.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    rows = by_id(R.replicate(["balancing", "mtp", "fp8_training"]))
    check_rows(list(rows.values()))
    assert rows["maxvio_aux_loss"]["lab"] == pytest.approx(0.72) and rows["maxvio_aux_loss"]["status"] == "match"
    assert rows["maxvio_aux_free"]["lab"] == pytest.approx(0.2) and rows["maxvio_aux_free"]["status"] == "differs"
    assert rows["maxvio_aux_free"]["spread"]["n"] == 3
    assert "gamma 0.01 for steps 0-385, then 0: the best of [0.001, 0.01]" in rows["maxvio_aux_free"]["note"]
    assert "aux_free_g1e-2" in rows["maxvio_aux_free"]["method"]
    assert rows["maxvio_batch_wise_aux"]["status"] == "unreported"
    assert rows["maxvio_aux_free_minus_aux_loss"]["lab"] == pytest.approx(0.2 - 0.72)
    assert rows["maxvio_aux_free_minus_aux_loss"]["status"] == "match"             # the direction
    # ... labelled: the bias arm's training MaxVio still moved by 0.2 on 0.5 in the last tenth
    assert rows["maxvio_aux_free_minus_aux_loss"]["note"].startswith("NOT PLATEAUED")
    assert "aux_free_g1e-2" in rows["maxvio_aux_free_minus_aux_loss"]["note"]
    assert "seq_aux_a1e-2" not in rows["maxvio_aux_free_minus_aux_loss"]["note"]
    assert rows["val_loss_delta_aux_free_vs_seq_aux"]["lab"] == pytest.approx(0.0)
    assert rows["val_loss_delta_aux_free_vs_seq_aux"]["spread"]["per_seed"] == pytest.approx([-0.1, 0.0, 0.1])
    assert rows["val_loss_delta_batch_aux_vs_seq_aux"]["status"] == "match"
    assert rows["mtp_acceptance_rate"]["lab"] == pytest.approx(0.88) and rows["mtp_acceptance_rate"]["status"] == "match"
    assert rows["mtp_speedup"]["lab"] == pytest.approx(1.4) and rows["mtp_speedup"]["status"] == "differs"
    assert rows["mtp_ablation_val_loss_delta"]["status"] == "differs"      # mean +0.0033 > 0
    assert rows["fp8_train_rel_loss_err"]["status"] == "match"
    assert rows["fp8_train_rel_loss_err_per_tensor"]["status"] == "match"  # above the bound, as claimed
    assert rows["fp8_val_rel_loss_err"]["status"] == "differs"
    assert "a fake result written by the test" in rows["fp8_train_rel_loss_err"]["method"]
    # a result without the metric says which one is missing
    (tmp_path / "mtp.json").write_text(json.dumps(_fake_result("mtp", {"val_loss_delta": [0.0]})))
    r = by_id(R.replicate("mtp"))["mtp_speedup"]
    assert r["status"] == "unavailable" and "mtp.tokens_per_step" in r["note"]


def test_pipeline_rows(tmp_path, monkeypatch):
    from dsv3lab import experiments
    monkeypatch.setenv("DSV3LAB_RESULTS", str(tmp_path))
    assert all(r["status"] == "unavailable" for r in R.replicate("pipeline"))
    experiments.run("pipeline", quick=True, record=True, progress=False)
    r = by_id(R.replicate("pipeline"))
    check_rows(list(r.values()))
    assert r["pipeline_bubble_1f1b"]["paper"] == 15 * 3 and r["pipeline_bubble_1f1b"]["status"] == "match"
    assert r["pipeline_bubble_zb1p"]["paper"] == 15 * (1 + 2 - 2) and r["pipeline_bubble_zb1p"]["status"] == "match"
    assert r["pipeline_bubble_dualpipe"]["paper"] == 7 * (3 + 2 - 3) and r["pipeline_bubble_dualpipe"]["status"] == "match"
    assert r["pipeline_activation_dualpipe"]["lab"] == 17 and r["pipeline_params_dualpipe"]["lab"] == 2
    assert r["pipeline_bubble_dualpipe_unequal"]["status"] == "differs"
    # the lab column is the recorded simulation: edit the file and the row follows
    res = experiments.load_result("pipeline")
    res["metrics"]["1f1b.bubble"]["mean"] = 44.0
    (tmp_path / "pipeline.json").write_text(json.dumps(res))
    assert by_id(R.replicate("pipeline"))["pipeline_bubble_1f1b"]["status"] == "differs"


def test_cli_json_shape(tmp_path, capsys, empty_results):
    from dsv3lab.cli import main
    out = tmp_path / "rep.json"
    assert main(["replicate", "--json", "--only", "cost", "--only", "tpot", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"rows"} and printed == json.loads(out.read_text())
    assert {r["claim_group"] for r in printed["rows"]} == {"cost", "tpot"}
    assert main(["replicate", "--only", "kv_cache", "--out", ""]) == 0
    assert "70,272" in capsys.readouterr().out


def test_html_table(rows):
    h = R.html_table(rows)
    assert h.startswith("<table") and h.count("<tr>") >= len(rows)
    assert "kv_bytes_per_token_v3" in h and "consistency" in h


def test_quick_runs_every_measured_row(tmp_path, monkeypatch):
    """--quick: the measured rows' experiments at their smallest scale, here and now (CPU time of
    this process under a minute, so a busy machine does not fail it)."""
    monkeypatch.setenv("DSV3LAB_RESULTS", str(tmp_path))        # nothing recorded: quick must not need it
    t0 = time.process_time()
    rows = R.replicate(["fp8_accumulation", "fp8_training", "balancing", "mtp", "pipeline"], quick=True)
    cpu = time.process_time() - t0
    check_rows(rows)
    assert all(r["lab"] is not None for r in rows), [r["id"] for r in rows if r["lab"] is None]
    assert all("[quick run]" in r["method"] for r in rows if r["claim_group"] != "fp8_accumulation")
    assert REQUIRED_IDS - {r["id"] for r in rows} <= {i for i in REQUIRED_IDS if not i.startswith(
        ("fp8_", "maxvio", "mtp", "pipeline"))}
    assert cpu < 60, f"quick measured rows took {cpu:.0f} s of CPU"
    assert not list(tmp_path.iterdir())                        # quick runs are not recorded


def test_all_required_ids_exist(rows):
    ids = {r["id"] for r in rows} | {r["id"] for r in R.replicate(["params", "flops"])}
    ids |= {r["id"] for r in R.replicate(["fp8_training", "balancing", "mtp"])}
    assert REQUIRED_IDS <= ids, REQUIRED_IDS - ids
