"""The quantized KV cache: settings, packed bytes, the attention hook, policies and the evaluator."""

from __future__ import annotations

import json

import pytest
import torch

import quant
from evaluators import kv_attention
from evaluators.kv_attention import attention_modules, install_kv, kv_installed, remove_kv
from quant import KVSetting, Policy, QuantSetting, kv_bytes, kv_settings, pack_kv, quantize_kv, unpack_kv
from quant.formats.turbo import lloyd_max_gaussian
from quant.kv import FLOAT_KV, AttentionInfo, layer_kv_bytes
from quant.kv_cache import packed_cache
from quant.packing import packed_size
from tests.test_architectures import ARCHS, _ids, _logits, _model

ALL = sorted({s for role in "kv" for s in kv_settings(role)}, key=KVSetting.key)
QUANTIZED = [s for s in ALL if not s.is_float]


def _x(shape: tuple[int, int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad, says", [
    (dict(format="int4", bits=4), "KV format must be one of"),
    (dict(format="turbo", bits=5), "KV bits must be one of"),
    (dict(format="turbo", bits=16), "bits 16 means an unquantized cache"),
    (dict(format="float", bits=8), "bits 16 means an unquantized cache"),
    (dict(format="rtn_token", bits=4, qjl=True), "qjl is a residual of the turbo codebook"),
    (dict(format="rtn_channel", bits=4, group=100), "must be one of (32, 64, 128, 256)"),
    (dict(format="turbo", bits=4, group=128), "group (tokens per scale) is for rtn_channel only"),
])
def test_a_bad_setting_is_refused_saying_what_is_allowed(bad: dict, says: str) -> None:
    with pytest.raises(ValueError) as err:
        KVSetting(**bad)
    assert says in str(err.value)


