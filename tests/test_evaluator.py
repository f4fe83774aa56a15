import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import quant
from evaluators import MetricSums, UserError, load_model, make_token_sets
from quant import Policy, QuantSetting


def test_kl_of_identical_distributions_is_zero_and_uniform_ppl_is_vocab() -> None:
    logits = torch.zeros(2, 5, 17)
    lp = torch.log_softmax(logits, -1)
    sums = MetricSums()
    sums.add(lp, lp, torch.randint(0, 17, (2, 5)))
    out = sums.result()
    assert out["kl"] == 0.0 and out["top1"] == 1.0 and out["logit_err"] == 0.0
    assert math.isclose(out["ppl"], 17.0, rel_tol=1e-6)


def test_kl_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(1, 3, 5, generator=g), -1)
    q = torch.log_softmax(torch.randn(1, 3, 5, generator=g), -1)
    sums = MetricSums()
    sums.add(q, p, torch.zeros(1, 3, dtype=torch.long))
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert math.isclose(sums.result()["kl"], expected, rel_tol=1e-6)


def test_metrics_match_their_definitions_with_and_without_the_kept_reference_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.log_softmax(3 * torch.randn(2, 7, 11, generator=g), -1)
    q = torch.log_softmax(p + torch.randn(2, 7, 11, generator=g), -1)
    t = torch.randint(0, 11, (2, 7), generator=g)
    plain, kept = MetricSums(), MetricSums()
    plain.add(q, p, t)
    kept.add(q, p, t, ref_top=p.argmax(-1))
    expected = {"kl": float((p.exp() * (p - q)).sum(-1).mean()), "ppl": math.exp(-float(q.gather(-1, t[..., None]).mean())),
                "top1": float((q.argmax(-1) == p.argmax(-1)).float().mean()), "logit_err": float((p - q).abs().mean())}
    for out in (plain.result(), kept.result()):
        assert out == pytest.approx(expected, rel=1e-5)
    assert 0 < expected["top1"] < 1


def test_eight_bit_is_near_lossless_and_two_bit_is_not(evaluator) -> None:
    names = list(evaluator.matrices)
    kl8 = evaluator.evaluate(Policy.uniform(names, QuantSetting("rtn", 8, None)))["kl"]
    kl4 = evaluator.evaluate(Policy.uniform(names, QuantSetting("rtn", 4, 32)))["kl"]
    kl2 = evaluator.evaluate(Policy.uniform(names, QuantSetting("rtn", 2, 64)))["kl"]
    assert kl8 < 0.01
    assert kl2 > 50 * kl8 and kl2 > kl4 > kl8


def test_bytes_reported_are_the_packed_buffers(evaluator) -> None:
    names = list(evaluator.matrices)
    policy = Policy.uniform(names, QuantSetting("rtn", 3, 64))
    result = evaluator.evaluate(policy)
    assert result["bytes"] == policy.expected_nbytes(evaluator.matrices)
    assert math.isclose(result["bpw"], 3.5)


def test_token_sets_are_disjoint_and_fixed_by_seed(corpus) -> None:
    loaded = load_model("tiny-random-llama")
    text = open(corpus).read()
    a = make_token_sets(loaded, text, seq_len=64, n_eval=4, n_calib=6, seed=1)
    b = make_token_sets(loaded, text, seq_len=64, n_eval=4, n_calib=6, seed=1)
    c = make_token_sets(loaded, text, seq_len=64, n_eval=4, n_calib=6, seed=2)
    assert np.array_equal(a.eval, b.eval) and a.fingerprint == b.fingerprint != c.fingerprint
    eval_rows = {r.tobytes() for r in a.eval}
    assert not eval_rows & {r.tobytes() for r in a.calib}


