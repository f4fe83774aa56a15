"""The Format contract, checked on every registered format: typed options, defaults, layouts, runtime mapping."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

import quant
from quant.formats import RUNTIMES, Format, FormatOptions, format_names, get_format
from quant.settings import QuantSetting

# A value of the wrong type for each option type (bool is refused where an int or a float is asked).
WRONG = {bool: ["yes", 1, None], int: [1.5, True, "2"], float: [1, "0.1", False], str: [3, True]}


def _option_fields(name: str) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(get_format(name).Options)
    out = []
    for f in dataclasses.fields(get_format(name).Options):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        out.append((f.name, args[0] if args else hints[f.name]))
    return out


@pytest.mark.parametrize("name", format_names())
def test_unknown_option_is_refused_with_the_known_ones(name: str) -> None:
    fmt = get_format(name)
    with pytest.raises(ValueError, match=f"format {name!r} has no option 'colour'") as err:
        QuantSetting.from_dict({"format": name, "options": {"colour": "red"}})
    for known in fmt.Options.known():
        assert known in str(err.value)


@pytest.mark.parametrize("name,field,kind", [(n, f, k) for n in format_names() for f, k in _option_fields(n)])
def test_option_of_the_wrong_type_is_refused(name: str, field: str, kind: type) -> None:
    for value in WRONG[kind]:
        with pytest.raises(ValueError, match=f"option {field!r} must be"):
            QuantSetting.from_dict({"format": name, "options": {field: value}})


@pytest.mark.parametrize("name", format_names())
def test_options_parse_once_into_frozen_typed_defaults(name: str) -> None:
    fmt = get_format(name)
    setting = QuantSetting.from_dict({"format": name})  # bits and group from the format's own defaults
    assert (setting.bits, setting.group_size) == (fmt.default_bits, fmt.default_group_size)
    opts = fmt.options_of(setting)
    assert isinstance(opts, fmt.Options) and isinstance(opts, FormatOptions)
    assert opts == fmt.Options() and opts.to_dict() == {}
    assert fmt.options_of(setting) is opts  # parsed once per distinct options object
    fields = dataclasses.fields(opts)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(opts, fields[0].name, fields[0].default)


@pytest.mark.parametrize("name", format_names())
def test_every_format_declares_a_layout_and_a_runtime_mapping(name: str) -> None:
    fmt = get_format(name)
    setting = QuantSetting.from_dict({"format": name})
    assert fmt.layout
    mapping = fmt.runtime(setting)
    assert set(mapping.native) <= set(RUNTIMES) and set(mapping.types) <= set(RUNTIMES)
    assert 0 < mapping.code_bits <= setting.bits
    if type(fmt).check_shape is Format.check_shape:
        fmt.check_shape((7, 576), setting)  # the default accepts every shape (576: a padded last group)
    else:  # a block format (llama.cpp's types) refuses partial blocks but takes rows of whole ones
        fmt.check_shape((7, 3 * setting.group_size), setting)


def test_the_affine_formats_share_one_layout_and_only_they() -> None:
    layouts = {n: get_format(n).layout for n in format_names()}
    assert layouts["rtn"] == layouts["gptq"] == "affine-int"
    assert sum(v == "affine-int" for v in layouts.values()) == 2


@pytest.mark.parametrize("setting, message", [
    ({"format": "lloyd", "options": {"weighted": True, "preset": "nf"}}, "do not combine"),
    ({"format": "gptq", "options": {"damp": 0.0}}, "'damp' must be in"),
    ({"format": "turbo", "options": {"seed": -1}}, "non-negative"),
    ({"format": "rtn", "options": {"outlier_frac": 0.5}}, "'outlier_frac' must be in"),
    ({"format": "vq", "options": {"dim": 3}}, "'dim' must be one of"),
])
def test_option_values_are_range_checked(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantSetting.from_dict(setting)


def test_fixed_geometry_formats_are_named_alone(monkeypatch) -> None:
    ternary = get_format("ternary")
    assert not ternary.fixed_geometry  # one width but several groups: the label keeps them
    assert QuantSetting.from_dict({"format": "ternary"}).describe() == "ternary2g128"
    monkeypatch.setattr(type(ternary), "group_sizes", (256,))
    monkeypatch.setattr(type(ternary), "default_group_size", 256)
    assert ternary.fixed_geometry
    setting = QuantSetting.from_dict({"format": "ternary"})
    assert (setting.bits, setting.group_size) == (2, 256) and setting.describe() == "ternary"
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    assert quant.quantize(w, {"format": "ternary"}).setting == setting  # no bits or group given
    assert QuantSetting.from_dict({"format": "rtn", "bits": 4, "group_size": 128}).describe() == "rtn4g128"


def test_direct_construction_is_validated_too() -> None:
    from quant.formats.rtn import RtnOptions

    with pytest.raises(ValueError, match="'symmetric' must be a boolean"):
        RtnOptions(symmetric="no")
    assert RtnOptions(clip=True).to_dict() == {"clip": True}


def test_the_parse_cache_tells_true_from_one() -> None:
    # 1 == True and hash(1) == hash(True): a cache keyed on values alone would pass 1 as a boolean.
    assert get_format("rtn").options_of(QuantSetting("rtn", 4, 128, {"symmetric": True})).symmetric is True
    with pytest.raises(ValueError, match="'symmetric' must be a boolean, got 1"):
        QuantSetting.from_dict({"format": "rtn", "options": {"symmetric": 1}})


def test_formats_answer_which_geometries_they_allow() -> None:
    assert get_format("rtn").allows(4, 128) and get_format("rtn").allows(8, None)
    assert not get_format("rtn").allows(1, 128)  # bits out of range
    assert not get_format("turbo").allows(4, None)  # the Hadamard needs a power-of-two group
    assert not get_format("lloyd").allows(6, 32) and get_format("lloyd").allows(6, 32, {"preset": "nf"})
    assert [b for b in range(1, 9) if get_format("ternary").allows(b, 128)] == [2]
