"""``--target``: the runtime a search is for sets its space, refuses what the runtime cannot run up front, ties
what it fuses, and names the file that comes out."""

import json
import re

import pytest

from app.cli import main
from evaluators import UserError
from search.request import MeasureRequest, SearchRequest
from search.space import units_of
from search.targets import TARGETS
from studies import Store


@pytest.mark.parametrize("target, formats, bits, groups", [
    ("turboquant", ["rtn", "gptq+act_order+clip"], [2, 3, 4, 8], [64, 128]),
    ("vllm", ["rtn+symmetric", "gptq+act_order+clip+symmetric"], [4, 8], [64, 128, None]),
])
def test_a_target_sets_the_space_the_user_leaves_open(target, formats, bits, groups) -> None:
    for request in (SearchRequest(target=target, budget="4bpw"), MeasureRequest(target=target)):
        assert (request.formats, request.bits, request.groups) == (formats, bits, groups)
    # What the user gives wins, within what the runtime runs.
    given = SearchRequest(target=target, budget="4bpw", bits=[8], groups=[128])
    assert (given.formats, given.bits, given.groups) == (formats, [8], [128])


def test_the_llamacpp_target_searches_every_gguf_block_type_and_a_16_bit_cache() -> None:
    from quant.gguf import BLOCK_TYPES

    request = SearchRequest(target="llamacpp", budget="1MB", context=64)
    assert set(request.formats) == set(BLOCK_TYPES) | {f"{t}+act_order+gptq" for t in BLOCK_TYPES}
    assert request.kv_formats == ["float"]  # counted in the budget at 16 bits, not searched


@pytest.mark.parametrize("target, options, reason", [
    ("vllm", {"formats": ["rtn"]}, "float offset per group"),
    ("vllm", {"formats": ["turbo"], "groups": [64]}, "format turbo (vLLM's integer kernels"),
    ("vllm", {"bits": [3, 4]}, "3-bit weights"),
    ("vllm", {"groups": [256]}, "group size 256"),
    ("vllm", {"granularity": "matrix"}, "--granularity matrix"),
    ("llamacpp", {"formats": ["rtn"]}, "format rtn (not a GGUF block type)"),
    ("llamacpp", {"context": 64, "budget": "1MB", "kv_formats": ["turbo"]}, "KV cache format turbo"),
])
def test_what_the_runtime_cannot_run_is_refused_up_front(target, options, reason, capsys) -> None:
    options = {"budget": "4bpw", **options}
    with pytest.raises(ValueError, match=f"--target {target} cannot run: .*{re.escape(reason)}"):
        SearchRequest(target=target, **options)
    # The command line says the same in one line and exits 2, before loading anything.
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in options.items()]
    assert main(["search", "--target", target, "--model", "tiny-random-llama", *flags]) == 2
    assert f"--target {target} cannot run" in capsys.readouterr().err


def test_fused_granularity_ties_what_the_serving_engine_fuses() -> None:
    names = [f"model.layers.0.self_attn.{m}_proj" for m in "qkvo"] + [
        f"model.layers.0.mlp.{m}_proj" for m in ("gate", "up", "down")] + ["lm_head"]
    units = units_of(dict.fromkeys(names, (8, 8)), "fused")
    assert units == {"model.layers.0.self_attn.qkv_proj": names[:3], "model.layers.0.self_attn.o_proj": [names[3]],
                     "model.layers.0.mlp.gate_up_proj": names[4:6], "model.layers.0.mlp.down_proj": [names[6]],
                     "lm_head": ["lm_head"]}


@pytest.fixture(scope="module")
def vllm_study(tmp_path_factory, corpus, local_ray):
    storage = f"sqlite:///{tmp_path_factory.mktemp('db') / 'v.db'}"
    args = ["search", "--target", "vllm", "--granularity", "fused", "--model", "tiny-random-llama", "--dataset",
            corpus, "--seq-len", "64", "--eval-seqs", "2", "--calib-seqs", "2", "--budget", "7bpw", "--workers", "2",
            "--storage", storage, "--study", "v", "--trials", "8"]
    return storage, args


def test_a_vllm_search_proposes_only_what_vllm_runs_and_exports_what_it_prints(vllm_study, capsys, tmp_path) -> None:
    storage, args = vllm_study
    assert main(args) == 0
    printed = capsys.readouterr().out
    store = Store(storage)
    row = store.get_study("v")
    assert row.space["target"] == "vllm"
    frame = store.trials_frame(row)
    done = frame[frame["state"] == "complete"]
    assert len(done) == 8
    for trial in done["trial"]:
        matrices = store.trial(row, int(trial)).policy["matrices"]
        for name, s in matrices.items():
            assert s["format"] in ("rtn", "gptq") and s["options"].get("symmetric") is True, (name, s)
            assert s["bits"] in (4, 8) and s["group_size"] in (64, 128, None), (name, s)
        fused = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
        for layer in {n.rsplit(".", 2)[0] for n in matrices if ".layers." in n}:  # q/k/v and gate/up tied
            for tied in fused:
                settings = [[matrices[f"{layer}.{m}"][k] for k in ("format", "bits", "group_size", "options")]
                            for m in tied]
                assert all(s == settings[0] for s in settings), (layer, tied)
    assert "searched for --target vllm" in printed
    command = printed.split("searched for --target vllm")[1].splitlines()[1].split()
    assert command[:2] == ["turboquant", "export"] and "--format" in command
    # The printed command, as the user would run it (into a folder of our own): the study's best point becomes a
    # compressed-tensors folder, refused nothing (tests/test_compressed_tensors.py: loaded bit for bit).
    out = tmp_path / "ct"
    assert main(command[1:command.index("--out")] + ["--storage", storage, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["config_groups"]


def test_vllm_leaves_out_the_groups_that_would_pad_a_row() -> None:
    matrices = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (576, 1536)}
    space = SearchRequest(target="vllm", budget="5bpw").space(matrices)
    assert space.groups == (64, None)  # 576 = 4.5 x 128
    with pytest.raises(UserError, match="add --groups ch"):
        SearchRequest(target="vllm", budget="5bpw", groups=[128]).space(matrices)


def test_every_target_exports_through_a_registered_exporter() -> None:
    from search.exporters import EXPORTERS

    assert {t.export for t in TARGETS.values()} <= set(EXPORTERS)