def test_settings_round_trip_through_json_and_keys_tell_them_apart() -> None:
    for s in ALL:
        assert KVSetting.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert len({s.key() for s in ALL}) == len({s.describe() for s in ALL}) == len(ALL)
    assert KVSetting("rtn_channel", 2).group == 128  # the default, written out
    with pytest.raises(ValueError, match="unknown KV setting keys"):
        KVSetting.from_dict({"format": "turbo", "bits": 4, "seed": 1})
    with pytest.raises(ValueError, match="qjl is for keys only"):
        quant.kv.check_pair(FLOAT_KV, KVSetting("turbo", 3, qjl=True))
    assert [s for s in kv_settings("v") if s.qjl or s.format == "rtn_channel"] == []


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 2, 37, 16), (1, 1, 300, 128), (2, 4, 5, 80)])
@pytest.mark.parametrize("setting", QUANTIZED, ids=KVSetting.describe)
def test_bytes_are_the_packed_buffers_and_unpacking_is_what_evaluation_reads(setting: KVSetting, shape) -> None:
    x = _x(shape)
    half = pack_kv(x.half(), setting)  # a 16-bit model's cache: its residual is counted at 2 bytes
    assert half.nbytes == sum(b.numel() * b.element_size() for b in half.buffers.values())
    assert half.nbytes == kv_bytes(setting, shape[1], shape[3], shape[2], batch=shape[0])
    packed = pack_kv(x, setting)
    if setting.format == "rtn_channel":  # whole groups of tokens packed, the rest kept as it came
        quantized = shape[2] // setting.group * setting.group
        assert packed.residual is None if quantized == shape[2] else torch.equal(packed.residual, x[:, :, quantized:])
    if packed.packed is not None:
        codes, bits = packed.buffers["codes"], packed.packed.setting.bits
        assert codes.dtype == torch.uint8 and codes.numel() == packed_size(codes.numel() * 8 // bits, bits)
    y = unpack_kv(packed)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.is_contiguous()  # attention kernels read (tokens, dims) rows: SDPA on the CPU is 4x slower otherwise
    assert torch.equal(y, quantize_kv(x, setting))
    assert torch.equal(y, x) == (packed.packed is None)  # nothing quantized only while no group is whole


def test_bytes_per_token_are_the_layouts_known_sizes() -> None:
    # SmolLM2: 3 KV heads x 64 dims, at 8192 tokens; the 189 MB of fp16 over 30 layers x (k, v).
    h, d, t = 3, 64, 8192
    assert 30 * 2 * kv_bytes(FLOAT_KV, h, d, t) == 188_743_680
    assert kv_bytes(KVSetting("turbo", 3), h, d, t) == t * h * (64 * 3 // 8 + 2)  # codes + fp16 scale per vector
    assert kv_bytes(KVSetting("turbo", 3, qjl=True), h, d, t) == t * h * (64 * 2 // 8 + 2 + 64 // 8 + 2)
    assert kv_bytes(KVSetting("rtn_token", 4), h, d, t) == t * h * (32 + 4)  # fp16 scale and offset per vector
    assert kv_bytes(KVSetting("rtn_channel", 2, group=32), h, d, t) == h * d * (t // 32) * (8 + 4)
    # A partial last group of tokens is KIVI's 16-bit residual: 130 tokens hold a group of 128 and 2 tokens.
    assert kv_bytes(KVSetting("rtn_channel", 4), h, d, 130) == kv_bytes(KVSetting("rtn_channel", 4), h, d, 128) + 2 * h * d * 2
    assert kv_bytes(KVSetting("rtn_channel", 4), h, d, 100) == kv_bytes(FLOAT_KV, h, d, 100)
    info = AttentionInfo(h, d, sliding_window=512)
    assert layer_kv_bytes(info, (FLOAT_KV, FLOAT_KV), t) == 2 * kv_bytes(FLOAT_KV, h, d, 512)
    x = _x((1, h, 16, d)).half()  # a float cache holds the model's 16-bit tensor itself
    assert pack_kv(x, FLOAT_KV).nbytes == kv_bytes(FLOAT_KV, h, d, 16) and torch.equal(unpack_kv(pack_kv(x, FLOAT_KV)), x)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turbo_reaches_the_lloyd_max_distortion_and_qjl_unbiases_inner_products(bits: int) -> None:
    k = _x((1, 1, 16384, 64))
    q = _x((16384, 64), seed=1)
    ip = (q * k[0, 0]).sum(-1)

    def slope(s: KVSetting) -> float:  # least-squares slope of <q, k_hat> on <q, k>
        return float((ip * (q * quantize_kv(k, s)[0, 0]).sum(-1)).sum() / (ip * ip).sum())

    mse = float(((quantize_kv(k, KVSetting("turbo", bits)) - k) ** 2).sum() / (k ** 2).sum())
    assert mse == pytest.approx(lloyd_max_gaussian(bits)[1], rel=0.05)
    assert slope(KVSetting("turbo", bits)) == pytest.approx(1 - mse, abs=0.01)  # MSE codebooks shrink
    assert slope(KVSetting("turbo", bits, qjl=True)) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "gpt2"])
def test_float_kv_is_exact_and_quantized_kv_changes_logits_on_every_architecture(arch: str) -> None:
    model, ids = _model(arch), _ids()
    reference = _logits(model, ids)
    infos = attention_modules(model)
    assert len(infos) == 2 and all(i.head_dim == 16 for i in infos.values())
    with kv_installed(model, {name: (FLOAT_KV, FLOAT_KV) for name in infos}):
        assert model.config._attn_implementation.startswith(kv_attention.PREFIX)
        assert torch.equal(_logits(model, ids), reference)
    with kv_installed(model, {name: (KVSetting("turbo", 2), KVSetting("rtn_token", 2)) for name in infos}):
        assert (_logits(model, ids) - reference).abs().max() > 0.1
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, ids), reference)


