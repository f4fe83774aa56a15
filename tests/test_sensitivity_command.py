"""``turboquant sensitivity``: the table a search starts from, by the same method (the proxy by default)."""

from __future__ import annotations

import pytest

import quant
from app.cli import main
from search.request import MeasureRequest
from search.sensitivity import predict_on_model, run_sensitivity

OPTIONS = dict(model="tiny-random-llama", eval_seqs=2, calib_seqs=2, seq_len=64, bits=[2, 4], groups=[32],
               formats=["rtn", "gptq"])


def test_the_command_predicts_with_the_proxy_by_default_and_stores_what_a_search_reuses(tmp_path, corpus):
    request = MeasureRequest(dataset=corpus, **OPTIONS)
    storage = f"sqlite:///{tmp_path}/s.db"
    table = run_sensitivity(request, storage, progress=False)
    units, settings = len(table.units), len(table.settings)
    assert table.computed == units * settings == 6 * 4 and table.reused == 0
    # The numbers are the proxy's own predictions on the same model and windows.
    loaded, tokens = request.data_config().load()
    space = request.space(quant.weight_matrices(loaded.model))
    kl, nbytes, _ = predict_on_model(loaded.model, tokens, space, ["weights"])["weights"]
    assert table.kl == kl and table.nbytes == nbytes
    again = run_sensitivity(request, storage, progress=False)  # what a search on the same options reads
    assert again.computed == 0 and again.reused == units * settings and again.kl == table.kl


def test_measured_is_one_forward_per_pair_and_kept_apart_from_the_proxy(tmp_path, corpus, capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    proxy = run_sensitivity(MeasureRequest(dataset=corpus, **OPTIONS), storage, progress=False)
    measured = run_sensitivity(MeasureRequest(dataset=corpus, sensitivity_method="measured", **OPTIONS), storage,
                               progress=False)
    assert measured.computed == proxy.computed  # none reused from the proxy's rows
    assert measured.kl != proxy.kl
    args = ["sensitivity", "--model", "tiny-random-llama", "--dataset", corpus, "--eval-seqs", "2", "--calib-seqs",
            "2", "--seq-len", "64", "--bits", "2,4", "--groups", "32", "--formats", "rtn,gptq", "--storage",
            storage]
    assert main(args + ["--sensitivity-method", "measured"]) == 0
    assert "measured 0 in" in capsys.readouterr().out  # all reused
    assert main(args) == 0
    assert "predicted by the proxy 0 in" in capsys.readouterr().out


def test_an_unknown_method_is_refused(corpus):
    with pytest.raises(ValueError, match="unknown sensitivity method 'fisher'; choose one of"):
        MeasureRequest(dataset=corpus, sensitivity_method="fisher", **OPTIONS)
