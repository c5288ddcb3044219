"""The ``ndlowrank`` command line: decompose, reconstruct, info, extract, demo, bad input, atomic writes.

``ndlowrank.cli.main`` runs in-process (``capsys`` holds what it prints); bad input must end in
``SystemExit(2)`` with exactly one ``ndlowrank: error: ...`` line on stderr, no traceback and no
output file (an existing one left byte for byte as it was).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy

import ndlowrank
from ndlowrank._files import FileError, atomic_path
from ndlowrank.cli import main
from ndlowrank.decompose import METHODS

from _helpers import einsum_tucker as reference_tucker

torch = pytest.importorskip("torch")

from safetensors.torch import save_file as save_torch  # noqa: E402
from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------


def einsum_tucker(core: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """The shared einsum reference, in float64 (the files hold float32 factors)."""
    return reference_tucker(core.astype(np.float64), [f.astype(np.float64) for f in factors])


def lowrank(shape, ranks, seed: int, noise: float = 1e-3, scale: float = 1.0) -> np.ndarray:
    """A float32 tensor of the given multilinear ranks plus a little noise."""
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(ranks)
    factors = [rng.standard_normal((i, r)) / np.sqrt(i) for i, r in zip(shape, ranks, strict=True)]
    x = scale * einsum_tucker(core, factors)
    return (x + noise * np.linalg.norm(x) / np.sqrt(x.size) * rng.standard_normal(shape)).astype(np.float32)


def relative_error(approx: np.ndarray, x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(np.linalg.norm(approx.astype(np.float64) - x) / np.linalg.norm(x))


def run(argv: list[str], capsys) -> str:
    """Run the command line; it must succeed silently on stderr. Returns stdout."""
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "", err
    return out


def fails(argv: list[str], capsys) -> str:
    """Run the command line on bad input: exit status 2, one error line, no traceback. Returns the line."""
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ndlowrank: error: "), err
    return lines[0]


def factors_file(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with safe_open(str(path), framework="np") as handle:
        header = json.loads(handle.metadata()["ndlowrank"])
    return header, load_file(str(path))


def table_rows(out: str, first: str) -> dict[str, list[str]]:
    """Rows of the table printed by the command line, keyed by their first column."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith("kept dense: "):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


# -- checkpoints --------------------------------------------------------------------------------

DECOMPOSED = {"conv.weight": (4, 4, 2, 2), "fc.weight": (5, 5)}
DENSE_FLOAT = ["fc.bias", "small.weight", "tall.weight"]  # 1-D, below --min-size, not smaller in Tucker form


def checkpoint() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "conv.weight": lowrank((24, 16, 3, 3), (4, 4, 2, 2), seed=1),
        "fc.weight": lowrank((64, 48), (5, 5), seed=2),
        "fc.bias": rng.standard_normal(64).astype(np.float32),
        "small.weight": lowrank((16, 12), (2, 2), seed=3),  # 192 elements
        "tall.weight": rng.standard_normal((400, 3)).astype(np.float32),  # full rank: kept dense
        "steps": rng.integers(0, 9, size=(4, 300)),  # not floating: kept dense
    }


def _nested(tensors: dict[str, torch.Tensor]) -> dict:
    state: dict = {"epoch": 3, "note": "not a tensor"}
    for name, value in tensors.items():
        *parents, leaf = name.split(".")
        node = state
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return state


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write ``tensors`` in the format of ``path``'s suffix; returns what reading it must give."""
    suffix = path.suffix
    if suffix == ".npz":
        np.savez(path, **tensors)
    elif suffix == ".npy":
        (value,) = tensors.values()
        np.save(path, value)
    elif suffix == ".safetensors":
        save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    elif suffix == ".pt":  # a state_dict inside nested dicts, with non-tensor entries
        torch.save(_nested({k: torch.from_numpy(v) for k, v in tensors.items()}), path)
    return tensors


