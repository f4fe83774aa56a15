"""`turboquant show policy.json [--plot bits.png]`: the printed per-layer table and the bit map match the policy."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

import quant
from evaluators import load_model
from quant.policy import weight_matrices
from app.cli import main
from app.show import bit_map

PNG = b"\x89PNG\r\n\x1a\n"
SETTINGS = [  # cycled over the matrices so that neighbours differ in bits, group and format
    {"format": "rtn", "bits": 2, "group_size": 32, "options": {}},
    {"format": "rtn", "bits": 3, "group_size": None, "options": {}},
    {"format": "turbo", "bits": 4, "group_size": 64, "options": {}},
    {"format": "rtn", "bits": 8, "group_size": 128, "options": {"symmetric": True}},
    {"format": "ternary", "bits": 2, "group_size": 32, "options": {}},
]


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    names = list(weight_matrices(load_model("tiny-random-llama").model))
    doc = {"format_version": 1, "model": "tiny-random-llama",
           "matrices": {n: SETTINGS[i % len(SETTINGS)] for i, n in enumerate(names)},
           "metrics": {"kl": 0.25, "bytes": 40000, "bpw": 3.25}}
    path = tmp_path_factory.mktemp("show") / "policy.json"
    path.write_text(json.dumps(doc))
    return path, doc


def _expected_place(name: str) -> tuple[str, str]:
    m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)_proj$", name)
    if m:
        return m.group(1), m.group(2)
    return ("embed", "embed") if name.endswith("embed_tokens") else ("lm_head", "lm_head")


# The cells leave out the policy's most common format (here the one of three settings in five).
BASE = Counter(s["format"] for s in SETTINGS).most_common(1)[0][0]


def _text(s: dict) -> str:
    g = "ch" if s["group_size"] is None else str(s["group_size"])
    return f"{s['bits']}/{g}" + ("" if s["format"] == BASE else f":{s['format']}")


def _parse_table(out: str) -> dict[tuple[str, str], str]:
    """(row, column) -> cell text, read back by the columns' right edges in the header line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    header = lines[start]
    cols = [(m.group(0), m.end()) for m in re.finditer(r"\S+", header)][1:]
    width = cols[1][1] - cols[0][1]
    cells = {}
    for line in lines[start + 1:]:
        if line.startswith("settings:"):
            break
        row = line.split()[0]
        for name, end in cols:
            text = line[end - width:end].strip()
            if text:
                cells[row, name] = text
    return cells


def test_show_prints_every_matrix_setting_per_layer(policy_file, capsys) -> None:
    path, doc = policy_file
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"{path}: model tiny-random-llama, {len(doc['matrices'])} matrices, "
                                   "40,000 bytes (3.250 bpw), KL 0.25000")
    assert out.splitlines()[1].endswith(f":format when not {BASE}")
    expected = {_expected_place(n): _text(s) for n, s in doc["matrices"].items()}
    assert _parse_table(out) == expected
    rows = [line.split()[0] for line in out.splitlines()[3:-1]]
    assert rows == ["embed", "0", "1", "lm_head"]  # the tiny model: 2 layers, an untied LM head
    counts = {k: int(n) for k, n in re.findall(r"(\S+) x(\d+)", out.splitlines()[-1])}
    assert counts == {_text(s): sum(v == s for v in doc["matrices"].values()) for s in SETTINGS}


def test_show_plot_writes_the_bit_map_png(policy_file, tmp_path, capsys) -> None:
    path, doc = policy_file
    out = tmp_path / "bits.png"
    assert main(["show", str(path), "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 200
    # The colours come from this grid: code bits per (layer, kind) as quant writes them into the
    # document (ternary at log2(3)), empty cells NaN.
    grid = bit_map(quant.Policy.from_dict(doc).to_dict()["matrices"])
    assert grid.cols == ["q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"]
    values = grid.bits()
    for name, s in doc["matrices"].items():
        row, col = _expected_place(name)
        setting = quant.QuantSetting.from_dict(s)
        bits = quant.get_format(s["format"]).code_bits(setting)
        assert values[grid.rows.index(row)][grid.cols.index(col)] == pytest.approx(bits)
        assert bits == pytest.approx({"ternary": 1.58}.get(s["format"], s["bits"]))  # a trit: log2(3) bits
    filled = sum(v == v for line in values for v in line)  # NaN != NaN
    assert filled == len(doc["matrices"])


def test_bit_map_refuses_a_document_quant_did_not_write(policy_file) -> None:
    _, doc = policy_file  # entries without their runtime mapping: code bits unknown without torch
    with pytest.raises(ValueError, match="no 'runtime' entry"):
        bit_map(doc["matrices"]).bits()


def test_show_refuses_bad_input(policy_file, tmp_path, capsys) -> None:
    path, _ = policy_file
    assert main(["show", str(path), "--plot", str(tmp_path / "bits.gif")]) == 2
    assert "use a .png file name" in capsys.readouterr().err
    assert not (tmp_path / "bits.gif").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format_version": 1, "matrices": {"x": {"format": "nope", "bits": 4}}}))
    assert main(["show", str(bad), "--plot", str(tmp_path / "b.png")]) == 2
    assert "matrix 'x'" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