def _word_level_model(folder: Path, adds_bos: bool) -> Path:
    """A local model folder: a tiny Llama and a word-level tokenizer that puts <s> (id 1) before a text or not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.conftest import WORDS

    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("adds_bos", [True, False])
def test_windows_start_as_the_tokenizer_starts_a_text(tmp_path, corpus, adds_bos: bool) -> None:
    loaded = load_model(str(_word_level_model(tmp_path, adds_bos)))
    assert loaded.bos_token_id == (1 if adds_bos else None)
    text = open(corpus).read().lower()
    sets = make_token_sets(loaded, text, seq_len=32, n_eval=3, n_calib=2, seed=0)
    plain = make_token_sets(replace(loaded, bos_token_id=None), text, seq_len=32, n_eval=3, n_calib=2, seed=0)
    assert sets.bos_token_id == loaded.bos_token_id and not (plain.eval[:, 0] == 1).any()
    if adds_bos:  # the first token of every window replaced by BOS (llama-perplexity's chunks), and recorded
        assert (sets.eval[:, 0] == 1).all() and (sets.calib[:, 0] == 1).all()
        assert np.array_equal(sets.eval[:, 1:], plain.eval[:, 1:]) and sets.fingerprint != plain.fingerprint
    else:  # windows, and so fingerprints, as before
        assert np.array_equal(sets.eval, plain.eval) and sets.fingerprint == plain.fingerprint


def test_too_small_dataset_is_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="dataset too small"):
        make_token_sets(load_model("tiny-random-llama"), "tiny text", seq_len=64, n_eval=4)


def test_unknown_model_alias_is_refused() -> None:
    with pytest.raises(UserError, match="unknown model 'smollm9'"):
        load_model("smollm9")


def test_a_trial_swaps_only_the_matrices_that_changed(evaluator) -> None:
    """Trial cost: kept matrices keep their packed tensor and decoded weight; only the changed one is
    re-quantized and re-decoded, and the metrics equal those of a fresh application."""
    names = [n for n in evaluator.matrices if n != "model.embed_tokens"]
    base = {n: quant.QuantSetting("rtn", 4, 32) for n in evaluator.matrices}
    evaluator.evaluate(quant.Policy(base))
    modules = dict(evaluator.model.named_modules())
    dense = {n: modules[n].weight for n in names}
    assert all(isinstance(modules[n], quant.QuantLinear) for n in names)
    misses = evaluator.cache.misses
    changed = names[1]
    other = quant.QuantSetting("rtn", 7, 128)  # a setting no other test quantizes with
    r = evaluator.evaluate(quant.Policy({**base, changed: other}))
    assert evaluator.cache.misses == misses + 1  # one matrix quantized, the rest from the cache
    modules = dict(evaluator.model.named_modules())
    for n, d in dense.items():
        assert (modules[n].weight is d) == (n != changed)
    evaluator.restore_float()
    fresh = evaluator.evaluate(quant.Policy({**base, changed: other}))
    assert r["kl"] == pytest.approx(fresh["kl"], rel=1e-6) and r["bytes"] == fresh["bytes"]


def test_gptq_is_calibrated_on_the_calibration_windows_and_beats_rtn(data_config) -> None:
    from dataclasses import replace

    from evaluators import Evaluator

    loaded, tokens = data_config.load()
    ev = Evaluator(loaded, tokens)
    rtn = ev.evaluate(quant.Policy.uniform(list(ev.matrices), quant.QuantSetting("rtn", 3, 32)))
    assert ev.hessians is None  # nothing collected for formats that take no data
    gptq = ev.evaluate(quant.Policy.uniform(list(ev.matrices), quant.QuantSetting("gptq", 3, 32)))
    # One Hessian per linear matrix (this model's embedding is untied: a lookup, no inputs to weigh).
    assert set(ev.hessians) == set(ev.matrices) - {"model.embed_tokens"} and gptq["bytes"] == rtn["bytes"]
    assert gptq["kl"] < rtn["kl"]
    # Without calibration windows gptq falls back to the identity Hessian: rtn, bit for bit.
    loaded0, tokens0 = replace(data_config, n_calib=0).load()
    ev0 = Evaluator(loaded0, tokens0)
    data_free = ev0.evaluate(quant.Policy.uniform(list(ev0.matrices), quant.QuantSetting("gptq", 3, 32)))
    assert ev0.hessians == {} and data_free["kl"] == rtn["kl"]


def test_gptq_gives_the_same_codes_on_any_thread_count() -> None:
    # apply (any thread count) must re-create the codes a 1-thread search worker measured; the
    # column loop's products split differently on 2 threads (6 of 7 SmolLM2 matrices differed).
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=g)
    x = torch.randn(2048, 576, generator=g) @ torch.randn(576, 576, generator=g)  # correlated inputs
    setting = quant.QuantSetting("gptq", 2, 64, {"clip": True})
    threads = torch.get_num_threads()
    codes = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            codes.append(quant.quantize(weight, setting, hessian=x.T @ x).buffers["codes"])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*codes)
    assert torch.get_num_threads() == threads  # one_thread put the caller's count back
