"""A decode step captured as a CUDA graph on the emulated runtime: a llama-style step over all
layers of the dense fixture, written in the CUDA backend's kernels, replayed token after token
with the position and cache cell passed through device memory. Replays give bit-identical logits
to direct launches of the same step, a new padded cache length captures anew, the step matches the
model's own logits, and placements or steps that need the host fall back to direct launches."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from forward_parity import rel, tokens
from engine.backends.cuda import CapturedDecode, graph_blocker, padded_cells
from engine.devices import cpu_device, emulated_gpus
from engine.gguf.model_file import ModelFile
from engine.plan.inventory import Inventory
from engine.plan.placement import Placement, TensorRef
from engine.run.model import Model
from engine.run_config import RunConfig
from kernels.cuda import ops

EXACT = RunConfig(n_ctx=64, n_ubatch=64, type_k="f32", type_v="f32", activations="f32")
N_CELLS = 16
PADDING = 4                 # small, so that a few tokens cross a padded length


class DenseDecode:
    """One token through every layer of a llama model whose weights all live on CUDA0, in kernels
    only: embedding row, RMSNorm, q/k/v, rope, cache store, attention, SwiGLU FFN, output head."""

    def __init__(self, model):
        self.hp = model.hparams
        backend = model.ops.backends["CUDA0"]
        self.rt = rt = backend.runtime
        self.embd = model.globals["token_embd.weight"]              # placed on CUDA0 (all_on_cuda0)
        vector = lambda v: backend.memory.to_runtime(v)       # noqa: E731  (norms: activations -> runtime arrays)
        self.layers = [{name: (vector(w) if name.endswith("norm") else w) for name, w in lt.tensors.items()}
                       for lt in model.layers]
        self.output_norm = rt.upload(np.asarray(model.globals["output_norm.weight"], np.float32))
        self.output = model.globals["output.weight"]
        n_kv = self.hp.n_head_kv[0] * self.hp.n_embd_head_k
        self.k = [rt.zeros((N_CELLS, ops.cache_row_bytes("f32", n_kv)), np.uint8) for _ in self.layers]
        self.v = [rt.zeros((N_CELLS, ops.cache_row_bytes("f32", n_kv)), np.uint8) for _ in self.layers]
        self.cell_pos = [rt.upload(np.full(N_CELLS, -1, np.int64)) for _ in self.layers]

    def mv(self, x, w):
        return ops.matvec(self.rt, x, w.data, w.type_name, w.n_cols, exact=True)

    def __call__(self, n_attend: int, inputs):
        rt, hp = self.rt, self.hp
        head = hp.n_embd_head_k
        x = ops.get_rows(rt, self.embd.data, inputs["ids"], self.embd.type_name, self.embd.n_cols)   # (1, n_embd)
        cos, sin = ops.rope_cos_sin(rt, inputs["pos"], hp.n_rot, hp.rope_freq_base)
        for il, lw in enumerate(self.layers):
            h = ops.rms_norm(rt, x, lw["attn_norm"], hp.rms_eps)
            q = ops.rope(rt, self.mv(h, lw["attn_q"]).reshape(1, hp.n_head, head), cos, sin, neox=False)
            k = ops.rope(rt, self.mv(h, lw["attn_k"]).reshape(1, hp.n_head_kv[il], head), cos, sin, neox=False)
            ops.store_rows(rt, k.reshape(1, -1), self.k[il], inputs["cell"], "f32")
            ops.store_rows(rt, self.mv(h, lw["attn_v"]), self.v[il], inputs["cell"], "f32")
            ops.store_positions(rt, self.cell_pos[il], inputs["cell"], inputs["pos"])
            a = ops.attention(rt, q, self.k[il], self.v[il], self.cell_pos[il], inputs["pos"], n_attend,
                              hp.n_head_kv[il], "f32", "f32", 1.0 / math.sqrt(head))        # (1, n_head * head)
            x = ops.add(rt, x, self.mv(a, lw["attn_output"]))
            h = ops.rms_norm(rt, x, lw["ffn_norm"], hp.rms_eps)
            x = ops.add(rt, x, self.mv(ops.swiglu(rt, self.mv(h, lw["ffn_gate"]), self.mv(h, lw["ffn_up"])),
                                       lw["ffn_down"]))
        return self.mv(ops.rms_norm(rt, x, self.output_norm, hp.rms_eps), self.output)      # (1, n_vocab)


def all_on_cuda0(path):
    inventory = Inventory.from_model_file(ModelFile(path))
    devices = [cpu_device()] + emulated_gpus("4GiB")
    placement = Placement(inventory, devices, ["CUDA0"] * (inventory.n_layer + 1))
    placement.assign(TensorRef("token_embd.weight"), "CUDA0")
    return inventory, placement


def decode(step: CapturedDecode, toks) -> np.ndarray:
    """Logits (len(toks), n_vocab) of the tokens decoded one by one into cells 0, 1, ..."""
    rows = []
    for pos, token in enumerate(toks):
        inputs = dict(ids=np.array([token], np.int64), pos=np.array([pos], np.int64), cell=np.array([pos], np.int64))
        out = step(padded_cells(pos + 1, N_CELLS, PADDING), inputs)
        rows.append(step.runtime.download(out))
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def dense(fixtures_dir):
    path = fixtures_dir / "llama-dense" / "Q4_K_M.gguf"
    inventory, placement = all_on_cuda0(path)
    return path, inventory, placement


def test_replayed_steps_are_bit_identical_to_direct_launches(dense, fixtures_dir):
    path, inventory, placement = dense
    toks = tokens(fixtures_dir / "llama-dense")[:6]
    assert graph_blocker(placement.tensor_devices(), "CUDA0", range(inventory.n_layer)) is None
    graphed = DenseDecode(Model.load(path, EXACT, placement=placement))
    direct = DenseDecode(Model.load(path, EXACT, placement=placement))
    replayed = CapturedDecode(graphed.rt, graphed)
    launched = CapturedDecode(direct.rt, direct, blocker="direct launches for comparison")
    a, b = decode(replayed, toks), decode(launched, toks)
    assert np.array_equal(a, b)
    # 6 tokens: padded lengths 4 (tokens 1-4) and 8 (tokens 5-6): captured twice, replayed every step
    assert (replayed.captures, replayed.replays, replayed.direct_steps) == (2, 6, 0)
    assert (launched.captures, launched.replays, launched.direct_steps) == (0, 0, 6)
    cpu = Model.load(path, EXACT)
    cache = cpu.new_cache()
    reference = np.concatenate([cpu.eval_logits(toks[i:i + 1], cache) for i in range(len(toks))])
    assert rel(a, reference) <= 1e-4, rel(a, reference)


def test_a_replay_launches_nothing_new_until_the_length_changes(dense, fixtures_dir):
    """Replays reuse the captured buffers: the outputs are the same device array step after step."""
    path, inventory, placement = dense
    step = DenseDecode(Model.load(path, EXACT, placement=placement))
    captured = CapturedDecode(step.rt, step)
    outs = [captured(4, dict(ids=np.array([t], np.int64), pos=np.array([i], np.int64), cell=np.array([i], np.int64)))
            for i, t in enumerate(tokens(fixtures_dir / "llama-dense")[:3])]
    assert outs[0] is outs[1] is outs[2] and captured.captures == 1
    captured(8, dict(ids=np.array([1], np.int64), pos=np.array([3], np.int64), cell=np.array([3], np.int64)))
    assert captured.captures == 2 and captured.key == 8


def test_a_host_sync_inside_the_step_falls_back_to_direct_launches(dense, fixtures_dir, caplog):
    path, inventory, placement = dense
    step = DenseDecode(Model.load(path, EXACT, placement=placement))

    def with_a_download(n_attend, inputs):
        out = step(n_attend, inputs)
        step.rt.download(out)                      # e.g. a router's choice read back on the host
        return out

    captured = CapturedDecode(step.rt, with_a_download)
    reference = DenseDecode(Model.load(path, EXACT, placement=placement))
    toks = tokens(fixtures_dir / "llama-dense")[:3]
    with caplog.at_level(logging.DEBUG, logger="engine.backends.cuda"):
        got = decode(captured, toks)
    assert captured.captures == 0 and captured.direct_steps == 3
    assert "a download (a host sync)" in captured.blocker and "direct launches" in caplog.text
    assert np.array_equal(got, decode(CapturedDecode(reference.rt, reference, blocker="direct"), toks))


def test_hybrid_placements_are_not_captured(fixtures_dir, caplog):
    """Routed experts on the CPU (-ot exps=CPU): a layer's step waits for the host, so no graph."""
    path = fixtures_dir / "qwen3moe" / "Q4_K_M.gguf"
    inventory, placement = all_on_cuda0(path)
    layers = range(inventory.n_layer)
    assert graph_blocker(placement.tensor_devices(), "CUDA0", layers) is None
    placement.assign(TensorRef("blk.1.ffn_up_exps.weight", frozenset({6, 7})), "CPU")
    reason = graph_blocker(placement.tensor_devices(), "CUDA0", layers)
    assert reason.startswith("blk.1.ffn_up_exps.weight is on CPU")
    assert graph_blocker(placement.tensor_devices(), "CUDA0", range(1)) is None      # layer 0 alone still can
    for t in inventory.tensors:
        if t.n_experts:
            placement.assign(TensorRef(t.name), "CPU")
    reason = graph_blocker(placement.tensor_devices(), "CUDA0", layers)
    assert "_exps.weight is on CPU" in reason
    from engine.backends.cuda import emulated_backend

    calls = []
    with caplog.at_level(logging.DEBUG, logger="engine.backends.cuda"):
        step = emulated_backend("CUDA0").captured_decode(lambda key, inputs: calls.append(key) or inputs["x"],
                                                         placement.tensor_devices(), layers)
        step(4, dict(x=np.zeros(3, np.float32)))
    assert calls == [4] and step.captures == 0 and step.direct_steps == 1
    assert reason in caplog.text


def test_padded_cells():
    assert [padded_cells(n, 1000) for n in (1, 256, 257, 999)] == [256, 256, 512, 1000]
    assert padded_cells(5, 16, 4) == 8