def test_eager_attention_gets_the_models_own_eager_function() -> None:
    config_class, model_class, kwargs = ARCHS["gemma3"]  # softcapping and sliding windows in its own eager
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs, attn_implementation="eager")).eval()
    ids = _ids()
    reference = _logits(model, ids)
    infos = attention_modules(model)
    assert {i.sliding_window for i in infos.values()} == {8}
    with kv_installed(model, {name: (FLOAT_KV, FLOAT_KV) for name in infos}):
        assert torch.equal(_logits(model, ids), reference)
    assert model.config._attn_implementation == "eager"


def test_the_hook_quantizes_each_named_modules_cache_tensors_with_its_own_setting(monkeypatch) -> None:
    model, ids = _model("llama"), _ids(n=2, length=40)
    seen: list[tuple[tuple[int, ...], KVSetting]] = []

    def spy(x: torch.Tensor, setting: KVSetting) -> torch.Tensor:
        seen.append((tuple(x.shape), setting))
        return quantize_kv(x, setting)

    monkeypatch.setattr(kv_attention, "quantize_kv", spy)
    k, v = KVSetting("rtn_channel", 3, group=32), KVSetting("turbo", 4)
    with kv_installed(model, {"model.layers.1.self_attn": (k, v)}):
        _logits(model, ids)
    assert seen == [((2, 2, 40, 16), k), ((2, 2, 40, 16), v)]  # (batch, kv heads, tokens, head dim); layer 0 untouched


def test_install_refuses_names_that_are_not_attention_modules() -> None:
    model = _model("llama")
    with pytest.raises(ValueError, match="not a module of the model"):
        install_kv(model, {"model.layers.9.self_attn": (FLOAT_KV, FLOAT_KV)})
    with pytest.raises(ValueError, match="not attention modules"):
        install_kv(model, {"model.layers.0.mlp": (FLOAT_KV, FLOAT_KV)})
    with pytest.raises(ValueError, match="qjl is for keys only"):
        install_kv(model, {"model.layers.0.self_attn": (FLOAT_KV, KVSetting("turbo", 3, qjl=True))})
    assert model.config._attn_implementation == "sdpa"
    remove_kv(model)  # nothing installed: a no-op


def _policy(evaluator, kv: dict) -> Policy:
    return Policy({n: QuantSetting("rtn", 8, None) for n in evaluator.matrices}, kv=kv)


def test_the_evaluator_with_16_bit_kv_reproduces_the_kl_bit_for_bit(evaluator) -> None:
    names = list(attention_modules(evaluator.model))
    plain = evaluator.evaluate(_policy(evaluator, {}))
    with_kv = evaluator.evaluate(_policy(evaluator, {n: (FLOAT_KV, FLOAT_KV) for n in names}))
    assert "kv_bytes" not in plain
    for metric in ("kl", "ppl", "top1"):
        assert with_kv[metric] == plain[metric]
    assert with_kv["bytes"] == plain["bytes"] and with_kv["kv_bits"] == 16.0
    partial = evaluator.evaluate_partial({}, kv={n: (FLOAT_KV, FLOAT_KV) for n in names})
    assert partial["kl"] == 0.0  # float weights, float cache: the reference itself


def test_the_evaluator_measures_8_bit_kv_as_near_lossless_and_counts_its_bytes(evaluator) -> None:
    infos = attention_modules(evaluator.model)
    s8, s2 = KVSetting("rtn_token", 8), KVSetting("turbo", 2)
    eight = evaluator.evaluate_partial({}, kv={n: (s8, s8) for n in infos})
    two = evaluator.evaluate_partial({}, kv={n: (s2, s2) for n in infos})
    assert 0 < eight["kl"] < 0.01 and two["kl"] > 10 * eight["kl"]
    tokens = evaluator.tokens.eval.shape[1]
    expected = sum(2 * kv_bytes(s8, i.kv_heads, i.head_dim, tokens) for i in infos.values())
    assert eight["kv_bytes"] == expected and eight["kv_bytes_per_token"] == expected / tokens
    assert evaluator.evaluate_partial({})["kl"] == 0.0  # no kv settings: the hook is gone


