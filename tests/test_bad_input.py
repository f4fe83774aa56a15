"""Bad input at every boundary gets a named error, never a traceback of another type."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluators import UserError, load_corpus, load_model
from quant import Policy, PolicyError
from search.budget import parse_budget

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)
settings_like = st.fixed_dictionaries({}, optional={
    "format": st.sampled_from(["rtn", "turbo", "nope", 3]), "bits": json_values | st.integers(0, 10),
    "group_size": st.sampled_from([None, 32, 48, 64, 0, -1, "64"]), "options": json_values})
policies = st.fixed_dictionaries({}, optional={
    "format_version": st.sampled_from([1, 2, None, "1"]),
    "matrices": st.dictionaries(st.text(max_size=20), settings_like | json_values, max_size=4) | json_values})


@settings(max_examples=300, deadline=None)
@given(doc=policies | json_values)
def test_any_json_is_a_policy_or_a_policy_error(doc) -> None:
    try:
        policy = Policy.from_dict(doc)
    except PolicyError as exc:
        assert str(exc)
        return
    # What was accepted survives a round trip unchanged.
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))).settings == policy.settings


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=12) | st.from_regex(r"[0-9.]{1,5}\s?(bpw|MB|MiB|kb|gb|b|bitz)?", fullmatch=True))
def test_any_budget_is_bytes_or_a_user_error(text: str) -> None:
    try:
        value = parse_budget(text, 1000)
    except UserError as exc:
        assert "malformed budget" in str(exc)
        return
    assert isinstance(value, int) and value >= 0


def test_budget_units() -> None:
    assert parse_budget("3.0bpw", 8000) == 3000
    assert parse_budget("70MB", 1) == 70_000_000
    assert parse_budget("1MiB", 1) == 1 << 20


def test_corrupt_model_folder_and_missing_tokenizer(tmp_path) -> None:
    model = load_model("tiny-random-llama").model
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    with pytest.raises(UserError, match="has no usable tokenizer"):
        load_model(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    (folder / "config.json").write_text("{ this is not json")
    with pytest.raises(UserError, match="cannot"):
        load_model(str(folder))


def test_remote_code_models_need_the_flag(tmp_path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my_custom_llm", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                    "AutoModelForCausalLM": "modeling_x.XModel"}}))
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(str(folder))


def test_empty_and_unreadable_datasets(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UserError, match="cannot read dataset"):
        load_corpus(str(tmp_path / "bin.txt"))
