"""``compressed-tensors``: a Hugging Face model folder in compressed-tensors' ``pack-quantized`` format
(what vLLM and transformers load), holding exactly the weights the search measured.

Our symmetric ``rtn`` / ``gptq`` codes are compressed-tensors' symmetric int format: we store ``q`` in
``[0, 2**b)`` and decode ``(q - 2**(b-1)) * scale``; compressed-tensors stores the signed ``q - 2**(b-1)``
and decodes ``value * scale``. So the policy is applied as the search applied it (same quantizers, gptq's
calibration windows), our codes are unpacked and re-packed with compressed-tensors' own ``pack_to_int32``,
and our fp16 scales are written as they are: nothing is quantized again. gptq's ``act_order`` keeps the
groups in column order (static groups), so no ``g_idx`` is needed.

Anything else (an fp16 offset, outliers, another format, a group that pads the row) compressed-tensors
cannot hold bit for bit: it is refused, or with ``--nearest`` quantized again at the nearest setting it
holds, each change reported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import quant
from evaluators import UserError
from search.exporters import ExportOptions, Exported, Exporter, register_exporter

__all__ = ["CompressedTensors", "nearest_held", "unheld"]

HELD_FORMATS = ("rtn", "gptq")  # the affine-int layout; gptq's codes decode as rtn's
BITS = range(2, 9)  # our affine formats' widths, all of which pack-quantized holds (1..8)
SERVED_BITS = (4, 8)  # vLLM's weight-only (WNA16) kernels
SERVED_GROUPS = (32, 64, 128, None)  # and their group sizes (None: per output channel)
# The source model's files a loader needs beside the weights (whichever it has).
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
TENSORS_FILE = "model.safetensors"


def unheld(setting: quant.QuantSetting, shape: tuple[int, int] | None) -> str | None:
    """Why compressed-tensors cannot hold ``setting`` on an ``(out, in)`` matrix bit for bit, or ``None``
    (``shape`` ``None``: all but the row's width, checked before the model is loaded)."""
    if setting.format not in HELD_FORMATS:
        return f"format {setting.format} (only symmetric rtn / gptq codes are its int format)"
    opts = quant.get_format(setting.format).options_of(setting)
    if not opts.symmetric:
        return "an fp16 offset per group (asymmetric; its zero point is an integer)"
    if getattr(opts, "outlier_frac", 0.0):
        return "fp16 outliers (it stores none)"
    if setting.bits not in BITS:
        return f"{setting.bits} bits"
    if shape is not None and setting.group_size is not None and shape[1] % setting.group_size:
        return f"groups of {setting.group_size} padding {shape[1]}-wide rows, where its groups must divide the row"
    return None


def _held_group(group: int | None, in_features: int) -> int | None:
    """``group``, or the largest group of :data:`SERVED_GROUPS` below it that divides the row (else per
    channel): the nearest group compressed-tensors holds."""
    if group is None or in_features % group == 0:
        return group
    smaller = sorted((g for g in SERVED_GROUPS if g is not None and g < group), reverse=True)
    return next((g for g in smaller if in_features % g == 0), None)


def _nearest(setting: quant.QuantSetting, shape: tuple[int, int]) -> quant.QuantSetting:
    """Our rtn / gptq keep their format, bits and (where it divides the row) group, made symmetric without
    outliers; any other format becomes the symmetric rtn of vLLM's widths and groups nearest in bytes."""
    numel = shape[0] * shape[1]

    def bpw(s: quant.QuantSetting) -> float:
        return 8 * quant.get_format(s.format).expected_nbytes(shape, s) / numel

    if setting.format in HELD_FORMATS and setting.bits in BITS:
        options = {k: v for k, v in setting.options.items() if k != "outlier_frac"}
        return quant.QuantSetting(setting.format, setting.bits, _held_group(setting.group_size, shape[1]),
                                  {**options, "symmetric": True})
    candidates = {quant.QuantSetting("rtn", b, g, {"symmetric": True})
                  for b in SERVED_BITS for g in SERVED_GROUPS if g is None or shape[1] % g == 0}
    want = bpw(setting)
    return min(candidates, key=lambda s: (abs(bpw(s) - want), -bpw(s), s.key()))


def nearest_held(policy: quant.Policy, shapes: dict[str, tuple[int, int]]) -> tuple[quant.Policy, list[str]]:
    """Each setting compressed-tensors cannot hold becomes the nearest one it holds; returns the new
    policy and one line per change."""
    settings, changes = dict(policy.settings), []
    for name, s in policy.settings.items():
        if unheld(s, shapes[name]) is None:
            continue
        settings[name] = _nearest(s, shapes[name])
        changes.append(f"{name}: {s.describe()} -> {settings[name].describe()}")
    return quant.Policy(settings, policy.meta, kv=policy.kv), changes


def _refuse_unheld(policy: quant.Policy, shapes: dict[str, tuple[int, int]] | None) -> None:
    """Raises naming every matrix compressed-tensors cannot hold as measured, and why (``shapes`` ``None``:
    what the settings alone tell, see :func:`unheld`)."""
    reasons = {n: unheld(s, None if shapes is None else shapes[n]) for n, s in policy.settings.items()}
    bad = [f"{n}: {policy.settings[n].describe()} ({r})" for n, r in reasons.items() if r is not None]
    if bad:
        raise UserError(f"{len(bad)} matrices use settings compressed-tensors cannot hold as measured ("
                        + "; ".join(bad) + "): search with --formats rtn+symmetric / gptq+symmetric, or export "
                        "with --nearest to quantize each again at the nearest setting it holds (the folder then "
                        "holds other weights than the ones measured)")


def _weight_args(setting: quant.QuantSetting):
    from compressed_tensors.quantization import QuantizationArgs

    group = setting.group_size
    return QuantizationArgs(num_bits=setting.bits, type="int", symmetric=True,
                            strategy="channel" if group is None else "group", group_size=group)


def _quantization_config(settings: dict[str, quant.QuantSetting], ignore: list[str]):
    """compressed-tensors' own config: one group per distinct setting, targeting its modules by name."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[tuple[int, int | None], list[str]] = {}
    for name, s in settings.items():
        groups.setdefault((s.bits, s.group_size), []).append(name)
    config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=_weight_args(settings[names[0]]))
                     for i, names in enumerate(groups.values())}
    return QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                              quantization_status="compressed", ignore=ignore)


def _compressed(packed: quant.PackedTensor) -> dict[str, torch.Tensor]:
    """A packed matrix's tensors as pack-quantized stores them: our codes, signed, packed by its
    ``pack_to_int32``; the scale widened to float32 (exact) so that its loaders' decompression
    (``value * scale`` in the scale's dtype) gives our float32 weights, rounded once to the dtype loaded."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from quant.formats._common import unpack_rows

    out_features, in_features = packed.shape
    bits = packed.setting.bits
    codes = unpack_rows(packed.buffers["codes"], bits, out_features, in_features)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    return {"weight_packed": pack_to_int32(signed, bits),
            "weight_scale": packed.buffers["scale"].to(torch.float32).contiguous(),
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64)}


def _source_folder(name: str) -> Path | None:
    """The folder of the model's own files (tokenizer, generation config), ``None`` where it has none
    (the tiny random model, a hub model not in the local cache)."""
    from evaluators.fingerprint import hub_folder
    from evaluators.models import cache_dir, qwen_coder_folder

    if name == "tiny-random-llama":
        return None
    if name == "smollm2-135m":
        return cache_dir() / "models" / "smollm2-135m"  # converted there when the model was loaded
    if name == "qwen2.5-coder-1.5b":
        return qwen_coder_folder()
    return Path(name) if Path(name).is_dir() else hub_folder(name)


def _float_matrices(model: torch.nn.Module, packed: dict[str, quant.PackedTensor]) -> set[str]:
    """The quantized embeddings and LM head: written in float, holding their dequantized weights exactly.

    transformers 5.25's compressed-tensors loading fails on a quantized ``nn.Embedding`` (its weight
    initialisation reads ``embedding.weight``, which a packed module no longer has), and vLLM's
    compressed-tensors method quantizes linear layers, not its embedding and LM head modules."""
    head = model.get_output_embeddings()
    return {n for n, m in quant.find_matrices(model)[0].items()
            if n in packed and (isinstance(m, torch.nn.Embedding) or m is head)}


def _write_folder(folder: Path, loaded: Any, packed: dict[str, quant.PackedTensor]
                  ) -> tuple[set[str], list[str], list[str]]:
    """Writes config, tensors and the source's files into ``folder``; returns the matrices written in float,
    the Linear modules left in float (the config's ``ignore``) and the files copied from the source."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    model = loaded.model
    dtype = next(model.parameters()).dtype
    _, ties = quant.find_matrices(model)
    floats = _float_matrices(model, packed)
    quantized = {n: p for n, p in packed.items() if n not in floats}
    tensors = {f"{name}.{key}": value for name, p in quantized.items() for key, value in _compressed(p).items()}
    tensors.update({f"{name}.weight": packed[name].dequantize().to(dtype) for name in floats})
    # After apply_policy the state dict holds only what stays float (norms, unquantized layers); a head
    # tied to a quantized embedding is left out, as save_pretrained leaves it: the loader ties it again.
    tied = {f"{head}.weight" for head, name in ties.items() if name in packed}
    for key, value in model.state_dict().items():
        if key not in tied:
            tensors[key] = value.detach().contiguous().clone()  # safetensors refuses shared storage
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    # Quantized modules are QuantLinear (an nn.Linear too): every Linear not targeted is named here.
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    config = _quantization_config({n: p.setting for n, p in quantized.items()}, ignore)
    ModelCompressor(quantization_config=config).update_config(str(folder))
    source = _source_folder(loaded.name)
    copied = [f for f in SOURCE_FILES if source is not None and (source / f).is_file()]
    for f in copied:
        shutil.copyfile(source / f, folder / f)
    return floats, ignore, copied


def _check_out(out: Path) -> None:
    """Refuses a non-empty folder that is not an earlier compressed-tensors export (whose files would go)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        method = json.loads((out / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    except (OSError, ValueError, AttributeError):
        method = None
    if method != "compressed-tensors":
        raise UserError(f"--out {out} is a folder holding other files; give a new or empty folder "
                        "(or an earlier compressed-tensors export, which is replaced)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished ``tmp`` folder to ``out``; an earlier export there is set aside first and
    removed once the new one is in place, so ``out`` is always one whole export."""
    old = None
    if out.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lines(out: Path, trial: int, m: dict[str, Any], packed: dict[str, quant.PackedTensor], policy: quant.Policy,
           floats: set[str], ignore: list[str], copied: list[str], changes: list[str]) -> list[str]:
    """The report: what was written, each --nearest change, and what vLLM may not serve."""
    settings = sorted({p.setting.describe() for n, p in packed.items() if n not in floats})
    lines = [f"wrote {out} (compressed-tensors pack-quantized): {len(packed) - len(floats)} packed matrices "
             f"({', '.join(settings)}); {', '.join(sorted(floats)) or 'no embedding'} in float holding their "
             f"dequantized weights; Linear left in float (ignore): {', '.join(ignore) or 'none'}; "
             f"{'tokenizer files ' + ', '.join(copied) if copied else 'no tokenizer files (the model has none)'}; "
             f"trial {trial} measured KL {m['kl']:.5f} at {m['bytes']:,} bytes"]
    lines += [f"  ~ {line}" for line in changes]
    if changes:
        lines.append(f"  {len(changes)} matrices quantized again by --nearest: the folder is not the policy "
                     "that was measured")
    unserved = sorted(n for n, p in packed.items() if n not in floats
                      and (p.setting.bits not in SERVED_BITS or p.setting.group_size not in SERVED_GROUPS))
    if unserved:
        lines.append(f"  note: {len(unserved)} matrices have widths or groups vLLM's int kernels do not serve "
                     f"(they serve 4 / 8 bits, groups 32 / 64 / 128 / per channel): {', '.join(unserved[:5])}")
    if policy.kv:
        lines.append("  note: the policy's KV cache settings are not part of this export")
    return lines


class CompressedTensors(Exporter):
    name = "compressed-tensors"
    help = "a Hugging Face folder in compressed-tensors' pack-quantized format (vLLM, transformers)"
    folder = True

    def write(self, doc: dict[str, Any], out: Path, options: ExportOptions) -> Exported:
        from evaluators.checkpoint import POLICY_FILE, pack_policy

        _check_out(out)
        policy = quant.Policy.from_dict(doc)
        if not options.nearest:
            _refuse_unheld(policy, None)  # before the model loads and gptq's Hessians are collected
        changes: list[str] = []

        def remap(p: quant.Policy, shapes: dict[str, tuple[int, int]]) -> quant.Policy:
            # Here, once the shapes are known and before anything is quantized or written.
            if not options.nearest:
                _refuse_unheld(p, shapes)
                return p
            mapped, lines = nearest_held(p, shapes)
            changes.extend(lines)
            return mapped

        trial = doc["provenance"]["trial"]
        loaded, packed, _ = pack_policy(policy, f"trial {trial}", remap=remap,
                                        trust_remote_code=options.trust_remote_code)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the folder gets what mkdir would give it
            floats, ignore, copied = _write_folder(tmp, loaded, packed)
            # What was measured, so that `turboquant eval` can measure the folder against the float model.
            (tmp / POLICY_FILE).write_text(json.dumps(doc, indent=2))
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        lines = _lines(out, trial, doc["metrics"], packed, policy, floats, ignore, copied, changes)
        return Exported(self.name, out, trial, doc["metrics"], lines, changes, ignore)


register_exporter(CompressedTensors())
