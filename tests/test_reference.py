"""The compact (top-k) reference: KL by its definition over the top k plus the rest's share (estimated on
words drawn from it, or as one bucket), against full KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluators import Evaluator, LoadedModel, MetricSums, TopKReference, reference_logprobs, reference_nbytes
from evaluators.data import TokenSets
from evaluators.reference import TAIL_SAMPLES
from quant import Policy, QuantSetting

UNIFORM = (QuantSetting("rtn", 2, 64), QuantSetting("rtn", 4, 32), QuantSetting("rtn", 8, None))


def _pair(seed: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.log_softmax(3 * torch.randn(*shape, generator=g), -1)
    q = torch.log_softmax(p + torch.randn(*shape, generator=g), -1)
    return p, q


def _topk_metrics(p: torch.Tensor, q: torch.Tensor, k: int, targets: torch.Tensor, tail: int = 0,
                  first_window: int = 0) -> dict[str, float]:
    ref = TopKReference.from_logprobs(p, k, tail=tail, first_window=first_window)
    arrays = [torch.from_numpy(a) for a in ref.arrays]
    sums = MetricSums()
    sums.add_topk(q, *arrays[:3], targets, *arrays[3:])
    return sums.result()


def _full_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    full = MetricSums()
    full.add(q, p, torch.zeros(p.shape[:2], dtype=torch.long))
    return full.result()["kl"]


def test_the_tails_drawn_words_estimate_its_share_without_bias() -> None:
    p, q = _pair(5, (2, 9, 200))
    targets = torch.zeros(2, 9, dtype=torch.long)
    full, bucket = _full_kl(p, q), _topk_metrics(p, q, 8, targets)["kl"]
    assert bucket < 0.8 * full  # one bucket loses most of this tail's divergence
    draws = [_topk_metrics(p, q, 8, targets, tail=16, first_window=1000 * seed)["kl"] for seed in range(200)]
    assert np.mean(draws) == pytest.approx(full, rel=0.01)  # unbiased: the mean of many draws is the full KL
    assert abs(_topk_metrics(p, q, 8, targets, tail=256)["kl"] - full) < 0.1 * (full - bucket)


def test_topk_kl_is_the_bucketed_definition() -> None:
    p, q = _pair(0, (2, 5, 40))
    k = 7
    idx = p.topk(k, -1).indices
    pk, qk = p.gather(-1, idx).double(), q.gather(-1, idx).double()
    rp, rq = 1 - pk.exp().sum(-1), 1 - qk.exp().sum(-1)
    expected = float(((pk.exp() * (pk - qk)).sum(-1) + rp * (rp.log() - rq.log())).mean())
    out = _topk_metrics(p, q, k, torch.zeros(2, 5, dtype=torch.long))
    assert out["kl"] == pytest.approx(expected, rel=1e-5)
    assert out["logit_err"] == pytest.approx(float((pk - qk).abs().mean()), rel=1e-5)


def test_topk_equals_full_when_k_is_the_vocabulary() -> None:
    p, q = _pair(1, (2, 9, 64))
    targets = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    full = MetricSums()
    full.add(q, p, targets)
    ref = TopKReference.from_logprobs(p, 64)
    assert np.all(np.isneginf(ref.log_rest)) and ref.tail_indices is None  # nothing is left outside
    assert _topk_metrics(p, q, 64, targets, tail=64) == pytest.approx(full.result(), rel=1e-6)


def test_topk_kl_never_exceeds_full_kl_and_grows_with_k() -> None:
    # Merging outcomes into one bucket can only lose information (the log-sum inequality).
    p, q = _pair(3, (2, 9, 64))
    targets = torch.zeros(2, 9, dtype=torch.long)
    full = MetricSums()
    full.add(q, p, targets)
    kls = [_topk_metrics(p, q, k, targets)["kl"] for k in (1, 4, 16, 48, 64)]
    assert kls == sorted(kls) and kls[-1] == pytest.approx(full.result()["kl"], rel=1e-6)
    assert kls[0] < 0.9 * kls[-1]


def test_reference_keeps_full_logprobs_when_k_covers_the_vocabulary(evaluator) -> None:
    # The tiny model's 256 words: top-512 is the full reference (the same figures, the same cost).
    evaluator.restore_float()  # the shared model may be left quantized by the test before
    ref = reference_logprobs(evaluator.model, evaluator.tokens, topk=512)
    assert isinstance(ref, np.ndarray) and np.array_equal(ref, evaluator.reference)


def test_tiny_model_topk_kl_tracks_full_kl(evaluator) -> None:
    # Measured on this model, top-32 of 256 words (14 % of the mass outside): one bucket reads KL 10-16 %
    # below full for 2-, 4- and 8-bit, the 64 drawn words 0.2-0.5 % off.
    evaluator.restore_float()
    drawn = Evaluator(evaluator.loaded, evaluator.tokens, reference_topk=32)
    bucket = Evaluator(evaluator.loaded, evaluator.tokens, reference=TopKReference.from_logprobs(
        torch.from_numpy(evaluator.reference), 32, tail=0))
    names = list(evaluator.matrices)
    for setting in UNIFORM:
        policy = Policy.uniform(names, setting)
        full, part, low = evaluator.evaluate(policy), drawn.evaluate(policy), bucket.evaluate(policy)
        assert part["kl"] == pytest.approx(full["kl"], rel=0.01)
        assert low["kl"] < 0.9 * full["kl"]
        assert part["ppl"] == full["ppl"] and part["top1"] == full["top1"]
    drawn.restore_float()


def test_the_drawn_tail_does_not_depend_on_the_batches(evaluator) -> None:
    evaluator.restore_float()
    one, two = (reference_logprobs(evaluator.model, evaluator.tokens, batch_size=b, topk=32) for b in (1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(one.arrays[3:], two.arrays[3:]))
    assert one.tail_indices.shape == (*one.log_rest.shape, TAIL_SAMPLES)
    # Every drawn word is outside its position's top k.
    assert not (one.tail_indices[..., :, None] == one.indices[..., None, :]).any()


def test_the_reference_is_full_unless_it_would_be_large_or_topk_is_asked() -> None:
    from evaluators.reference import AUTO_TOPK, FULL_REFERENCE_LIMIT, resolve_topk

    assert resolve_topk(None, 8, 255, 49_152) is None  # SmolLM2: 401 MB full
    assert reference_nbytes(8, 255, 128_256, None) > FULL_REFERENCE_LIMIT
    assert resolve_topk(None, 8, 255, 128_256) == AUTO_TOPK  # a 128k vocabulary: 1.05 GB full
    assert resolve_topk(0, 8, 1023, 262_144) is None  # asked for full
    assert resolve_topk(128, 8, 255, 256) == 128 and resolve_topk(512, 8, 255, 256) is None  # k < V, or full


def test_reference_bytes_full_and_topk() -> None:
    p = torch.log_softmax(torch.randn(3, 7, 1000), -1)
    ref = TopKReference.from_logprobs(p, 16)
    assert ref.nbytes == reference_nbytes(3, 7, 1000, 16) == 3 * 7 * ((16 + TAIL_SAMPLES) * 8 + 4)
    assert TopKReference.from_logprobs(p, 16, tail=0).nbytes == reference_nbytes(3, 7, 1000, 16, tail=0)
    assert reference_nbytes(3, 7, 1000, None) == reference_nbytes(3, 7, 1000, 1000) == p.numpy().nbytes
    assert ref.shape == (3, 7, 1000) and len(ref) == 3


def _wide_vocab_model(vocab: int) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.3, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    return LoadedModel("wide-vocab", model, lambda text: np.zeros(0, dtype=np.int64), "wide-vocab")


def test_a_262k_vocabulary_model_evaluates_on_the_cpu_with_topk() -> None:
    vocab, windows, seq_len, k = 262_144, 2, 32, 512
    loaded = _wide_vocab_model(vocab)
    rng = np.random.default_rng(0)
    tokens = TokenSets(rng.integers(0, vocab, (windows, seq_len)), np.zeros((0, seq_len), np.int64), "random")
    ev = Evaluator(loaded, tokens, reference_topk=k)
    assert isinstance(ev.reference, TopKReference) and ev.reference.k == k
    full_bytes = reference_nbytes(windows, seq_len - 1, vocab, None)
    assert ev.reference.nbytes == reference_nbytes(windows, seq_len - 1, vocab, k)
    assert full_bytes > 60 * ev.reference.nbytes  # 4V = 1 MiB a position against 8(k + 64) + 4 = 4.5 KiB
    # A real model's 8 x 1,023 positions: 8.6 GB full, 38 MB top-512.
    assert reference_nbytes(8, 1023, vocab, None) > 8.5e9 > 220 * reference_nbytes(8, 1023, vocab, k)
    names = list(ev.matrices)
    kl8 = ev.evaluate(Policy.uniform(names, QuantSetting("rtn", 8, None)))
    kl2 = ev.evaluate(Policy.uniform(names, QuantSetting("rtn", 2, None)))
    assert 0 <= kl8["kl"] < 0.05 < kl2["kl"] and math.isfinite(kl2["ppl"])
    assert kl2["top1"] < kl8["top1"]


def test_the_object_store_shares_a_topk_reference_without_copying(local_ray) -> None:
    ref = TopKReference.from_logprobs(torch.log_softmax(torch.randn(2, 5, 300), -1), 32)
    back = local_ray.get(local_ray.put(ref))
    assert len(back.arrays) == 5
    for a, b in zip(ref.arrays, back.arrays):
        assert np.array_equal(a, b) and not b.flags.writeable  # read-only: a view of the shared memory


def test_rest_mass_is_resolved_when_little_is_left() -> None:
    # Peaked rows: the top-5 hold all but 4e-4 to 4e-8 of the mass, below what 1 - sum(float32) resolves.
    from evaluators.reference import rest_logmass

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 300, generator=g, dtype=torch.float64)
    logits[..., :5] += torch.linspace(12, 22, 12, dtype=torch.float64).reshape(2, 6, 1)
    lp = torch.log_softmax(logits, -1)
    idx = torch.arange(5).expand(2, 6, 5)
    expected = torch.logsumexp(lp[..., 5:], -1)  # float64, summed over the words left out
    assert float(expected.exp().max()) < 1e-3  # every row below the float64 sum's threshold
    got = rest_logmass(lp.float(), idx).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    flat = torch.log_softmax(torch.randn(2, 6, 300, generator=g), -1)
    assert torch.allclose(rest_logmass(flat, idx), torch.logsumexp(flat[..., 5:], -1), atol=1e-6)


def test_search_with_a_topk_reference_measures_with_it_and_resumes_only_with_it(corpus, local_ray, tmp_path,
                                                                                  capsys) -> None:
    from evaluators.context import DataConfig
    from app.cli import main
    from studies import Store

    storage = f"sqlite:///{tmp_path}/k.db"
    argv = ["search", "--model", "tiny-random-llama", "--dataset", corpus, "--seq-len", "64", "--eval-seqs", "4",
            "--calib-seqs", "0", "--budget", "4.5bpw", "--workers", "2", "--trials", "3", "--storage", storage,
            "--study", "k", "--reference-topk", "128", "--device", "cpu"]
    assert main(argv) == 0
    store = Store(storage)
    row = store.get_study("k")
    assert row.provenance["reference_topk"] == 128
    frame = store.trials_frame(row)
    trial = store.trial(row, int(frame[frame["state"] == "complete"]["trial"].iloc[0]))
    loaded, tokens = DataConfig(model="tiny-random-llama", dataset=corpus, seq_len=64, n_eval=4, n_calib=0).load()
    here = Evaluator(loaded, tokens, reference_topk=128).evaluate(Policy.from_dict(trial.policy))
    assert trial.kl == pytest.approx(here["kl"], rel=1e-5)  # the workers measured against top-128
    capsys.readouterr()
    assert main([*argv[:-4], "--reference-topk", "64"]) == 2
    assert "different reference_topk" in capsys.readouterr().err
    # A study recorded before the tail was drawn measured it as one bucket: it resumes only as it was.
    assert row.provenance["reference_tail"] == TAIL_SAMPLES
    from studies.models import StudyRow

    with store.session() as session:
        stored = session.get(StudyRow, row.id)
        stored.provenance = {k: v for k, v in stored.provenance.items() if k != "reference_tail"}
        session.commit()
    assert main([*argv[:argv.index("--trials") + 1], "4", *argv[argv.index("--trials") + 2:]]) == 2
    assert "different reference_tail" in capsys.readouterr().err
