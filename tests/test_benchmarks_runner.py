"""The benchmark runner (``python -m benchmarks``) and the RESULTS.md section writer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run as runner
from benchmarks._common import interleaved_medians, write_section


def test_a_benchmark_without_its_peers_is_skipped_with_the_install_command(tmp_path):
    benchmark = runner.Benchmark("x", (str(tmp_path / "never_run.py"),), ("no_such_module_ndlowrank",), "x")
    outcome = runner.run_one(benchmark, quick=True)
    assert outcome.status == f"skipped: no_such_module_ndlowrank not installed ({runner.INSTALL})"
    assert outcome.seconds == 0.0


@pytest.mark.parametrize(("code", "status"), [(0, "ok"), (3, "failed (exit 3)")])
def test_run_one_reports_the_exit_status_and_passes_quick(tmp_path, code, status):
    seen = tmp_path / "argv.txt"
    script = tmp_path / "bench.py"
    script.write_text(
        f"import sys\nopen({str(seen)!r}, 'w').write(' '.join(sys.argv[1:]))\nsys.exit({code})\n"
    )
    outcome = runner.run_one(runner.Benchmark("x", (str(script),), (), "x"), quick=True)
    assert outcome.status == status
    assert outcome.seconds > 0
    assert seen.read_text() == "--quick"


def test_summary_lists_every_outcome():
    a, b = (runner.Benchmark(name, (), (), f"about {name}") for name in ("a", "b"))
    text = runner.summary([runner.Outcome(a, "ok", 12.4), runner.Outcome(b, "skipped: y")], quick=True)
    assert "`python -m benchmarks --quick`" in text
    assert "| a | about a | ok | 12 s |" in text
    assert "| b | about b | skipped: y | – |" in text


def test_every_benchmark_script_exists():
    root = Path(runner.__file__).resolve().parents[1]
    for benchmark in runner.BENCHMARKS:
        target = benchmark.command[-1]
        path = root / (target if target.endswith(".py") else target.replace(".", "/"))
        assert path.exists() or path.with_suffix(".py").exists(), benchmark  # a package or a module


def test_list_and_bad_choices(capsys):
    assert runner.main(["--list"]) == 0
    assert set(runner.NAMES) <= set(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as excinfo:
        runner.main(["--only", "decompose", "--skip", "decompose"])
    assert excinfo.value.code == 2
    assert "leave no benchmark" in capsys.readouterr().err


def test_write_section_replaces_in_place_and_appends_new(tmp_path):
    results = tmp_path / "RESULTS.md"
    write_section("one", "first", results)
    write_section("two", "second", results)
    write_section("one", "first again", results)
    text = results.read_text()
    assert text.count("<!-- one:start -->") == 1
    assert text.index("first again") < text.index("second")
    assert "first\n" not in text
    assert not results.with_suffix(".md.tmp").exists()


def test_interleaved_medians_runs_every_contender_in_changing_orders():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    medians = interleaved_medians(contenders, repeats=6)
    assert set(medians) == set("abcd") and all(t >= 0 for t in medians.values())
    assert calls[:4] == list("abcd")  # the warm-up, in the given order
    rounds = [tuple(calls[4 + 4 * i : 8 + 4 * i]) for i in range(6)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    followers = {r[r.index("a") + 1] for r in rounds if r[-1] != "a"}
    assert len(set(rounds)) > 1 and len(followers) > 1  # "a" is not always followed by the same one
