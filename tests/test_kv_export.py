"""A policy's KV cache settings after the search: the reloaded checkpoint measures them as the policy
did, and the llama.cpp exports name the nearest global cache types and what they lose."""

from __future__ import annotations

import json

import pytest
import torch

import quant
from evaluators.checkpoint import evaluate_checkpoint
from evaluators.kv_attention import attention_modules
from quant import KVSetting, Policy, QuantSetting
from quant.kv import FLOAT_KV, layer_kv_bytes
from app.cli import main
from studies import Store
from studies.export_runtimes import export_runtime
from studies.llamacpp_kv import llamacpp_cache_types
from tests.test_export_runtimes import _doc

TURBO4 = {"format": "turbo", "bits": 4, "qjl": False, "group": None}


@pytest.fixture(scope="module")
def kv_policy(tmp_path_factory, data_config, evaluator) -> tuple[str, str, dict]:
    """A tiny-model policy with mixed KV settings (one layer per-channel keys over whole groups of 32
    tokens of the 64-token windows), its JSON file and the checkpoint `turboquant apply` wrote of it."""
    names = list(attention_modules(evaluator.model))
    kv = {names[0]: (KVSetting("turbo", 3, qjl=True), KVSetting("turbo", 3)),
          names[1]: (KVSetting("rtn_channel", 2, group=32), KVSetting("rtn_token", 4))}
    folder = tmp_path_factory.mktemp("kvckpt")
    policy = Policy({n: QuantSetting("rtn", 4, 32) for n in evaluator.matrices},
                    meta={"provenance": data_config.to_dict()}, kv=kv)
    policy.save(folder / "p.json")
    assert main(["apply", str(folder / "p.json"), "--out", str(folder / "ckpt")]) == 0
    return str(folder / "p.json"), str(folder / "ckpt"), kv


