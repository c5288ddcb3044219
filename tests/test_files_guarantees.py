"""Files and the command line: nothing lost, nothing half-done, a clear error for every bad file.

The output may not be the input; two tensors never share a flattened name; metadata fields
are validated before use; a writer's failure (a full disk) is an ``OSError`` and a
one-line CLI error; temporary files of killed writes are cleaned up by the next write.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file as save_numpy

from ndlowrank._files import STALE_AFTER_S, FileError, read_tensors, remove_stale_temporaries, write_tensors

torch = pytest.importorskip("torch")

from test_cli import fails, lowrank, run  # noqa: E402
from torch import nn  # noqa: E402

from ndlowrank import nn as nlnn  # noqa: E402
from ndlowrank.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


# -- class 1: the output may not be an input ----------------------------------------------------


def _factors(tmp: Path, capsys) -> Path:
    if not (tmp / "w.safetensors").exists():
        save_numpy({"w": lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=0)}, str(tmp / "w.safetensors"))
    run(["decompose", str(tmp / "w.safetensors"), "-o", str(tmp / "f.safetensors"), "-q"], capsys)
    return tmp / "f.safetensors"


@pytest.mark.parametrize(
    "command",
    ["decompose same", "decompose relative", "decompose symlink", "decompose hardlink", "reconstruct",
     "extract base", "extract tuned"],
)  # fmt: skip
def test_output_that_is_an_input_is_refused(command, tmp_path, capsys, monkeypatch):
    x = lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=0)
    source = tmp_path / "w.safetensors"
    save_numpy({"w": x}, str(source))
    if command == "reconstruct":
        factors = _factors(tmp_path, capsys)
        argv = ["reconstruct", str(factors), "-o", str(factors)]
    elif command.startswith("extract"):
        tuned = tmp_path / "t.safetensors"
        save_numpy({"w": x + 1}, str(tuned))
        output = str(source) if command == "extract base" else str(tuned)
        argv = ["extract", str(source), str(tuned), "-o", output, "-q", "--min-size", "10"]
    else:
        output = str(source)
        if command == "decompose relative":
            monkeypatch.chdir(tmp_path)
            output = "./sub/../w.safetensors"
            (tmp_path / "sub").mkdir()
        elif command == "decompose symlink":
            output = str(tmp_path / "link.safetensors")
            os.symlink(source, output)
        elif command == "decompose hardlink":
            output = str(tmp_path / "hard.safetensors")
            os.link(source, output)
        argv = ["decompose", str(source), "-o", output, "-q"]
    before = _snapshot(tmp_path)
    line = fails(argv, capsys)
    assert "is the input file" in line and "another output file" in line, line
    assert _snapshot(tmp_path) == before


# -- class 3: no tensor is lost to a name clash --------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        lambda a, b: {"a.b": a, "a": {"b": b}},
        lambda a, b: {"a": {"b": a}, "a.b": b},
        lambda a, b: {"x": {"0": a}, "x.0": b},
        lambda a, b: {"x": [a], "x.0": b},
    ],
    ids=["dotted-then-nested", "nested-then-dotted", "nested-digit", "list"],
)
def test_checkpoint_names_that_flatten_alike_are_refused(state, tmp_path, capsys):
    a, b = (torch.from_numpy(lowrank((40, 30), (2, 2), seed=s)) for s in (1, 2))
    path = tmp_path / "clash.pt"
    torch.save(state(a, b), path)
    with pytest.raises(FileError, match="two tensors flatten to the name"):
        read_tensors(path)
    line = fails(["decompose", str(path), "-o", str(tmp_path / "f.safetensors"), "-q"], capsys)
    assert "two tensors flatten" in line
    assert not (tmp_path / "f.safetensors").exists()


def test_list_of_tensors_in_a_checkpoint_is_read_not_dropped(tmp_path):
    a, b = torch.ones(3, 4), torch.zeros(5, 2)
    torch.save({"layers": [a, {"w": b}], "epoch": 3}, tmp_path / "list.pt")
    tensors = read_tensors(tmp_path / "list.pt")
    assert sorted(tensors) == ["layers.0", "layers.1.w"]
    np.testing.assert_array_equal(tensors["layers.1.w"], b.numpy())


def test_dense_tensor_named_like_a_factor_is_refused(tmp_path, capsys):
    x = lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=0)
    save_numpy({"w": x, "w.core": np.ones(3, np.float32)}, str(tmp_path / "w.safetensors"))
    line = fails(
        ["decompose", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "f.safetensors"), "-q"], capsys
    )
    assert "'w.core'" in line and "kept dense" in line
    assert not (tmp_path / "f.safetensors").exists()


# -- class 10: metadata fields are validated before use ------------------------------------------


class Raw(str):
    """Metadata text to store as is (not the edited header)."""


def _with_header(tmp: Path, source: Path, edit) -> Path:
    """A copy of ``source`` whose ndlowrank metadata went through ``edit`` (which may return a raw string)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(source), framework="np") as handle:
        metadata = dict(handle.metadata())
    header = json.loads(metadata["ndlowrank"])
    edited = edit(header)
    metadata["ndlowrank"] = edited if isinstance(edited, Raw) else json.dumps(header)
    path = tmp / "edited.safetensors"
    save_numpy(load_file(str(source)), str(path), metadata=metadata)
    return path


