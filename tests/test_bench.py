"""python -m runtime.bench on the tiny export: the report's fields (timings are reported, never asserted)."""

from __future__ import annotations

import json

from runtime.bench import main as bench_main


def test_bench_json_fields(engine_dir, tmp_path, capsys):
    assert bench_main(["--engine", str(engine_dir), "--backend", "ort", "--repeats", "1", "--warmup", "0",
                       "--new-tokens", "6", "--seconds", "1", "--work", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["decode_tokens_per_s"]) == {"ort", "transformers"}
    assert set(rep["prefill_tokens_per_s"]) == {"ort", "transformers"}
    assert set(rep["decode_roofline_fraction"]) == {"ort", "transformers"}
    for key in ("vreason_token_time_ratio", "vreason_peak_memory_ratio", "vreason_update_cost_head_passes"):
        assert rep[key] > 0
    assert rep["weight_bytes_per_token"] > 0 and rep["machine"]["read_bandwidth_gb_s"] > 0
