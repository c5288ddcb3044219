"""Adapters that travel: export to PEFT, kohya and LyCORIS files, import from them, combine several.

Export is exact (the LoRA and LoCon-Tucker forms of a Tucker delta, see
:mod:`ndlowrank.nn.formats._layer`); what a format cannot reproduce is refused with the
layer's name and nothing is written. Import and combine bring every layer to Tucker form by
the route of :func:`~ndlowrank.nn.truncate_adapters` (QR of the factors, ST-HOSVD of the
small core), never forming ``ΔW``, with ``‖ΔW_new − ΔW‖ ≤ tol · ‖ΔW‖`` per layer.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

import array_api_compat.torch as torch_xp
import torch
from torch import nn

from .._files import FileError, read_metadata
from .._subspace import mode_spectrum
from ..decompose import check_tol
from ..ranks import budget_ranks
from ._file_format import METADATA_KEY, _fspath
from ._host import DeltaHost
from .formats import FORMATS, diffusers, kohya, peft
from .formats._compress import small_forms, truncate_forms
from .formats._layer import TRANSPOSED, LowRankLayer, block_sum, keys_of, lora_form
from .io import load_adapters
from .layers import TransposedLinearAdapter, TuckerAdapter, supported_layers
from .model import add_adapters, iter_adapters, remove_adapters
from .named import chosen_adapter
from .targets import _is_transformers_conv1d
from .truncate import TruncationReport

__all__ = ["combine_adapters", "convert_adapters", "export_adapters", "import_adapters"]

LOSSLESS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
"""The ``tol`` of an import or combine without ``tol`` or ``ranks``: rounding level of the adapter's dtype."""