def bf16_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file written by safetensors.torch with a bfloat16 tensor among float32 ones."""
    tensors = {k: torch.from_numpy(v) for k, v in checkpoint().items()}
    tensors["emb.weight"] = torch.from_numpy(lowrank((40, 32), (3, 3), seed=4)).to(torch.bfloat16)
    save_torch(tensors, str(path))
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()}


# -- decompose ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt", "bf16.safetensors"])
def test_decompose_with_tol_and_reconstruct_every_format(suffix, tmp_path, capsys):
    source = tmp_path / f"checkpoint{suffix}"
    if suffix == "bf16.safetensors":
        tensors = bf16_checkpoint(source)
        decomposed = {**DECOMPOSED, "emb.weight": (3, 3)}
    else:
        tensors = write_checkpoint(source, checkpoint())
        decomposed = DECOMPOSED
    factors = tmp_path / "factors.safetensors"
    out = run(["decompose", str(source), "-o", str(factors), "--tol", "0.05", "-q"], capsys)

    header, stored = factors_file(factors)
    assert header["format"] == "tucker-factors" and header["format_version"] == 1
    assert header["ndlowrank_version"] == ndlowrank.__version__
    assert set(header["tensors"]) == set(decomposed)
    assert set(header["dense"]) == set(tensors) - set(decomposed)
    for name, ranks in decomposed.items():
        entry = header["tensors"][name]
        assert entry["shape"] == list(tensors[name].shape)
        assert all(1 <= r <= true for r, true in zip(entry["ranks"], ranks, strict=True))  # noise is cut
        assert entry["dtype"] == "float32" and entry["method"] == "sthosvd"
        core = stored[f"{name}.core"]
        factors_ = [stored[f"{name}.factors.{n}"] for n in range(tensors[name].ndim)]
        assert list(core.shape) == entry["ranks"]
        assert [f.shape for f in factors_] == list(zip(entry["shape"], entry["ranks"], strict=True))
        error = relative_error(einsum_tucker(core, factors_), tensors[name])
        assert error <= 0.05
        assert entry["relative_error"] == pytest.approx(error, rel=1e-3, abs=1e-6)
    for name in header["dense"]:
        assert stored[name].dtype == tensors[name].dtype
        np.testing.assert_array_equal(stored[name], tensors[name])

    rows = table_rows(out, "tensor")
    assert list(rows) == [*sorted(set(decomposed) | {"tall.weight"}, key=list(tensors).index)]
    assert rows["tall.weight"][-1] == "kept dense"
    conv_ranks = header["tensors"]["conv.weight"]["ranks"]
    conv_size = math.prod(conv_ranks) + sum(i * r for i, r in zip((24, 16, 3, 3), conv_ranks, strict=True))
    assert rows["conv.weight"][:5] == [
        "conv.weight",
        "(24, 16, 3, 3)",
        str(tuple(conv_ranks)),
        "3,456",
        f"{conv_size:,}",
    ]
    assert float(rows["fc.weight"][-1]) == pytest.approx(
        header["tensors"]["fc.weight"]["relative_error"], rel=1e-3
    )
    assert f"\n{len(decomposed)} of {len(tensors)} tensors decomposed;" in out
    assert out.rstrip().endswith(f"wrote {factors}")

    for target in ("dense.npz", "dense.safetensors", "dense.pt"):
        path = tmp_path / target
        text = run(["reconstruct", str(factors), "-o", str(path)], capsys)
        assert f"reconstructed {len(decomposed)} tensors (+{len(header['dense'])} kept dense)" in text
        back = _read_back(path)
        assert set(back) == set(tensors)
        for name, value in tensors.items():
            assert back[name].shape == value.shape and back[name].dtype == value.dtype, name
            if name in decomposed:
                assert relative_error(back[name], value) <= 0.05
            else:
                np.testing.assert_array_equal(back[name], value)


def _read_back(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def test_decompose_npy_names_the_tensor_after_the_file(tmp_path, capsys):
    x = lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=5)
    np.save(tmp_path / "kernel.npy", x)
    factors = tmp_path / "f.safetensors"
    run(["decompose", str(tmp_path / "kernel.npy"), "-o", str(factors), "-q"], capsys)  # default tol 0.05
    header, stored = factors_file(factors)
    assert header["tensors"]["kernel"]["ranks"] == [4, 3, 2, 2]
    assert header["dense"] == []
    core, fs = stored["kernel.core"], [stored[f"kernel.factors.{n}"] for n in range(4)]
    assert relative_error(einsum_tucker(core, fs), x) <= 0.05


def test_decompose_ranks_one_int_is_clipped_per_mode(tmp_path, capsys):
    tensors = write_checkpoint(tmp_path / "c.npz", checkpoint())
    factors = tmp_path / "f.safetensors"
    out = run(["decompose", str(tmp_path / "c.npz"), "-o", str(factors), "--ranks", "5", "-q"], capsys)
    header, stored = factors_file(factors)
    assert header["tensors"]["conv.weight"]["ranks"] == [5, 5, 3, 3]
    assert header["tensors"]["fc.weight"]["ranks"] == [5, 5]
    assert "tall.weight" in header["dense"]  # ranks (3, 3) on (400, 3): not smaller
    for name in ("conv.weight", "fc.weight"):
        fs = [stored[f"{name}.factors.{n}"] for n in range(tensors[name].ndim)]
        error = relative_error(einsum_tucker(stored[f"{name}.core"], fs), tensors[name])
        assert header["tensors"][name]["relative_error"] == pytest.approx(error, rel=1e-3, abs=1e-6)
        assert error < 0.01
    assert table_rows(out, "tensor")["fc.weight"][2] == "(5, 5)"


@pytest.mark.parametrize(
    "method, rule",
    [*((m, "ranks") for m in METHODS), ("sthosvd", "tol"), ("hooi", "tol")],
)
def test_decompose_every_method(method, rule, tmp_path, capsys):
    x = lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=6, noise=1e-2)
    np.save(tmp_path / "k.npy", x)
    factors = tmp_path / "f.safetensors"
    how = ["--ranks", "4", "3", "2", "2"] if rule == "ranks" else ["--tol", "0.05"]
    run(["decompose", str(tmp_path / "k.npy"), "-o", str(factors), "--method", method, *how, "-q"], capsys)
    header, stored = factors_file(factors)
    entry = header["tensors"]["k"]
    assert entry["method"] == method
    assert entry["ranks"] == [4, 3, 2, 2]
    error = relative_error(einsum_tucker(stored["k.core"], [stored[f"k.factors.{n}"] for n in range(4)]), x)
    assert error <= 0.05
    assert entry["relative_error"] == pytest.approx(error, rel=1e-3, abs=1e-6)


def test_decompose_min_size(tmp_path, capsys):
    tensors = write_checkpoint(tmp_path / "c.npz", checkpoint())
    default, lowered = tmp_path / "default.safetensors", tmp_path / "lowered.safetensors"
    out = run(["decompose", str(tmp_path / "c.npz"), "-o", str(default), "-q"], capsys)
    assert "small.weight" not in table_rows(out, "tensor")
    header, stored = factors_file(default)
    assert "small.weight" in header["dense"]
    np.testing.assert_array_equal(stored["small.weight"], tensors["small.weight"])

    out = run(["decompose", str(tmp_path / "c.npz"), "-o", str(lowered), "--min-size", "100", "-q"], capsys)
    header, stored = factors_file(lowered)
    ranks = header["tensors"]["small.weight"]["ranks"]
    assert all(1 <= r <= 2 for r in ranks)
    assert "small.weight" not in header["dense"] and "small.weight" not in stored
    assert table_rows(out, "tensor")["small.weight"][2] == str(tuple(ranks))


# -- info ---------------------------------------------------------------------------------------


def test_info_on_a_factors_file(tmp_path, capsys):
    write_checkpoint(tmp_path / "c.npz", checkpoint())
    factors = tmp_path / "f.safetensors"
    run(["decompose", str(tmp_path / "c.npz"), "-o", str(factors), "-q"], capsys)
    header, _ = factors_file(factors)
    out = run(["info", str(factors)], capsys)
    assert out.startswith(
        f"{factors}: tucker-factors (format 1), written by ndlowrank {ndlowrank.__version__}"
    )
    rows = table_rows(out, "tensor")
    assert set(rows) == set(DECOMPOSED)
    assert rows["conv.weight"][1:4] == ["(24, 16, 3, 3)", "(4, 4, 2, 2)", "float32"]
    assert f"kept dense: {', '.join(header['dense'])}" in out


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)  # weight: 1,152 numbers
        self.fc = nn.Linear(16, 96)  # weight: 1,536 numbers
        self.mix = nn.Parameter(0.1 * torch.randn(3, 96, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))
        return torch.einsum("bo,eoi->bei", self.fc(h), self.mix)


def test_info_on_a_saved_adapter_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = nlnn.add_adapters(
        Small(), ["conv", "fc"], 4, target_parameters=["mix"], init="orthogonal", seed=0
    )
    path = tmp_path / "adapters.safetensors"
    nlnn.save_adapters(model, path)
    out = run(["info", str(path)], capsys)
    assert out.startswith(f"{path}: tucker-adapters (format 1)")
    rows = table_rows(out, "target")
    adapters = dict(nlnn.iter_adapters(model))
    assert set(rows) == set(adapters) == {"conv", "fc", "mix"}
    assert [rows[n][1] for n in ("conv", "fc", "mix")] == ["conv", "linear", "parameter"]
    assert rows["conv"][2:6] == ["(16, 8, 3, 3)", "(4, 4, 3, 3)", "orthogonal", "1.0"]
    for name, adapter in adapters.items():
        assert rows[name][-1] == f"{adapter.delta.n_params:,}"


# -- extract ------------------------------------------------------------------------------------


def _tuned_pair(tmp_path: Path) -> tuple[Small, Small, Path, Path]:
    """A base model (saved as .pt) and a tuned one (.safetensors): low-rank changes on conv and fc only."""
    torch.manual_seed(0)
    base = Small()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.conv.weight.add_(
            torch.from_numpy(lowrank((16, 8, 3, 3), (3, 3, 2, 2), seed=8, noise=0, scale=2.0))
        )
        tuned.fc.weight.add_(torch.from_numpy(lowrank((96, 16), (3, 3), seed=9, noise=0, scale=4.0)))
    base_path, tuned_path = tmp_path / "base.pt", tmp_path / "tuned.safetensors"
    torch.save(base.state_dict(), base_path)
    save_torch({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tuned_path))
    return base, tuned, base_path, tuned_path


@pytest.mark.parametrize(
    "rule, ranks",
    [
        (["--tol", "0.01"], {"conv.weight": [3, 3, 2, 2], "fc.weight": [3, 3]}),
        (["--ranks", "4"], {"conv.weight": [4, 4, 3, 3], "fc.weight": [4, 4]}),
        (["--budget", "600"], None),
    ],
    ids=["tol", "ranks", "budget"],
)
def test_extract_gives_adapters_that_reproduce_the_tuned_model(rule, ranks, tmp_path, capsys):
    base, tuned, base_path, tuned_path = _tuned_pair(tmp_path)
    out_path = tmp_path / "adapters.safetensors"
    out = run(["extract", str(base_path), str(tuned_path), "-o", str(out_path), *rule, "-q"], capsys)
    header, stored = factors_file(out_path)
    assert header["format"] == "tucker-adapters"
    got = {t["name"]: t["ranks"] for t in header["targets"]}
    assert set(got) == {"conv.weight", "fc.weight"}  # biases and the unchanged mix are left out
    assert all(t["kind"] == "parameter" for t in header["targets"])
    if ranks is not None:
        assert got == ranks
    total = sum(v.size for v in stored.values())
    if rule[0] == "--budget":
        assert total <= 600
    assert f"2 parameter adapters, {total:,} numbers" in out
    assert set(table_rows(out, "parameter")) == {"conv.weight", "fc.weight"}

    fresh = copy.deepcopy(base)
    nlnn.load_adapters(fresh, out_path)
    assert {n: list(a.ranks) for n, a in nlnn.iter_adapters(fresh)} == got
    x = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, before, have = tuned(x), base(x), fresh(x)
    change = float(torch.linalg.vector_norm(want - before))
    assert change > 0.1 * float(torch.linalg.vector_norm(want))  # the tuning matters
    assert float(torch.linalg.vector_norm(have - want)) <= 1e-4 * change
    assert f"{out_path}: tucker-adapters" in run(["info", str(out_path)], capsys)


def test_extract_budget_is_spread_and_respected_when_tight(tmp_path, capsys):
    _, _, base_path, tuned_path = _tuned_pair(tmp_path)
    minimum = (1 + 16 + 8 + 3 + 3) + (1 + 96 + 16)
    for budget in (minimum, minimum + 60, 300):
        out_path = tmp_path / f"budget{budget}.safetensors"
        run(
            ["extract", str(base_path), str(tuned_path), "-o", str(out_path), "--budget", str(budget), "-q"],
            capsys,
        )
        header, stored = factors_file(out_path)
        assert sum(v.size for v in stored.values()) <= budget
        if budget == minimum:
            assert all(set(t["ranks"]) == {1} for t in header["targets"])


# -- demo ---------------------------------------------------------------------------------------


def test_demo(tmp_path, capsys):
    from ndlowrank import _demo

    path = tmp_path / "demo.safetensors"
    start = time.perf_counter()
    out = run(["demo", "-o", str(path), "-q"], capsys)
    assert time.perf_counter() - start < 120
    lines = out.splitlines()
    assert lines[0].split() == ["model", "trainable", "accuracy"]
    assert lines[5] == ""
    rows = {row.split("  ")[0]: row.split() for row in lines[1:5]}
    assert list(rows) == [
        "pre-trained on A, tested on A",
        "task B: new head only",
        "task B: full fine-tune",
        "task B: Tucker adapters (rank 8) + new head",
    ]
    accuracy = {name: float(cells[-1].rstrip("%")) for name, cells in rows.items()}
    trainable = {name: int(cells[-2].replace(",", "")) for name, cells in rows.items()}
    assert accuracy["task B: Tucker adapters (rank 8) + new head"] > accuracy["task B: new head only"]
    assert all(0 <= value <= 100 for value in accuracy.values())
    assert trainable["task B: new head only"] == 32 * 4 + 4
    assert trainable["task B: new head only"] < trainable["task B: Tucker adapters (rank 8) + new head"]
    assert trainable["task B: Tucker adapters (rank 8) + new head"] < trainable["task B: full fine-tune"]
    assert f"The adapters and the new head were saved to {path}" in out
    model = nlnn.load_adapters(_demo._network(), path)
    assert {name: adapter.kind for name, adapter in nlnn.iter_adapters(model)} == {
        "0": "conv",
        "2": "conv",
        "4": "conv",
    }
    assert dict(nlnn.iter_adapters(model))["0"].ranks == (8, 1, 3, 3)


def test_version_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "ndlowrank", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ndlowrank {ndlowrank.__version__}"


# -- bad input ----------------------------------------------------------------------------------

Setup = Callable[[Path], tuple[list[str], Path | None]]


def _good_npy(tmp: Path) -> str:
    np.save(tmp / "good.npy", lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=0))
    return str(tmp / "good.npy")


def _garbage(tmp: Path, name: str) -> str:
    (tmp / name).write_bytes(b"\x93NUMPY but not really" + bytes(range(256)) * 4)
    return str(tmp / name)


def _pair(tmp: Path, edit: Callable[[dict], None] | None = None, tuned_edit=None) -> tuple[str, str]:
    base = {"w": lowrank((40, 30), (3, 3), seed=1), "b": np.zeros(40, np.float32)}
    tuned = {k: v.copy() for k, v in base.items()}
    tuned["w"] += lowrank((40, 30), (2, 2), seed=2, noise=0)
    if edit is not None:
        edit(base)
    if tuned_edit is not None:
        tuned_edit(tuned)
    np.savez(tmp / "base.npz", **base)
    np.savez(tmp / "tuned.npz", **tuned)
    return str(tmp / "base.npz"), str(tmp / "tuned.npz")


def _extract(tmp: Path, *options: str, **edits) -> tuple[list[str], Path]:
    base, tuned = _pair(tmp, **edits)
    out = tmp / "adapters.safetensors"
    return ["extract", base, tuned, "-o", str(out), "--min-size", "100", "-q", *options], out


def _decompose(source: str, out: Path, *options: str) -> tuple[list[str], Path]:
    return ["decompose", source, "-o", str(out), "-q", *options], out


def _plain_safetensors(tmp: Path) -> str:
    save_numpy({"w": np.ones((4, 4), np.float32)}, str(tmp / "plain.safetensors"))
    return str(tmp / "plain.safetensors")


def _adapter_file(tmp: Path) -> str:
    model = nlnn.add_adapters(nn.Sequential(nn.Linear(8, 4)), ["0"], 2, seed=0)
    nlnn.save_adapters(model, tmp / "adapters_in.safetensors")
    return str(tmp / "adapters_in.safetensors")


def _nan_npy(tmp: Path) -> str:
    x = lowrank((40, 30), (3, 3), seed=0)
    x[3, 4] = np.nan
    np.save(tmp / "nan.npy", x)
    return str(tmp / "nan.npy")


BAD: dict[str, tuple[Setup, str]] = {
    "missing input": (
        lambda t: _decompose(str(t / "missing.npy"), t / "f.safetensors"),
        r"missing\.npy: no such file",
    ),
    "unknown suffix": (
        lambda t: (
            (t / "data.txt").write_text("1 2 3") and _decompose(str(t / "data.txt"), t / "f.safetensors")
        ),
        r"data\.txt: unknown format \.txt; use one of \.npy",
    ),
    "garbage npy": (
        lambda t: _decompose(_garbage(t, "x.npy"), t / "f.safetensors"),
        r"x\.npy: cannot be read as \.npy",
    ),
    "garbage npz": (
        lambda t: _decompose(_garbage(t, "x.npz"), t / "f.safetensors"),
        r"x\.npz: cannot be read as \.npz",
    ),
    "garbage safetensors": (
        lambda t: _decompose(_garbage(t, "x.safetensors"), t / "f.safetensors"),
        r"x\.safetensors: cannot be read as \.safetensors",
    ),
    "garbage pt": (
        lambda t: _decompose(_garbage(t, "x.pt"), t / "f.safetensors"),
        r"x\.pt: cannot be read as \.pt",
    ),
    "output not safetensors": (
        lambda t: _decompose(_good_npy(t), t / "f.npz"),
        r"-o .*f\.npz: the output file must end in \.safetensors",
    ),
    "output directory missing": (
        lambda t: _decompose(_good_npy(t), t / "nowhere" / "f.safetensors"),
        r"the directory .*nowhere does not exist",
    ),
    "output is a directory": (
        lambda t: (t / "d.safetensors").mkdir() or (_decompose(_good_npy(t), t / "d.safetensors")[0], None),
        r"d\.safetensors is a directory",
    ),
    "ranks wrong count": (
        lambda t: _decompose(_good_npy(t), t / "f.safetensors", "--ranks", "2", "2"),
        r"--ranks gives 2 ranks but tensor 'good' has 4 modes",
    ),
    "ranks too large": (
        lambda t: _decompose(_good_npy(t), t / "f.safetensors", "--ranks", "2", "2", "4", "2"),
        r"tensor 'good': .*ranks\[2\]=4 .*size 3",
    ),
    "tol out of range": (
        lambda t: _decompose(_good_npy(t), t / "f.safetensors", "--tol", "1.5"),
        r"tensor 'good': tol=1\.5 is outside \(0, 1\)",
    ),
    "hosvd without ranks": (
        lambda t: _decompose(_good_npy(t), t / "f.safetensors", "--method", "hosvd"),
        r"--method hosvd needs --ranks",
    ),
    "randomized without ranks": (
        lambda t: _decompose(_good_npy(t), t / "f.safetensors", "--method", "randomized"),
        r"--method randomized needs --ranks",
    ),
    "sketch without ranks": (
        lambda t: _decompose(_good_npy(t), t / "f.safetensors", "--method", "sketch"),
        r"--method sketch needs --ranks",
    ),
    "nothing floating": (
        lambda t: (
            np.save(t / "ints.npy", np.ones((40, 40), np.int64))
            or _decompose(str(t / "ints.npy"), t / "f.safetensors")
        ),
        r"no floating tensor with >= 2 modes and >= 1024 elements",
    ),
    "nan in decompose": (
        lambda t: _decompose(_nan_npy(t), t / "f.safetensors", "--min-size", "100"),
        r"tensor 'nan': .*NaN or Inf",
    ),
    "extract mismatched keys": (
        lambda t: _extract(t, edit=lambda base: base.update(extra=np.ones((2, 2), np.float32))),
        r"hold different tensors \(1 unmatched: extra\)",
    ),
    "extract mismatched shapes": (
        lambda t: _extract(t, tuned_edit=lambda tuned: tuned.update(b=np.zeros(41, np.float32))),
        r"tensor 'b' has shape \(40,\) in BASE but \(41,\) in TUNED",
    ),
    "extract identical": (
        lambda t: _identical(t),
        r"no tensor with >= 2 modes and >= 100 elements differs between BASE and TUNED",
    ),
    "extract budget below minimum": (
        lambda t: _extract(t, "--budget", "50"),
        r"--budget 50 is below 71, the size of every adapter at ranks 1",
    ),
    "extract ranks wrong count": (
        lambda t: _extract(t, "--ranks", "2", "2", "2"),
        r"--ranks gives 3 ranks but tensor 'w' has 2 modes",
    ),
    "extract garbage tuned": (
        lambda t: (lambda argv, out: ([*argv[:2], _garbage(t, "tuned.pt"), *argv[3:]], out))(*_extract(t)),
        r"tuned\.pt: cannot be read as \.pt",
    ),
    "extract output directory missing": (
        lambda t: (lambda argv, out: ([*argv[:4], str(t / "nowhere" / "a.safetensors"), *argv[5:]], None))(
            *_extract(t)
        ),
        r"the directory .*nowhere does not exist",
    ),
    "reconstruct non-ndlowrank safetensors": (
        lambda t: (["reconstruct", _plain_safetensors(t), "-o", str(t / "dense.npz")], t / "dense.npz"),
        r"plain\.safetensors is not an ndlowrank file \(no 'ndlowrank' metadata\)",
    ),
    "reconstruct an adapter file": (
        lambda t: (["reconstruct", _adapter_file(t), "-o", str(t / "dense.npz")], t / "dense.npz"),
        r"holds tucker-adapters, not Tucker factors",
    ),
    "reconstruct not safetensors": (
        lambda t: (["reconstruct", _good_npy(t), "-o", str(t / "dense.npz")], t / "dense.npz"),
        r"a factors file is a \.safetensors file",
    ),
    "info missing file": (
        lambda t: (["info", str(t / "missing.safetensors")], None),
        r"missing\.safetensors: no such file",
    ),
    "info garbage": (
        lambda t: (["info", _garbage(t, "junk.safetensors")], None),
        r"junk\.safetensors: cannot be read as \.safetensors",
    ),
    "demo output not safetensors": (
        lambda t: (["demo", "-o", str(t / "demo.pt"), "-q"], t / "demo.pt"),
        r"demo\.pt: the output file must end in \.safetensors",
    ),
}


def _identical(t: Path) -> tuple[list[str], Path]:
    return _extract(t, tuned_edit=lambda tuned: tuned.update(w=lowrank((40, 30), (3, 3), seed=1)))


def _check_bad_input(setup: Setup, pattern: str, tmp_path: Path, capsys, existing: bool) -> None:
    argv, output = setup(tmp_path)
    assert not existing or (output is not None and output.parent.is_dir() and not output.exists())
    precious = b"an earlier result\x00\xff"
    if existing:
        output.write_bytes(precious)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    line = fails(argv, capsys)
    assert re.search(pattern, line), line
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no output, no temporary file, nothing changed
    if output is not None:
        assert output.exists() == existing


NO_OUTPUT_FILE = {
    "output directory missing",
    "output is a directory",
    "extract output directory missing",
    "info missing file",
    "info garbage",
}
BAD_CASES = [
    pytest.param(
        case,
        existing,
        id=f"{case}-{'existing-output' if existing else 'fresh'}",
    )
    for case in BAD
    for existing in ([False] if case in NO_OUTPUT_FILE else [False, True])
]


@pytest.mark.parametrize("case, existing", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_no_output(case, existing, tmp_path, capsys):
    setup, pattern = BAD[case]
    _check_bad_input(setup, pattern, tmp_path, capsys, existing)


# -- bugs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing-output"])
def test_extract_output_must_be_safetensors(existing, tmp_path, capsys):
    def setup(t: Path) -> tuple[list[str], Path]:
        argv, _ = _extract(t)
        return [*argv[:4], str(t / "adapters.npz"), *argv[5:]], t / "adapters.npz"

    _check_bad_input(setup, r"adapters\.npz.*\.safetensors", tmp_path, capsys, existing)


def test_extract_budget_with_nan_is_bad_input(tmp_path, capsys):
    def setup(t: Path) -> tuple[list[str], Path]:
        def poison(tuned: dict) -> None:
            tuned["w"][0, 0] = np.nan

        return _extract(t, "--budget", "500", tuned_edit=poison)

    _check_bad_input(setup, r"NaN", tmp_path, capsys, existing=False)


def test_extract_tol_with_nan_is_bad_input(tmp_path, capsys):
    def setup(t: Path) -> tuple[list[str], Path]:
        def poison(tuned: dict) -> None:
            tuned["w"][0, 0] = np.nan

        return _extract(t, tuned_edit=poison)

    _check_bad_input(setup, r"tensor 'w': .*NaN or Inf", tmp_path, capsys, existing=False)


def test_demo_output_directory_missing_is_bad_input(tmp_path, capsys, monkeypatch):
    from ndlowrank import _demo

    monkeypatch.setattr(_demo, "_train", lambda *args, **kwargs: None)  # the training is beside the point
    real_make_task = _demo.make_task
    monkeypatch.setattr(_demo, "make_task", lambda task, count, seed: real_make_task(task, 8, seed))
    line = fails(["demo", "-o", str(tmp_path / "nowhere" / "demo.safetensors"), "-q"], capsys)
    assert "nowhere" in line
    assert list(tmp_path.iterdir()) == []


# -- atomic_path --------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True])
def test_atomic_path_failing_writer_leaves_no_trace(error, existing, tmp_path):
    target = tmp_path / "out.bin"
    if existing:
        target.write_bytes(b"the old file")
    with pytest.raises(error):
        with atomic_path(target) as temporary:
            assert temporary.parent == tmp_path and temporary != target
            temporary.write_bytes(b"half written")
            raise error("writer failed")
    assert [p.name for p in tmp_path.iterdir()] == (["out.bin"] if existing else [])
    if existing:
        assert target.read_bytes() == b"the old file"


@pytest.mark.parametrize("writer", ["in place", "recreated 0600"])
@pytest.mark.parametrize("existing", [False, True])
def test_atomic_path_gives_normal_permissions(writer, existing, tmp_path, umask_022):
    target = tmp_path / "out.bin"
    if existing:
        target.write_bytes(b"old")
        target.chmod(0o600)
    with atomic_path(target) as temporary:
        if writer == "in place":
            temporary.write_bytes(b"new")
        else:  # like writers that create their file with 0600
            temporary.unlink()
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"new")
            os.close(fd)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == umask_022
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_files_written_by_the_command_line_have_normal_permissions(tmp_path, capsys, umask_022):
    factors = tmp_path / "f.safetensors"
    run(["decompose", _good_npy(tmp_path), "-o", str(factors), "-q"], capsys)
    assert stat.S_IMODE(factors.stat().st_mode) == umask_022
    dense = tmp_path / "dense.pt"
    run(["reconstruct", str(factors), "-o", str(dense)], capsys)
    assert stat.S_IMODE(dense.stat().st_mode) == umask_022


def test_atomic_path_refuses_a_directory_or_a_missing_parent(tmp_path):
    with pytest.raises(FileError, match="is a directory"):
        with atomic_path(tmp_path):
            pass
    with pytest.raises(FileError, match=r"the directory .*nowhere does not exist"):
        with atomic_path(tmp_path / "nowhere" / "x.bin"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["randomized", "sketch"])
def test_random_methods_give_the_same_factors_every_run(method, tmp_path, capsys):
    x = lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=6, noise=1e-2)
    np.save(tmp_path / "k.npy", x)
    stored = []
    for run_ in range(2):
        out = tmp_path / f"f{run_}.safetensors"
        run(
            ["decompose", str(tmp_path / "k.npy"), "-o", str(out), "--method", method, "--ranks", "4", "-q"],
            capsys,
        )
        stored.append(factors_file(out)[1])
    for key in stored[0]:
        np.testing.assert_array_equal(stored[0][key], stored[1][key])
