"""The designer on a hybrid model: DeltaNet and attention layers are marked, the DeltaNet tensors
have their own column, and the row tooltip says where the recurrent state lives."""
import pytest
from PySide6.QtCore import Qt

from app.models.layer_grid import ATTENTION_MARK, DELTA_NET_MARK, LayerGridModel
from engine.devices import Device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args
from engine.synth.writer import write_synthetic


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    path = write_synthetic(tmp_path_factory.mktemp("hybrid") / "q.gguf", "qwen3.5-35b-a3b", "Q4_K_M", sparse=True)
    inv = Inventory.from_model_file(ModelFile(path))
    devices = [Device("CPU", "cpu", 256 << 30)] + simulated_gpus("16GiB")
    placement = parse_llama_args("-ngl 99 -ot exps=CPU", inv, devices).placement
    return LayerGridModel(inv, placement)


def test_rows_mark_delta_net_and_attention_layers(grid):
    labels = {grid.row_of_layer(il): grid.headerData(grid.row_of_layer(il), Qt.Vertical) for il in range(8)}
    assert list(labels.values()) == [f"{il} {DELTA_NET_MARK if il % 4 != 3 else ATTENTION_MARK}" for il in range(8)]
    tip = grid.headerData(grid.row_of_layer(0), Qt.Vertical, Qt.ToolTipRole)
    assert "recurrent state (DeltaNet layer) on CUDA0" in tip
    assert "KV cache on CUDA0" in grid.headerData(grid.row_of_layer(3), Qt.Vertical, Qt.ToolTipRole)


def test_delta_net_tensors_have_their_own_column(grid):
    column = grid.groups.index("recurrent")
    assert grid.headerData(column, Qt.Horizontal) == f"ssm_* ({DELTA_NET_MARK})"
    assert "recurrent state" in grid.headerData(column, Qt.Horizontal, Qt.ToolTipRole)