def export_adapters(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    format: str = "peft",
    prefix: str | None = None,
    adapter_name: str | None = None,
) -> list[str]:
    """Write the adapters of ``model`` as a file other tools load: PEFT, kohya or LyCORIS.

    Every file is exact: loaded by its tool onto the same base model, it gives the outputs
    of ``model`` up to rounding (the scale is folded into the factors, ``alpha = r``).

    Parameters
    ----------
    model : nn.Module
        A model with layer adapters (linear, convolution; transformers ``Conv1D`` for PEFT and
        diffusers, in ``nn.Linear``'s layout with ``fan_in_fan_out``; embeddings and parameter
        adapters on 2-D parameters for PEFT, as its ``target_parameters``).
    path : str or os.PathLike
        ``format="peft"``: a directory (created if missing) that gets ``adapter_model.safetensors``
        and ``adapter_config.json``, for ``PeftModel.from_pretrained``. Otherwise the
        ``.safetensors`` file to write.
    format : {"peft", "diffusers", "kohya", "lycoris"}, default "peft"
        ``"diffusers"``: PEFT keys under ``unet.`` in one file (``pipe.load_lora_weights``,
        ``load_lora_adapter(..., prefix="unet")``). ``"kohya"``: ``lora_down``/``lora_up``/``alpha``
        keys (diffusers ``load_lora_weights``, ComfyUI, A1111). ``"lycoris"``: LoCon with ``use_tucker`` (``lora_mid`` holds the
        spatial core) for LyCORIS ``create_lycoris_from_weights``.
    prefix : str, optional
        Key prefix of the diffusers, kohya and LyCORIS formats: ``"unet"`` (diffusers' default;
        ``"text_encoder"``, ``"transformer"``), ``"lora_unet"`` (kohya's default, for a Stable
        Diffusion UNet), ``"lora_te"`` for a text encoder, ``"lycoris"`` (LyCORIS's default).
    adapter_name : str, optional
        The named adapter to export; by default the one that runs on each layer (a
        ``ValueError`` where several run at once).

    Returns
    -------
    list of str
        The files written.

    Raises
    ------
    ValueError
        Naming the layer, if the format cannot reproduce it exactly (a grouped or dilated
        convolution in PEFT or kohya, a padding mode other than zeros, a parameter adapter
        outside PEFT or on a parameter of 3 or more modes, an embedding outside PEFT, a
        transformers ``Conv1D`` in kohya or LyCORIS); nothing is written.

    Notes
    -----
    An adapter with ``init="principal"`` (whose base weight holds ``W − start``) exports
    ``ΔW − start``, the change from the original weight: the file goes on the original model.

    Examples
    --------
    >>> import os, tempfile
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> model = nlnn.add_adapters(nn.Sequential(nn.Conv2d(4, 8, 3)), ["0"], ranks=(4, 2, 3, 3), seed=0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     files = nlnn.export_adapters(model, os.path.join(tmp, "lora"), format="peft")
    ...     sorted(os.path.basename(f) for f in files)
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    target = _fspath(path)
    if format not in FORMATS:
        raise ValueError(f"unknown format={format!r}; known formats: {sorted(FORMATS)}")
    module = FORMATS[format]
    with chosen_adapter(model, adapter_name) as entries:
        if not entries:
            raise ValueError("the model has no adapters to export; add them with ndlowrank.nn.add_adapters")
        for name, host in entries:
            module.check(name, host)
            if not all(bool(torch.isfinite(p).all()) for p in host.delta.parameters()):
                raise ValueError(f"layer {name!r}: its adapter holds NaN or Inf; nothing was written")
        layers = module.layers(entries)
    return module.write(target, layers, prefix=prefix)


def _read(path: str, model: nn.Module, format: str | None, strict: bool = True) -> list[LowRankLayer]:
    """Every layer of a PEFT directory or a diffusers / kohya / LyCORIS file, named by the model's layers.

    Without ``strict``, layers the model does not have are left out, with a warning.
    """
    skipped: list[str] = []
    layers = _read_all(path, model, format, None if strict else skipped)
    if not strict:
        missing = [layer.name for layer in layers if not _has_module(model, layer.name)]
        skipped += missing
        layers = [layer for layer in layers if layer.name not in missing]
    if skipped:
        shown = ", ".join(repr(name) for name in skipped[:5]) + (", …" if len(skipped) > 5 else "")
        warnings.warn(
            f"{path}: {len(skipped)} layers name no layer of the model and were left out ({shown})",
            stacklevel=3,
        )
    # a linear delta on a transformers Conv1D: the file's nn.Linear layout, transposed onto its (in, out) weight
    return [
        replace(layer, kind=TRANSPOSED) if layer.kind == "linear" and _is_conv1d(model, layer.name) else layer
        for layer in layers
    ]


def _is_conv1d(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a transformers ``Conv1D`` (GPT-2), adapted or not."""
    if not _has_module(model, name):
        return False
    module = model.get_submodule(name)
    return isinstance(module, TransposedLinearAdapter) or _is_transformers_conv1d(module)


def _is_ndlowrank_file(path: str) -> bool:
    """Whether ``path`` is an adapter file written by :func:`save_adapters` (its metadata says so)."""
    if not os.path.isfile(path):
        return False
    try:
        return METADATA_KEY in read_metadata(path)
    except FileError:  # not safetensors: the format readers say why
        return False


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _read_all(
    path: str, model: nn.Module, format: str | None, skipped: list[str] | None
) -> list[LowRankLayer]:
    if format not in (None, *FORMATS):
        raise ValueError(f"unknown format={format!r}; known formats: {sorted(FORMATS)}")
    if format == "peft" or (format is None and os.path.isdir(path)):
        return peft.read(path)
    if _is_ndlowrank_file(path):
        raise ValueError(f"{path!r} is an ndlowrank adapter file; load it with ndlowrank.nn.load_adapters")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; format={format!r} reads one .safetensors file")
    names = [name for name, _ in model.named_modules() if name and "base_layer" not in name.split(".")]
    if format == "diffusers" or (format is None and diffusers.is_diffusers(keys_of(path))):
        return diffusers.read(path, names, skipped)
    return kohya.read(path, names, skipped)