def test_a_policy_keeps_its_kv_section_through_json_and_a_checkpoint(tmp_path, evaluator) -> None:
    kv = {"model.layers.0.self_attn": (KVSetting("turbo", 3, qjl=True), KVSetting("turbo", 3)),
          "model.layers.1.self_attn": (KVSetting("rtn_channel", 2, group=32), KVSetting("rtn_token", 4))}
    policy = _policy(evaluator, kv)
    doc = policy.to_dict()
    assert doc["kv"]["model.layers.1.self_attn"]["k"] == {"format": "rtn_channel", "bits": 2, "qjl": False, "group": 32}
    assert "kv" not in _policy(evaluator, {}).to_dict()
    policy.save(tmp_path / "p.json")
    loaded = Policy.load(tmp_path / "p.json")
    assert loaded.kv == kv and "kv" not in loaded.meta
    doc["kv"]["model.layers.0.self_attn"]["v"]["qjl"] = True
    with pytest.raises(quant.PolicyError, match="kv module 'model.layers.0.self_attn': qjl is for keys only"):
        Policy.from_dict(doc)
    model = _model("llama")
    names = {n: QuantSetting("rtn", 4, None) for n in quant.weight_matrices(model)}
    policy = Policy(names, kv={n: pair for n, pair in zip(attention_modules(model), kv.values())})
    quant.apply_policy(model, policy)
    quant.save_checkpoint(model, policy, tmp_path / "ckpt")
    assert quant.load_checkpoint(tmp_path / "ckpt").policy.kv == policy.kv


MIXED_KV = {"model.layers.0.self_attn": (KVSetting("turbo", 3, qjl=True), KVSetting("turbo", 3)),
            "model.layers.1.self_attn": (KVSetting("rtn_channel", 2, group=32), KVSetting("rtn_token", 4))}


def _generate(model, ids: torch.Tensor, new: int, cache=None):
    with torch.inference_mode():  # every token real (the tiny vocabulary's pad id 0 would be masked otherwise)
        return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)


def test_generating_from_the_packed_cache_reads_what_the_evaluation_path_reads() -> None:
    model, ids = _model("llama"), _ids(n=1, length=20)
    cache = packed_cache(model, MIXED_KV)
    out = _generate(model, ids, 16, cache)
    assert cache.get_seq_length() == 35  # crosses a whole group of 32 keys in layer 1
    plain = _generate(model, ids, 16)
    with kv_installed(model, MIXED_KV), torch.inference_mode():
        for step, logits in enumerate(out.logits):  # the evaluation path over the tokens the cache held then
            seen = out.sequences[:, :ids.shape[1] + step]
            expected = model(input_ids=seen, use_cache=False).logits[:, -1]
            assert (logits - expected).abs().max() < 1e-4
            assert (logits - plain.logits[step]).abs().max() > 0.1  # and the cache is not float


def test_the_packed_cache_holds_the_bytes_the_policy_counts() -> None:
    model, ids = _model("llama").half(), _ids(n=2, length=30)  # a 16-bit model: residual tokens take 2 bytes
    cache = packed_cache(model, MIXED_KV)
    _generate(model, ids, 20, cache)
    infos, tokens = attention_modules(model), cache.get_seq_length()
    assert tokens == 49
    assert cache.nbytes == sum(layer_kv_bytes(infos[n], MIXED_KV[n], tokens, batch=2) for n in MIXED_KV)
    float_cache = packed_cache(model, {})
    _generate(model, ids, 20, float_cache)
    assert float_cache.nbytes == sum(layer_kv_bytes(i, (FLOAT_KV, FLOAT_KV), tokens, batch=2) for i in infos.values())
    assert cache.nbytes < float_cache.nbytes / 2  # head_dim 16: turbo pads each head to its group of 32
    with pytest.raises(ValueError, match="not an attention module"):
        packed_cache(model, {"model.layers.0.mlp": (FLOAT_KV, FLOAT_KV)})
