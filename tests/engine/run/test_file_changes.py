"""A model file truncated or replaced while a model runs ends in ModelFileChangedError, never a
SIGBUS. The truncation inside a layer runs in a subprocess: if the guard failed, the bus error
would kill that process, not the test run."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from engine.gguf.model_file import ModelFileChangedError
from engine.run.model import Model


@pytest.fixture
def model_copy(tmp_path, fixtures_dir):
    return shutil.copy(fixtures_dir / "llama-dense/F32.gguf", tmp_path / "m.gguf")


def test_a_truncated_file_is_noticed_before_it_is_read(model_copy):
    model = Model.load(model_copy)
    model.eval_logits([1, 2, 3])
    with open(model_copy, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ModelFileChangedError, match="changed on disk while it was in use .*shrank"):
        model.eval_logits([4])


def test_a_replaced_file_is_noticed(model_copy, fixtures_dir):
    model = Model.load(model_copy)
    replacement = model_copy.with_name("new.gguf")
    shutil.copy(fixtures_dir / "llama-dense/F16.gguf", replacement)
    os.replace(replacement, model_copy)
    with pytest.raises(ModelFileChangedError, match="changed on disk while it was in use"):
        model.eval_logits([1])


TRUNCATE_INSIDE_A_LAYER = textwrap.dedent("""
    import sys
    from engine.run.model import Model
    from engine.gguf.model_file import ModelFileChangedError
    model = Model.load(sys.argv[1])
    forward = model.family.forward_layer
    def truncating_forward(m, il, x, batch):
        if il == 0:
            with open(sys.argv[1], "r+b") as f:
                f.truncate(4096)        # the weights of this very layer now lie past the end
        return forward(m, il, x, batch)
    model.family = type("Family", (), {"forward_layer": staticmethod(truncating_forward)})
    try:
        model.eval_logits([1, 2, 3])
    except ModelFileChangedError as e:
        print("error:", e)
""")


def test_truncation_inside_a_layer_is_an_error_not_a_bus_error(model_copy):
    result = subprocess.run([sys.executable, "-c", TRUNCATE_INSIDE_A_LAYER, model_copy], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "changed on disk while it was in use" in result.stdout