def _entry(header):
    return next(iter(header["tensors"].values()))


FACTORS_EDITS = {
    "no tensors": (lambda h: h.pop("tensors"), r"'tensors' must be a JSON object"),
    "tensors a list": (lambda h: h.update(tensors=[1]), r"'tensors' must be a JSON object"),
    "dense not a list": (lambda h: h.update(dense="w"), r"'dense' must be a list"),
    "dense names a missing tensor": (lambda h: h.update(dense=["ghost"]), r"'ghost' is missing"),
    "no dtype": (lambda h: _entry(h).pop("dtype"), r"dtype must be a string, got None"),
    "dtype int": (lambda h: _entry(h).update(dtype="int8"), r"dtype must be float16, float32 or float64"),
    "dtype garbage": (lambda h: _entry(h).update(dtype="banana"), r"dtype must be float16"),
    "no relative_error": (
        lambda h: _entry(h).pop("relative_error"),
        r"relative_error must be a finite number",
    ),
    "relative_error string": (lambda h: _entry(h).update(relative_error="0.1"), r"relative_error must be"),
    "relative_error negative": (
        lambda h: _entry(h).update(relative_error=-0.1),
        r"relative_error must be >= 0",
    ),
    "shape wrong": (lambda h: _entry(h).update(shape=[24, 16, 3]), r"ranks=\[.*\] has not one rank per mode"),
    "shape negative": (lambda h: _entry(h).update(shape=[24, -16, 3, 3]), r"shape must be a non-empty list"),
    "ranks too large": (lambda h: _entry(h).update(ranks=[4, 3, 2, 9]), r"ranks\[3\]=9 exceeds dimension 3"),
    "ranks disagree with tensors": (
        lambda h: _entry(h).update(ranks=[3, 3, 2, 2]),
        r"has shape .*, expected",
    ),
    "entry not an object": (lambda h: h["tensors"].update(w=[1, 2]), r"the entry must be a JSON object"),
    "not JSON": (lambda h: Raw("{not json"), r"metadata is not valid JSON"),
    "JSON list": (lambda h: Raw("[1, 2]"), r"metadata must be a JSON object, got list"),
    "format_version": (lambda h: h.update(format_version=7), r"format_version 7 is not supported"),
}


TENSOR_CASES = {"dense names a missing tensor", "ranks disagree with tensors"}  # info reads the metadata only


@pytest.mark.parametrize(
    "case, command",
    [(case, "reconstruct") for case in FACTORS_EDITS]
    + [(case, "info") for case in FACTORS_EDITS if case not in TENSOR_CASES],
)
def test_factors_file_metadata_is_validated(case, command, tmp_path, capsys):
    edit, pattern = FACTORS_EDITS[case]
    path = _with_header(tmp_path, _factors(tmp_path, capsys), edit)
    argv = (
        ["reconstruct", str(path), "-o", str(tmp_path / "dense.npz")]
        if command == "reconstruct"
        else ["info", str(path)]
    )
    line = fails(argv, capsys)
    assert re.search(pattern, line), line
    assert not (tmp_path / "dense.npz").exists()


def _adapters(tmp: Path) -> Path:
    model = nlnn.add_adapters(nn.Sequential(nn.Linear(8, 4)), ["0"], 2, seed=0)
    nlnn.save_adapters(model, tmp / "a.safetensors")
    return tmp / "a.safetensors"