def _target_weight(model: nn.Module, name: str, where: str, kind: str = "") -> torch.Tensor:
    """The weight a file's entry changes: a layer's weight, or with ``kind="parameter"`` a named parameter."""
    if kind == "parameter":
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if _has_module(model, owner_name) else None
        value = getattr(owner, attribute, None)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: parameter {name!r} is not in the model")
        return value
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: layer {name!r} is not in the model") from None
    base: Any = module.base_layer if isinstance(module, TuckerAdapter) else module
    if not isinstance(base, supported_layers()):
        raise ValueError(f"{where}: layer {name!r} is a {type(base).__name__}, which takes no adapter")
    weight = base.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _check_layer(model: nn.Module, layer: LowRankLayer, where: str) -> None:
    shape = tuple(_target_weight(model, layer.name, where, layer.kind).shape)
    if shape != layer.shape:
        raise ValueError(
            f"{where}: layer {layer.name!r} has weight shape {shape} but the file's delta has shape {layer.shape}"
        )
    parts = [layer.up, layer.down] + ([] if layer.mid is None else [layer.mid])
    if not all(bool(torch.isfinite(part).all()) for part in parts) or not math.isfinite(layer.scale):
        raise ValueError(f"{where}: layer {layer.name!r} holds NaN or Inf; the file is damaged")


def _default_tol(dtypes: set[torch.dtype], tol: float | None, ranks: Any, budget: Any) -> float | None:
    """``tol`` checked, or the rounding level of ``dtypes`` when none of ``tol``, ``ranks``, ``budget`` is given."""
    given = [
        name for name, value in (("tol", tol), ("ranks", ranks), ("budget", budget)) if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give at most one of tol=, ranks= or budget=, got {given}")
    if given:
        return None if tol is None else check_tol(tol)
    return max(LOSSLESS_TOL.get(dtype, LOSSLESS_TOL[torch.float32]) for dtype in dtypes)


def _compress(
    forms: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor | None]]],
    shapes: Sequence[tuple[int, ...]],
    *,
    tol: float | None,
    ranks: Any,
    budget: int | None,
) -> list[tuple[torch.Tensor, list[torch.Tensor], float]]:
    """Every exact Tucker form brought to small ranks: to ``tol``, to ``ranks``, or sharing ``budget``."""
    small = small_forms(forms)
    targets: list[Any] = [ranks] * len(small)
    if budget is not None:
        if isinstance(budget, bool) or not hasattr(budget, "__index__"):
            raise TypeError(f"budget must be an int number of parameters, got {budget!r}")
        minimum = sum(1 + sum(shape) for shape in shapes)
        if budget < minimum:
            raise ValueError(f"budget={budget} is below {minimum}, the size of every delta at ranks 1")
        spectra = [[mode_spectrum(core, n, xp=torch_xp) for n in range(core.ndim)] for core, _ in small]
        targets = list(budget_ranks(spectra, shapes, int(budget)))
    return truncate_forms(small, tol=tol, ranks=targets)


def _compress_layers(
    layers: Sequence[LowRankLayer], dtypes: set[torch.dtype], *, tol: Any, ranks: Any, budget: Any
) -> list[tuple[torch.Tensor, list[torch.Tensor], float]]:
    """Every file layer in small Tucker form; without ``tol``, ``ranks`` or ``budget``, lossless for ``dtypes``."""
    tol = _default_tol(dtypes, tol, ranks, budget)
    forms = [layer.tucker() for layer in layers]
    return _compress(forms, [layer.shape for layer in layers], tol=tol, ranks=ranks, budget=budget)


