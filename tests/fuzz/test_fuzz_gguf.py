"""Hostile GGUF files through everything that reads them: the parser, the inventory, the planner,
the hyperparameter checks, the model loader, the tokenizer, the chat template and the CLI.
Each example either works or ends in one of our errors, in one line, with bounded memory and time."""
import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import given

from app.cli import main
from engine.devices import simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.llama_args import parse_llama_args
from engine.plan.memory import estimate_memory
from fuzz_strategies import (OUTCOMES, bounded, fuzz_settings, header_bytes, metadata_changes, tensor_table_changes,
                             tiny_llama)

WORKDIR = Path(tempfile.mkdtemp(prefix="offload-fuzz-"))


def write(data: bytes, name: str = "m.gguf") -> Path:
    path = WORKDIR / name
    path.write_bytes(data)
    return path


def open_everything(path: Path) -> None:
    from engine.run.model import Model
    from engine.text.chat_template import ChatTemplate
    from engine.text.tokenizer import Tokenizer
    mf = ModelFile(path)
    inventory = Inventory.from_model_file(mf)
    devices = simulated_gpus("8GiB")
    parsed = parse_llama_args(["-ngl", "99"], inventory, devices)
    estimate_memory(inventory, parsed.placement, parsed.run_config, devices)
    if inventory.runnable:
        model = Model.load(mf)
        Tokenizer.from_metadata(mf.metadata)
        template = ChatTemplate.from_metadata(mf.metadata, mf.architecture)
        template.render_prompt([{"role": "user", "content": "hi"}])
        model.close()
    mf.close()


def cli_ends_cleanly(path: Path, capsys) -> None:
    for argv in (["inspect", str(path), "--tensors"], ["plan", str(path), "--sim-gpus", "8GiB", "--json"]):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code in (0, 1, 2) and "Traceback" not in err and err.count("\n") <= 1, err[-2000:]
        assert "\x1b" not in out


def setup_module(module):
    # compile what compiles once per process (Numba) outside the memory-traced runs, where
    # tracemalloc makes compiling a hundred times slower
    open_everything(write(tiny_llama().to_bytes()))


def test_the_tiny_model_itself_opens():
    with bounded("baseline"):
        open_everything(write(tiny_llama().to_bytes()))
    assert OUTCOMES[("baseline", "ok")] >= 1


@fuzz_settings(60)
@given(data=header_bytes())
def test_headers(data):
    with bounded("headers"):
        open_everything(write(data))


@fuzz_settings(60)
@given(raw=metadata_changes())
def test_metadata_values(raw):
    with bounded("metadata"):
        open_everything(write(raw.to_bytes()))


@fuzz_settings(60)
@given(raw=tensor_table_changes())
def test_tensor_tables(raw):
    with bounded("tensors"):
        open_everything(write(raw.to_bytes()))


@fuzz_settings(15)
@given(raw=metadata_changes())
def test_cli_on_hostile_metadata(raw, capsys):
    with bounded("cli"):
        cli_ends_cleanly(write(raw.to_bytes()), capsys)


def teardown_module(module):
    shutil.rmtree(WORKDIR, ignore_errors=True)
    stats = os.environ.get("FUZZ_STATS")
    if stats:
        Path(stats).write_text(json.dumps({f"{p}:{o}": n for (p, o), n in sorted(OUTCOMES.items())}, indent=1))