ADAPTER_EDITS = {
    "no targets": (lambda h: h.pop("targets"), r"'targets' must be a non-empty list"),
    "targets an object": (lambda h: h.update(targets={"a": 1}), r"'targets' must be a non-empty list"),
    "entry a number": (lambda h: h.update(targets=[3]), r"an adapter entry must be a JSON object"),
    "ranks missing": (lambda h: h["targets"][0].pop("ranks"), r"ranks must be a non-empty list"),
    "ranks strings": (lambda h: h["targets"][0].update(ranks=["2", "2"]), r"ranks must be a non-empty list"),
    "ranks too many": (lambda h: h["targets"][0].update(ranks=[2, 2, 2]), r"has not one rank per mode"),
    "weight_shape missing": (lambda h: h["targets"][0].pop("weight_shape"), r"weight_shape must be"),
    "scale huge": (lambda h: h["targets"][0].update(scale=1e308), r"scale=1e\+308 is too large"),
    "scale string": (lambda h: h["targets"][0].update(scale="2"), r"scale must be a real number"),
    "name missing": (lambda h: h["targets"][0].pop("name"), r"an adapter's name must be a string"),
}


@pytest.mark.parametrize("case", list(ADAPTER_EDITS))
def test_adapter_file_metadata_is_validated_by_info(case, tmp_path, capsys):
    edit, pattern = ADAPTER_EDITS[case]
    path = _with_header(tmp_path, _adapters(tmp_path), edit)
    line = fails(["info", str(path)], capsys)
    assert re.search(pattern, line), line


def test_scale_beyond_float_range_in_an_adapter_file_is_refused_on_load(tmp_path):
    source = _adapters(tmp_path)
    huge = '"scale": 1' + "0" * 400
    raw = _with_header(tmp_path, source, lambda h: Raw(json.dumps(h).replace('"scale": 1.0', huge)))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        nlnn.load_adapters(nn.Sequential(nn.Linear(8, 4)), raw)


# -- unclear messages of files --------------------------------------------------------------------


def test_a_directory_input_says_directory(tmp_path, capsys):
    (tmp_path / "d.npz").mkdir()
    line = fails(["decompose", str(tmp_path / "d.npz"), "-o", str(tmp_path / "f.safetensors"), "-q"], capsys)
    assert "is a directory" in line
    (tmp_path / "i.safetensors").mkdir()
    assert "is a directory" in fails(["info", str(tmp_path / "i.safetensors")], capsys)


def test_metadata_that_is_not_json_says_so(tmp_path, capsys):
    save_numpy(
        {"w": np.ones((2, 2), np.float32)}, str(tmp_path / "x.safetensors"), metadata={"ndlowrank": "{oops"}
    )
    line = fails(["info", str(tmp_path / "x.safetensors")], capsys)
    assert "is not valid JSON" in line and "no 'ndlowrank' metadata" not in line


# -- class 11: a full disk is an OSError; killed writes leave nothing for long -----------------

FULL_DISK = """
import resource, signal, sys
import numpy as np
sys.path.insert(0, {repo!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
{body}
"""


def _write_beyond_the_limit(body: str, tmp: Path) -> subprocess.CompletedProcess:
    script = FULL_DISK.format(repo=str(REPO), body=body)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_FSIZE (Linux)")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_cli_write_that_fails_part_way_is_one_line_and_leaves_nothing(suffix, tmp_path, capsys):
    np.save(tmp_path / "w.npy", lowrank((64, 64), (64, 64), seed=0, noise=0))
    (tmp_path / f"dense{suffix}").write_bytes(b"precious")
    factors = tmp_path / "f.safetensors"
    body = (
        "from ndlowrank.cli import main\n"
        "main(['decompose', 'w.npy', '-o', 'f.safetensors', '-q', '--ranks', '64'])\n"
        if suffix == ".safetensors"
        else "from ndlowrank.cli import main\n"
        f"main(['reconstruct', 'f.safetensors', '-o', 'dense{suffix}'])\n"
    )
    if suffix != ".safetensors":
        x = lowrank((64, 64), (60, 60), seed=0, noise=0)
        save_numpy({"w": x}, str(tmp_path / "big.safetensors"))
        run(
            ["decompose", str(tmp_path / "big.safetensors"), "-o", str(factors), "-q", "--ranks", "30"],
            capsys,
        )
    before = _snapshot(tmp_path)
    result = _write_beyond_the_limit(body, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("ndlowrank: error: ") and "cannot be written" in lines[0]
    ), lines
    assert _snapshot(tmp_path) == before  # no temporary file, the old output untouched


@pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_FSIZE (Linux)")
def test_save_adapters_that_fails_part_way_raises_oserror(tmp_path):
    body = (
        "import errno, torch\n"
        "from torch import nn\n"
        "from ndlowrank import nn as nlnn\n"
        "model = nlnn.add_adapters(nn.Sequential(nn.Linear(256, 256)), ['0'], 64, seed=0)\n"
        "try:\n"
        "    nlnn.save_adapters(model, 'a.safetensors')\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno == errno.EFBIG, exc.filename)\n"
    )
    result = _write_beyond_the_limit(body, tmp_path)
    assert result.stdout.split() == ["OSError", "True", "a.safetensors"], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_write_tensors_wraps_a_writer_error_naming_the_file(tmp_path, monkeypatch):
    import safetensors.numpy

    def broken(*args, **kwargs):
        raise RuntimeError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(FileError, match=r"out\.safetensors: cannot be written \(.*No space left on device"):
        write_tensors(tmp_path / "out.safetensors", {"w": np.ones(3)})
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.skipif(os.name != "posix", reason="stale temporaries are found by process id on POSIX")
def test_stale_temporaries_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.safetensors"
    old = time.time() - 2 * STALE_AFTER_S
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.safetensors.{dead}-0123456789ab.tmp"
    recent = tmp_path / f".out.safetensors.{dead}-ba9876543210.tmp"  # too young: maybe still being written
    running = tmp_path / f".out.safetensors.{alive}-aaaaaaaaaaaa.tmp"  # its writer is alive
    other = tmp_path / f".other.safetensors.{dead}-0123456789ab.tmp"  # another target's
    impossible = tmp_path / f".out.safetensors.{10**30}-0123456789ab.tmp"  # no process has that id
    foreign = tmp_path / ".out.safetensors.notours.tmp"  # not our naming
    for path in (stale, recent, running, other, foreign, impossible):
        path.write_bytes(b"partial")
    for path in (stale, running, other, foreign, impossible):
        os.utime(path, (old, old))
    write_tensors(target, {"w": np.ones(3, np.float32)})
    assert not stale.exists() and not impossible.exists()
    assert all(p.exists() for p in (recent, running, other, foreign))
    assert remove_stale_temporaries(target) == []
    # a killed save_adapters is cleaned up the same way
    stale.write_bytes(b"partial")
    os.utime(stale, (old, old))
    nlnn.save_adapters(nlnn.add_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"], 2, seed=0), target)
    assert not stale.exists()


@pytest.mark.parametrize("command", ["decompose", "extract"])
def test_negative_min_size_is_refused(command, tmp_path, capsys):
    x = lowrank((24, 16), (4, 3), seed=0)
    save_numpy({"w": x}, str(tmp_path / "w.safetensors"))
    save_numpy({"w": x + 1}, str(tmp_path / "t.safetensors"))
    inputs = [str(tmp_path / "w.safetensors")] + (
        [str(tmp_path / "t.safetensors")] if command == "extract" else []
    )
    line = fails([command, *inputs, "-o", str(tmp_path / "o.safetensors"), "--min-size", "-5"], capsys)
    assert "--min-size -5 must be >= 0" in line


def test_a_tolerance_below_float32_is_one_warning_line(tmp_path, capsys):
    save_numpy({"w": lowrank((24, 16, 3, 3), (4, 3, 2, 2), seed=0), "v": lowrank((40, 30), (3, 3), seed=1)},
               str(tmp_path / "w.safetensors"))  # fmt: skip
    capsys.readouterr()
    argv = [
        "decompose",
        str(tmp_path / "w.safetensors"),
        "-o",
        str(tmp_path / "f.safetensors"),
        "-q",
        "--tol",
        "1e-7",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err  # one line, once for both tensors
    assert err[0].startswith("ndlowrank: warning: tol=1e-07 is below what float32 can reach"), err


@pytest.mark.parametrize("kind", ["same", "hardlink"])
def test_convert_refuses_a_target_that_is_its_input(kind, tmp_path, capsys):
    source = tmp_path / "lora.safetensors"
    save_numpy({"w": np.ones((4, 4), np.float32)}, str(source))
    target = source if kind == "same" else tmp_path / "hard.safetensors"
    if kind == "hardlink":
        os.link(source, target)
    before = _snapshot(tmp_path)
    line = fails(["convert", str(source), str(target), "--to", "kohya"], capsys)
    assert "is the input file" in line
    assert _snapshot(tmp_path) == before
