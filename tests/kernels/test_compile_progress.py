"""The compile progress source counts what Numba really compiles: a fresh cached function once,
its load from the cache never, and only on the thread that listens."""
import importlib.util
import sys
import textwrap
import threading
from types import SimpleNamespace

import numba
import pytest
from numba.core import event

from kernels.compile_progress import COMPILE_EVENT, CompileProgress, counting_compiles

TOY_SOURCE = textwrap.dedent('''
    from numba import njit

    @njit(cache=True)
    def toy_inner(x):
        return x * 3

    @njit(cache=True)
    def toy_kernel(x):
        return toy_inner(x) + 1
''')


@pytest.fixture
def toy_path(tmp_path, monkeypatch):
    """A module of two cached functions, new to Numba, with a cache directory of its own."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba"))
    path = tmp_path / "toy_compile_progress.py"
    path.write_text(TOY_SOURCE)
    return path


def fresh_import(path):
    """The module loaded anew: new dispatchers, which compile or load from the cache on first call."""
    sys.modules.pop(path.stem, None)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_a_fresh_function_counts_with_its_callee_and_a_cache_load_does_not(toy_path):
    reports: list[CompileProgress] = []
    with counting_compiles(reports.append) as counter:
        assert fresh_import(toy_path).toy_kernel(2) == 7
    assert counter.compiled == 2            # toy_kernel, and toy_inner compiled while typing it
    assert reports[0] == CompileProgress(0, "toy_kernel")
    assert reports[1] == CompileProgress(0, "toy_kernel")     # the callee opens inside it
    assert reports[-1] == CompileProgress(2, "") and not reports[-1].active
    assert counter.progress.describe() == "2 compiled"
    assert list((toy_path.parent / "numba").rglob("*.nbi")), "the toy was not cached"

    with counting_compiles() as counter:
        assert fresh_import(toy_path).toy_kernel(5) == 16
    assert counter.compiled == 0            # loaded from the cache: nothing compiled


def test_compiles_on_another_thread_are_not_counted(toy_path):
    module = fresh_import(toy_path)
    with counting_compiles() as counter:
        worker = threading.Thread(target=module.toy_kernel, args=(1,))
        worker.start()
        worker.join()
    assert counter.compiled == 0
    assert module.toy_kernel.signatures, "the other thread did not compile"


def test_numbas_own_helpers_neither_count_nor_show():
    def impl():
        """Stands for a Numba helper, compiled in every process whatever the cache holds."""
    impl.__module__ = "numba.np.arrayobj"
    reports = []
    with counting_compiles(reports.append) as counter:
        with event.trigger_event(COMPILE_EVENT, data={"dispatcher": SimpleNamespace(py_func=impl)}):
            pass
    assert counter.compiled == 0 and reports == []


def test_a_kernel_being_compiled_is_named():
    assert CompileProgress(12, "qmatmul_kernel").describe() == "12 compiled, now qmatmul_kernel"
    assert CompileProgress(12, "qmatmul_kernel").active
