"""The shared smoke runner and llama.cpp parity checks for every architecture family's tests.

Check 1 (fixtures README): F32 math on exactly dequantized weights against
`<variant>.logits_batch_f32ref.npy`, batched and through the KV cache (prefill T-8, then 8
single-token steps). Check 2: the F16-cache engine against llama.cpp's default-settings logits
within each file's recommended tolerance. The simulated-GPU check: the same model with every
layer on a strict simulated GPU gives logits bit-identical to the CPU's.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.devices import cpu_device, simulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement
from engine.run.model import Model
from engine.run_config import RunConfig

INCR_STEPS = 8


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def row_rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def kl_mean(logits: np.ndarray, ref: np.ndarray) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(logits)), in nats."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lr, ll = log_softmax(ref), log_softmax(logits)
    return float((np.exp(lr) * (lr - ll)).sum(axis=1).mean())


@lru_cache(maxsize=None)
def meta(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "meta.json").read_text())


def tokens(fixture_dir: Path) -> np.ndarray:
    return np.load(fixture_dir / "tokens.npy")


def load(fixture_dir: Path, variant: str, kv_type: str = "f32", n_ubatch: int = 512,
         activations: str = "f32", flash_attn: str = "auto") -> Model:
    config = RunConfig(n_ctx=512, n_ubatch=n_ubatch, type_k=kv_type, type_v=kv_type, activations=activations,
                       flash_attn=flash_attn)
    return Model.load(fixture_dir / f"{variant}.gguf", config)


def batch_and_incremental(model: Model, toks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All rows at once, and the last INCR_STEPS rows through the cache one token at a time."""
    batch = model.eval_logits(toks)
    cache = model.new_cache()
    model.eval_logits(toks[:-INCR_STEPS], cache)
    steps = [model.eval_logits(toks[i:i + 1], cache) for i in range(len(toks) - INCR_STEPS, len(toks))]
    return batch, np.concatenate(steps)


def check_f32ref(fixture_dir: Path, variant: str) -> dict:
    """Check 1: rel <= 1e-3 over all rows and every row <= 3e-3, batched and incremental; the
    engine's own cache path agrees with its batch to 1e-4 (check 3)."""
    model = load(fixture_dir, variant, "f32")
    batch, incr = batch_and_incremental(model, tokens(fixture_dir))
    ref = np.load(fixture_dir / f"{variant}.logits_batch_f32ref.npy")
    assert batch.shape == ref.shape and batch.dtype == np.float32
    found = dict(batch_rel=rel(batch, ref), batch_worst=float(row_rel(batch, ref).max()),
                 incr_rel=rel(incr, ref[-INCR_STEPS:]), incr_worst=float(row_rel(incr, ref[-INCR_STEPS:]).max()),
                 self_rel=rel(incr, batch[-INCR_STEPS:]))
    assert found["batch_rel"] <= 1e-3 and found["batch_worst"] <= 3e-3, found
    assert found["incr_rel"] <= 1e-3 and found["incr_worst"] <= 3e-3, found
    assert found["self_rel"] <= 1e-4, found
    return found


def check_llama_cpp_default(fixture_dir: Path, variant: str, model: Model | None = None) -> None:
    """Check 2: the F16-cache engine against llama.cpp's default-settings logits (`model`: the
    variant loaded with those settings and a placement; all on the CPU when None). The fixtures
    were made with flash attention off, so the CPU rounds attention as llama.cpp does without it."""
    model = model or load(fixture_dir, variant, "f16", activations="llama.cpp", flash_attn="off")
    batch, incr = batch_and_incremental(model, tokens(fixture_dir))
    tolerance = meta(fixture_dir)["variants"][variant]["recommended_tolerance"]
    for name, mine in (("logits_batch", batch), ("logits_incr", incr)):
        ref = np.load(fixture_dir / f"{variant}.{name}.npy")
        tol = tolerance[name]
        keep = [r for r in range(len(ref)) if r not in tol["exclude_rows"]]
        a, b = mine[keep], ref[keep]
        found = (rel(a, b), float(np.median(row_rel(a, b))), kl_mean(a, b))
        assert found[0] <= tol["rel"] and found[1] <= tol["row_median_rel"] and found[2] <= tol["kl_mean"], \
            (name, found, tol)


def smoke(fixture_dir: Path, variant: str) -> None:
    """Shapes, no-cache vs cache agreement, one decode step, and a chunked prefill."""
    model = load(fixture_dir, variant, "f32")
    toks = tokens(fixture_dir)[:24]
    hp = model.hparams
    no_cache = model.eval_logits(toks)
    assert no_cache.shape == (len(toks), hp.n_vocab) and np.isfinite(no_cache).all()

    cache = model.new_cache(256)
    prefill = model.eval_logits(toks[:-1], cache)
    assert cache.n_past == len(toks) - 1
    step = model.eval_logits(toks[-1:], cache)
    assert step.shape == (1, hp.n_vocab) and cache.n_past == len(toks)
    assert rel(prefill, no_cache[:-1]) < 1e-5
    assert rel(step, no_cache[-1:]) < 1e-4

    last = model.eval_logits(toks, model.new_cache(256), last_only=True)
    assert last.shape == (1, hp.n_vocab) and rel(last, no_cache[-1:]) < 1e-5

    chunked = load(fixture_dir, variant, "f32", n_ubatch=7).eval_logits(toks)
    assert rel(chunked, no_cache) < 1e-5


def on_simulated_gpu(path: Path, config: RunConfig) -> Model:
    """The model with every layer and the output on one strict simulated GPU (the token table
    stays on the CPU, as llama.cpp keeps it)."""
    inventory = Inventory.from_model_file(ModelFile(path))
    devices = [cpu_device()] + simulated_gpus("64GiB")
    return Model.load(path, config, placement=Placement(inventory, devices, ["CUDA0"] * (inventory.n_layer + 1)))


def check_on_simulated_gpu(fixture_dir: Path, variant: str, kv_type: str = "f32", activations: str = "f32") -> None:
    """Batched and incremental logits on the simulated GPU bit-identical to the CPU's."""
    config = RunConfig(n_ctx=512, type_k=kv_type, type_v=kv_type, activations=activations)
    path = fixture_dir / f"{variant}.gguf"
    toks = tokens(fixture_dir)
    cpu = batch_and_incremental(Model.load(path, config), toks)
    gpu_model = on_simulated_gpu(path, config)
    gpu = batch_and_incremental(gpu_model, toks)
    assert gpu_model.ops.allocated_bytes()["CUDA0"] > 0
    assert np.array_equal(cpu[0], gpu[0]) and np.array_equal(cpu[1], gpu[1])