def import_adapters(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    tol: float | None = None,
    ranks: int | Sequence[int] | None = None,
    budget: int | None = None,
    strict: bool = True,
) -> list[TruncationReport]:
    """Add Tucker adapters to ``model`` from a PEFT, kohya LoRA/LoCon or LyCORIS LoCon(-Tucker) file.

    Each layer's ``ΔW = scale · up · down`` (or with a LoCon middle kernel) is brought to
    Tucker form without forming ``ΔW``: QR of ``up``, ST-HOSVD of the small core
    ``R · down``, batched over the layers of equal shapes. This is also how to resize a
    LoRA, with a guarantee. A linear delta on a transformers ``Conv1D`` (GPT-2), stored in
    ``nn.Linear``'s layout as PEFT saves it, is transposed onto the ``(in, out)`` weight.

    Parameters
    ----------
    model : nn.Module
        The base model the file was made for; the layers it names must have no adapter yet.
    path : str or os.PathLike
        A PEFT directory (with ``adapter_config.json``), or a diffusers, kohya or LyCORIS
        ``.safetensors`` file.
    format : {"peft", "diffusers", "kohya", "lycoris"}, optional
        Told from the path when omitted (a directory is PEFT).
    tol : float in (0, 1), optional
        Relative error bound per layer: ``‖ΔW_new − ΔW‖ ≤ tol · ‖ΔW‖``.
    ranks : int or sequence of int, optional
        Fixed Tucker ranks instead (clipped to what each layer's delta can have).
    budget : int, optional
        Total adapter parameters over all layers, spread by captured energy (as
        :func:`truncate_adapters` does). Without ``tol``, ``ranks`` or ``budget``, ``tol`` is
        the rounding level of the adapter's dtype (:data:`LOSSLESS_TOL`).
    strict : bool, default True
        With ``False``, layers the model does not have are left out with a warning (a
        Stable Diffusion file's text-encoder layers, imported into the UNet alone).

    Returns
    -------
    list of TruncationReport
        Per layer: the ranks of the file's exact Tucker form, the new ranks, the relative change.

    Raises
    ------
    ValueError, FileNotFoundError
        For a file that is not one of these formats or is damaged, a layer that is not in the
        model, already has an adapter or has another shape; the model is left untouched.
    """
    where = _fspath(path)
    layers = _read(where, model, format, strict)
    if not layers:
        raise ValueError(f"{where!r} holds no adapter layers")
    adapted = {name for name, _ in iter_adapters(model)}
    for layer in layers:
        if layer.name in adapted or f"{layer.name}.weight" in adapted:
            raise ValueError(
                f"{where}: layer {layer.name!r} already has an adapter; use combine_adapters or remove it first"
            )
        _check_layer(model, layer, where)
    dtypes = {_target_weight(model, layer.name, where, layer.kind).dtype for layer in layers}
    results = _compress_layers(layers, dtypes, tol=tol, ranks=ranks, budget=budget)
    parameters = {layer.name for layer in layers if layer.kind == "parameter"}
    old_shapes = [layer.tucker_shape for layer in layers]
    return _install(model, [layer.name for layer in layers], old_shapes, results, parameters)


def _install(
    model: nn.Module,
    names: list[str],
    old_shapes: list[tuple[int, ...]],
    results: list[tuple[torch.Tensor, list[torch.Tensor], float]],
    parameters: Collection[str] = (),
) -> list[TruncationReport]:
    """Give every layer (or parameter) ``names[i]`` the delta ``results[i]``, adding adapters where there are none."""
    hosts = dict(iter_adapters(model))
    # a linear its parent reads by attribute gets a parameter adapter, named after its weight
    fresh = [name for name in names if name not in hosts and f"{name}.weight" not in hosts]
    if fresh:
        layers = [name for name in fresh if name not in parameters]
        add_adapters(
            model,
            "|".join(re.escape(name) for name in layers) if layers else None,
            ranks=1,
            seed=0,
            target_parameters=[name for name in fresh if name in parameters] or None,
        )
        hosts = dict(iter_adapters(model))
    reports = []
    for name, old, (core, factors, error) in zip(names, old_shapes, results, strict=True):
        host: DeltaHost = hosts[name] if name in hosts else hosts[f"{name}.weight"]
        merged = host.merged
        host.unmerge()
        dtype = host.delta.core.dtype
        with torch.no_grad():
            host.delta._adopt(core.to(dtype), [f.to(dtype) for f in factors], 1.0)
        if merged:
            host.merge()
        reports.append(TruncationReport(name, tuple(old), host.ranks, error))
    return reports