def _eval_json(target: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", target, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_the_checkpoint_measures_its_kv_cache_as_eval_of_the_policy(kv_policy, evaluator, capsys) -> None:
    path, ckpt, kv = kv_policy
    of_policy, of_ckpt = _eval_json(path, capsys), _eval_json(ckpt, capsys)
    assert abs(of_ckpt["kl"] - of_policy["kl"]) < 1e-5
    assert of_ckpt["bytes"] == of_policy["bytes"]
    infos, tokens = attention_modules(evaluator.model), evaluator.tokens.seq_len
    expected = sum(layer_kv_bytes(infos[n], kv.get(n, (FLOAT_KV, FLOAT_KV)), tokens) for n in infos)
    assert of_ckpt["kv_bytes"] == of_policy["kv_bytes"] == expected
    assert of_ckpt["kv_bits"] == of_policy["kv_bits"] == pytest.approx(
        8 * expected / sum(2 * i.kv_heads * i.head_dim * tokens for i in infos.values()))
    # The cache is really quantized there: the same weights with a float cache measure otherwise.
    weights_only = Policy.load(path)
    weights_only.kv = {}
    assert abs(evaluator.evaluate(weights_only)["kl"] - of_ckpt["kl"]) > 1e-3
    capsys.readouterr()
    assert main(["eval", path]) == 0
    printed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert float(printed["kv_bits"]) == pytest.approx(of_policy["kv_bits"], rel=1e-5)
    assert float(printed["kv_bytes"]) == expected


def test_the_reloaded_checkpoint_keeps_its_kv_installed_and_generates_from_a_packed_cache(kv_policy) -> None:
    _, ckpt_dir, kv = kv_policy
    result, ckpt = evaluate_checkpoint(ckpt_dir)
    assert ckpt.policy.kv == kv and "kv_bytes" in result
    reloaded = quant.load_checkpoint(ckpt_dir)  # quant alone: the settings, nothing installed on attention
    assert not reloaded.model.config._attn_implementation.startswith("turboquant")
    cache = reloaded.kv_cache()
    assert [layer.settings for layer in cache.layers] == list(kv.values())
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    with torch.inference_mode():
        out = reloaded.model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache,
                                      max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and cache.get_seq_length() == 8


def _kv(*pairs: tuple[dict, dict]) -> dict:
    return {f"model.layers.{i}.self_attn": {"k": k, "v": v} for i, (k, v) in enumerate(pairs)}


def test_uniform_settings_map_to_their_width_and_say_what_the_format_loses() -> None:
    turbo = llamacpp_cache_types({"kv": _kv((TURBO4, TURBO4), (TURBO4, TURBO4))})
    assert (turbo.k, turbo.v) == ("q4_0", "q4_0")
    assert turbo.flags == ["--cache-type-k", "q4_0", "--cache-type-v", "q4_0"]
    assert len(turbo.notes) == 2 and all("no rotated Lloyd-Max codebook" in n for n in turbo.notes)
    assert not any("collapse" in n or "bits ->" in n for n in turbo.notes)
    fp = {"format": "float", "bits": 16}
    plain = llamacpp_cache_types({"kv": _kv((fp, fp))})
    assert (plain.k, plain.v, plain.notes) == ("f16", "f16", [])
    eight = llamacpp_cache_types({"kv": _kv(({"format": "rtn_token", "bits": 8}, {"format": "turbo", "bits": 8}))})
    assert (eight.k, eight.v) == ("q8_0", "q8_0") and "symmetric scale" in eight.notes[0]
    assert llamacpp_cache_types({"matrices": {}}) is None and llamacpp_cache_types({"kv": {}}) is None


@pytest.mark.parametrize("bits, expected", [((3, 4), "q4_0"), ((2, 3), "q4_0"), ((2, 8), "q5_0"), ((4, 8), "q5_0"),
                                            ((8, 8), "q8_0"), ((4, 16), "q8_0"), ((8, 16), "f16")])
def test_per_layer_settings_collapse_to_the_type_nearest_their_mean_bits(bits: tuple[int, int], expected: str) -> None:
    setting = lambda b: {"format": "float", "bits": 16} if b == 16 else {"format": "rtn_token", "bits": b}  # noqa: E731
    out = llamacpp_cache_types({"kv": _kv(*((setting(b), setting(b)) for b in bits))})
    assert out.k == out.v == expected  # ties ((8, 16): 12) go to the wider type
    mean = sum(bits) / 2
    assert sum(f"collapse to one llama.cpp type for every layer: mean {mean:.3g} bits -> {expected}" in n
               for n in out.notes) == (2 if bits[0] != bits[1] else 0)


def test_per_channel_keys_qjl_and_layers_the_kv_section_leaves_float_are_said() -> None:
    channel = {"format": "rtn_channel", "bits": 2, "qjl": False, "group": 128}
    qjl = {"format": "turbo", "bits": 3, "qjl": True, "group": None}
    doc = {"kv": _kv((channel, TURBO4), (qjl, TURBO4)),
           "matrices": {f"model.layers.{i}.mlp.up_proj": {} for i in range(3)}}  # layer 2: a float cache
    out = llamacpp_cache_types(doc)
    assert (out.k, out.v) == ("q8_0", "q8_0")  # keys (2 + 3 + 16) / 3 = 7 bits, values (4 + 4 + 16) / 3 = 8
    text = "\n".join(out.notes)
    assert "rtn_channel2g128 x1, turbo3qjl x1, float16 x1" in text and "mean 7 bits -> q8_0" in text
    assert "KV keys rtn_channel2g128 (1 layer) -> q8_0: no per-channel key scales (KIVI)" in text
    assert "the QJL residual sketch is dropped; 3 bits -> 8" in text
    assert "KV values float16 (1 layer) -> q8_0: 16 bits -> 8" in text
    cuda = llamacpp_cache_types({"kv": _kv((TURBO4, {"format": "turbo", "bits": 8}))})
    assert (cuda.k, cuda.v) == ("q4_0", "q8_0") and "q4_0-q8_0 runs the f16 kernel" in cuda.notes[-1]
    with pytest.raises(ValueError, match="kv module 'model.layers.0.self_attn': an entry is"):
        llamacpp_cache_types({"kv": {"model.layers.0.self_attn": {"k": TURBO4}}})


def test_the_llamacpp_export_carries_the_cache_flags_and_other_runtimes_say_they_drop_the_cache() -> None:
    doc = _doc()
    with_kv = {**doc, "kv": _kv((TURBO4, TURBO4), (TURBO4, TURBO4))}
    plain, out = export_runtime(doc, "llamacpp"), export_runtime(with_kv, "llamacpp")
    assert out.text == plain.text and plain.flags == []  # the tensor-type file holds weights only
    assert out.flags == ["--cache-type-k", "q4_0", "--cache-type-v", "q4_0"]
    assert out.approximations[:len(plain.approximations)] == plain.approximations
    assert out.approximations[len(plain.approximations):] == llamacpp_cache_types(with_kv).notes
    for fmt in ("gptqmodel", "torchao"):
        assert export_runtime(with_kv, fmt).approximations[-1].startswith("the policy's KV cache settings have no")
        assert not any("KV" in n for n in export_runtime(doc, fmt).approximations)


def test_cli_export_prints_the_flags_to_run_llamacpp_with(tmp_path, capsys, monkeypatch) -> None:
    doc = {**_doc(), "kv": _kv((TURBO4, TURBO4), (TURBO4, TURBO4))}
    monkeypatch.setattr("studies.export_policy", lambda store, name, trial=None, budget_bytes=None: doc)
    out = tmp_path / "types.txt"
    Store(f"sqlite:///{tmp_path}/e.db")  # an existing database (the export only reads; the study is stubbed)
    assert main(["export", "s", "--storage", f"sqlite:///{tmp_path}/e.db", "--trial", "3", "--format", "llamacpp",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "run it with llama-cli / llama-server --cache-type-k q4_0 --cache-type-v q4_0" in printed
    assert "~ KV keys turbo4 (2 layers) -> q4_0" in printed and "cache-type" not in out.read_text()


def test_the_gguf_export_prints_the_flags_beside_the_file(tmp_path, monkeypatch, evaluator) -> None:
    import evaluators.checkpoint
    import search.exporters.gguf as gguf_export
    from search.exporters import ExportOptions

    names = list(attention_modules(evaluator.model))
    settings = {n: QuantSetting.from_dict({"format": "q8_0"}) for n in evaluator.matrices}
    policy = Policy(settings, meta={"provenance": {"trial": 1, "model": "tiny-random-llama"},
                                    "metrics": {"kl": 0.01, "bytes": 1000}},
                    kv={n: (KVSetting("turbo", 3), KVSetting("rtn_token", 8)) for n in names})
    doc = policy.to_dict()
    # llama.cpp needs a GGUF of the model (the slow tests build it): here the file's writing is stubbed.
    monkeypatch.setattr(evaluators.checkpoint, "pack_policy", lambda p, label, remap=None, trust_remote_code=False: (evaluator.loaded, {}, {}))
    monkeypatch.setattr("evaluators.llamacpp.source_gguf", lambda name: tmp_path / "source.gguf")
    monkeypatch.setattr(gguf_export, "write_gguf", lambda *a, **k: [])
    exported = gguf_export.GGUF().write(doc, tmp_path / "m.gguf", ExportOptions())
    assert exported.flags == ["--cache-type-k", "q4_0", "--cache-type-v", "q8_0"] and len(exported.approximations) == 3
    printed = "\n".join(exported.lines)
    assert "run it with llama-cli / llama-server --cache-type-k q4_0 --cache-type-v q8_0 (3 approximation(s)" in printed
    assert "~ KV keys turbo3 (2 layers) -> q4_0: no rotated Lloyd-Max codebook" in printed
    mapped, _ = gguf_export.nearest_gguf(policy, {})
    assert mapped.kv == policy.kv  # --nearest changes weights only
