"""Commands that load a model refuse a plan that overfills a GPU before loading anything, with
the verdict and the ways out; --ignore-fit is the explicit override."""
import pytest

from app.cli import main


@pytest.fixture
def model(fixtures_dir):
    return fixtures_dir / "llama-moe" / "Q4_K_M.gguf"


def test_a_gpu_over_its_memory_is_refused_with_the_verdict(model, capsys):
    # 452 MiB cannot hold the CUDA context (450 MiB) plus the layers and their compute buffers
    code = main(["run", "-m", str(model), "-p", "Hello", "-n", "1", "--temp", "0", "--sim-gpus", "452MiB",
                 "-ngl", "99"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: Does not fit: CUDA0 over by " in err and "Nothing was loaded" in err
    assert "--ignore-fit" in err and "-ngl" in err


def test_ignore_fit_loads_it_anyway(model, capsys):
    code = main(["run", "-m", str(model), "-p", "Hello", "-n", "1", "--temp", "0", "--sim-gpus", "452MiB",
                 "-ngl", "99", "--ignore-fit"])
    assert code == 0, capsys.readouterr().err