def _tucker_terms(source: Any, model: nn.Module) -> dict[str, tuple[torch.Tensor, list[torch.Tensor | None]]]:
    """``{layer name: exact Tucker form}`` of a source: a model with adapters or an adapter file."""
    if isinstance(source, nn.Module):
        out: dict[str, tuple[torch.Tensor, list[torch.Tensor | None]]] = {}
        with chosen_adapter(source, None) as entries:  # what runs on each layer
            for name, host in entries:
                if not isinstance(host, TuckerAdapter):
                    raise ValueError(
                        f"parameter adapter {name!r}: combine_adapters combines layer adapters only"
                    )
                delta = host.delta
                out[name] = (delta.scale * delta.core.detach(), [f.detach() for f in delta.factors])
        if not out:
            raise ValueError("a model given as a source has no adapters")
        return out
    where = _fspath(source)
    if _is_ndlowrank_file(where):  # built on a plain copy of the model, then read like a model
        return _tucker_terms(load_adapters(remove_adapters(copy.deepcopy(model), merge=False), where), model)
    layers = _read(where, model, None)
    for layer in layers:
        if layer.kind == "parameter":
            raise ValueError(
                f"{where}: parameter {layer.name!r}: combine_adapters combines layer adapters only"
            )
        _check_layer(model, layer, where)
    return {layer.name: layer.tucker() for layer in layers}


def combine_adapters(
    model: nn.Module,
    sources: Sequence[Any],
    weights: Sequence[float] | None = None,
    *,
    tol: float | None = None,
    ranks: int | Sequence[int] | None = None,
    budget: int | None = None,
) -> list[TruncationReport]:
    """Put ``Σ weights[i] · ΔW_i`` of several adapters into ``model`` as one Tucker adapter per layer.

    The sum of Tucker (or LoRA) deltas is one Tucker form with a block-diagonal core; it is
    re-compressed like :func:`truncate_adapters` does, never forming ``ΔW``, so
    ``‖ΔW_new − Σ wᵢ ΔWᵢ‖ ≤ tol · ‖Σ wᵢ ΔWᵢ‖`` per layer. PEFT's ``add_weighted_adapter``
    does this with an SVD of flattened matrices.

    Parameters
    ----------
    model : nn.Module
        The base model; each combined layer gets an adapter (an existing one is replaced).
    sources : sequence
        Models with Tucker adapters (``model`` itself among them), paths of ndlowrank
        adapter files (:func:`save_adapters`) and paths of PEFT, diffusers, kohya or LyCORIS files.
        A layer missing from a source counts as zero there.
    weights : sequence of float, optional
        One per source, 1 each by default.
    tol, ranks, budget
        As for :func:`import_adapters`.

    Returns
    -------
    list of TruncationReport
        Per layer: the combined Tucker form's ranks, the new ranks and the relative change.

    Examples
    --------
    >>> import copy
    >>> import torch
    >>> from torch import nn
    >>> from ndlowrank import nn as nlnn
    >>> base = nn.Sequential(nn.Conv2d(4, 8, 3))
    >>> a = nlnn.add_adapters(copy.deepcopy(base), ["0"], ranks=2, init="orthogonal", seed=0)
    >>> b = nlnn.add_adapters(copy.deepcopy(base), ["0"], ranks=2, init="orthogonal", seed=1)
    >>> for m in (a, b):
    ...     with torch.no_grad():
    ...         _ = m[0].delta.core.normal_()
    >>> report = nlnn.combine_adapters(base, [a, b], [0.5, 0.5])
    >>> report[0].new_ranks
    (4, 4, 3, 3)
    >>> expected = 0.5 * (a[0].delta_weight() + b[0].delta_weight())
    >>> torch.allclose(base[0].delta_weight(), expected, atol=1e-5)
    True
    """
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty; give models with adapters or adapter files")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} sources; give one weight per source")
    per_source = [_tucker_terms(source, model) for source in sources]
    names = list(dict.fromkeys(name for terms in per_source for name in terms))
    targets = [_target_weight(model, name, "combine_adapters") for name in names]
    shapes = [tuple(weight.shape) for weight in targets]
    tol = _default_tol({weight.dtype for weight in targets}, tol, ranks, budget)
    blocks = []
    for name, shape in zip(names, shapes, strict=True):
        terms = [(w, *terms[name]) for w, terms in zip(weights, per_source, strict=True) if name in terms]
        blocks.append(block_sum(terms, shape))
    results = _compress(blocks, shapes, tol=tol, ranks=ranks, budget=budget)
    return _install(model, names, [tuple(core.shape) for core, _ in blocks], results)


