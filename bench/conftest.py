"""Benchmark fixtures: ``twin`` runs a benchmark once per implementation of a hot path."""

import pytest

from engine import speedups


@pytest.fixture(params=["compiled", "pure"])
def twin(request):
    """``twin("reader")`` returns the module; the compiled case is skipped when not built."""
    pure = request.param == "pure"

    def load(name):
        module = speedups.load(name, pure=pure)
        if not pure and not module.__name__.startswith("engine._compiled."):
            pytest.skip(f"compiled {name} not built")
        return module

    return load


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here (pyproject's python_files only names test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
