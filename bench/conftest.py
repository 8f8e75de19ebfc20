"""Benchmark fixtures: ``twin`` runs a benchmark once per implementation of a hot path."""

import pytest

from engine import speedups


@pytest.fixture(params=["compiled", "pure"])
def twin(request):
    """``twin("reader")`` returns the module; the compiled case is skipped when not built."""

    def load(name):
        try:
            return speedups.load_exact(name, request.param)
        except ImportError:
            pytest.skip(f"compiled {name} not built")

    return load


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here (pyproject's python_files only names test_*.py)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