def convert_adapters(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    format: str,
    tol: float | None = None,
    ranks: int | Sequence[int] | None = None,
    budget: int | None = None,
    prefix: str | None = None,
) -> list[TruncationReport]:
    """Convert a PEFT, diffusers, kohya or LyCORIS file to another of these formats, optionally resized, without a model.

    Each layer goes through Tucker form (:func:`import_adapters`' route, ``ΔW`` never formed):
    with ``tol`` every layer's ``‖ΔW_new − ΔW‖ ≤ tol · ‖ΔW‖`` (kohya's resize scripts, with
    a guarantee); without ``tol`` or ``ranks`` the conversion is exact to the file dtype's
    rounding. The layers' convolution geometry is the one the source file's loaders assume.

    Parameters
    ----------
    source : str or os.PathLike
        A PEFT directory, or a diffusers, kohya or LyCORIS ``.safetensors`` file.
    target : str or os.PathLike
        The PEFT directory or ``.safetensors`` file to write.
    format : {"peft", "diffusers", "kohya", "lycoris"}
        Of ``target``. A kohya or LyCORIS source keeps its key stems (the module paths'
        dots are lost there), so it cannot become a PEFT or diffusers file: import it into
        the model (:func:`import_adapters`) and export from there.
    tol, ranks, budget
        As for :func:`import_adapters`.
    prefix : str, optional
        Key prefix of a diffusers / kohya / LyCORIS target made from a PEFT or diffusers source.

    Returns
    -------
    list of TruncationReport
        Per layer: the file's exact Tucker ranks, the new ranks and the relative change.
    """
    where, out = _fspath(source), _fspath(target)
    if format not in FORMATS:
        raise ValueError(f"unknown format={format!r}; known formats: {sorted(FORMATS)}")
    dotted = True  # whether the source keeps the module paths (kohya and LyCORIS keys do not)
    if peft.is_peft(where):
        layers = peft.read(where)
    elif os.path.isdir(where):
        raise ValueError(f"{where!r} is a directory without adapter_config.json, not a PEFT adapter")
    elif diffusers.is_diffusers(keys_of(where)):
        layers = diffusers.read(where, None)
    else:
        layers, dotted = kohya.read(where, None), False
    if not dotted and format in ("peft", "diffusers"):
        raise ValueError(
            f"{where!r} is a kohya/LyCORIS file, whose keys do not keep the module paths {format} needs;"
            " import it into the model with import_adapters and export from there"
        )
    if not dotted and prefix is not None:
        raise ValueError(
            "prefix= applies to a PEFT or diffusers source; a kohya/LyCORIS source keeps its key stems"
        )
    if not layers:
        raise ValueError(f"{where!r} holds no adapter layers")
    for layer in layers:
        if layer.kind == "embedding" and format != "peft":
            raise ValueError(
                f"{where!r}: layer {layer.name!r} is an embedding, which {format} files cannot hold"
            )
    results = _compress_layers(
        layers, {layer.up.dtype for layer in layers}, tol=tol, ranks=ranks, budget=budget
    )
    reports, converted = [], []
    for layer, (core, factors, error) in zip(layers, results, strict=True):
        dtype = layer.up.dtype
        tucker = format == "lycoris" and layer.kind == "conv" and any(k > 1 for k in layer.shape[2:])
        converted.append(
            lora_form(layer.name, layer.kind, core.to(dtype), [f.to(dtype) for f in factors], tucker=tucker)
        )
        reports.append(TruncationReport(layer.name, layer.tucker_shape, tuple(core.shape), error))
    FORMATS[format].write(out, converted, prefix=prefix if dotted else "")
    return reports
