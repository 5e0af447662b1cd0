"""Decode roofline of the CUDA matvec kernels on Qwen3-30B-A3B's shapes.

    python -m kernels.cuda.bench [--layers 48] [--reps 20] [--emulate]

What one generated token reads (per layer: attention q/k/v/o, the router, 8 of 128 experts'
gate/up/down, in a Q4_K_M mix) is run through the decode kernels (q8_1 activations, integer dot
products) over distinct weights for every layer, so nothing is served from L2. The achieved
bandwidth is compared with the device's measured copy bandwidth (bytes read + written by a
device-to-device copy per second): the roofline of a decode step that reads each weight once.
With CuPy the launch sequence is also captured as a CUDA graph and replayed, which takes the
Python launch overhead out. `--emulate` runs a two-layer, small-width version on the CPU
emulation (a smoke test of this script, not a measurement).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from kernels.cuda import ops

F16_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q5_K": (0, 2)}


@dataclass(frozen=True)
class MatrixShape:
    name: str
    type_name: str
    n_rows: int
    n_cols: int

    @property
    def nbytes(self) -> int:
        fmt = ops.FORMATS[self.type_name]
        return self.n_rows * (self.n_cols // fmt.block_values * fmt.block_bytes)


def qwen3_30b_a3b_token(n_embd: int = 2048, n_head: int = 32, n_head_kv: int = 4, head_dim: int = 128,
                        n_expert: int = 128, n_used: int = 8, expert_width: int = 768) -> list[MatrixShape]:
    """The matrices one token reads in one layer (llama.cpp's Q4_K_M mix: Q6_K for attn_v and ffn_down)."""
    shapes = [MatrixShape("attn_q", "Q4_K", n_head * head_dim, n_embd),
              MatrixShape("attn_k", "Q4_K", n_head_kv * head_dim, n_embd),
              MatrixShape("attn_v", "Q6_K", n_head_kv * head_dim, n_embd),
              MatrixShape("attn_output", "Q4_K", n_embd, n_head * head_dim),
              MatrixShape("ffn_gate_inp", "F32", n_expert, n_embd)]
    for e in range(n_used):
        shapes += [MatrixShape(f"ffn_gate_exps[{e}]", "Q4_K", expert_width, n_embd),
                   MatrixShape(f"ffn_up_exps[{e}]", "Q4_K", expert_width, n_embd),
                   MatrixShape(f"ffn_down_exps[{e}]", "Q6_K", n_embd, expert_width)]
    return shapes


def random_weight(rng: np.random.Generator, shape: MatrixShape) -> np.ndarray:
    """Random blocks with small finite f16 scales (uint8 (n_rows, row_bytes))."""
    fmt = ops.FORMATS[shape.type_name]
    if fmt.name == "F32":
        return rng.standard_normal((shape.n_rows, shape.n_cols)).astype(np.float32).view(np.uint8)
    blocks = rng.integers(0, 256, (shape.n_rows, shape.n_cols // fmt.block_values, fmt.block_bytes), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, blocks.shape[:2]).astype(np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
    for offset in F16_SCALE_OFFSETS[fmt.name]:
        blocks[..., offset:offset + 2] = scales
    return blocks.reshape(shape.n_rows, -1)


class Timer:
    """Wall time of a device's work: CUDA events on a GPU, perf_counter on the emulator."""

    def __init__(self, rt):
        self.rt = rt

    def __call__(self, fn, reps: int) -> float:
        fn()                                        # warm-up: compile, pool allocations
        self.rt.synchronize()
        if self.rt.name == "cupy":
            cp = self.rt.cp
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record(self.rt.stream)
            for _ in range(reps):
                fn()
            stop.record(self.rt.stream)
            stop.synchronize()
            return cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps


def copy_bandwidth(rt, timer: Timer, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src, dst = rt.zeros(nbytes, np.uint8), rt.alloc(nbytes, np.uint8)
    return 2 * nbytes / timer(lambda: rt.copy_into(dst, src), 5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--emulate", action="store_true", help="run a small version on the CPU emulation")
    args = p.parse_args(argv)
    if args.emulate:
        from kernels.cuda.runtime import EmulatedRuntime
        rt = EmulatedRuntime()
        token = qwen3_30b_a3b_token(n_embd=256, n_head=4, n_head_kv=1, head_dim=64, n_expert=8, n_used=2, expert_width=256)
        n_layers, reps, copy_bytes = min(args.layers, 2), 1, 1 << 20
    else:
        from kernels.cuda.runtime import CupyRuntime
        rt = CupyRuntime()
        token = qwen3_30b_a3b_token()
        n_layers, reps, copy_bytes = args.layers, args.reps, 1 << 30
    timer = Timer(rt)
    rng = np.random.default_rng(0)
    layers = [[(shape, rt.upload(random_weight(rng, shape))) for shape in token] for _ in range(n_layers)]
    x = {n: rt.upload(rng.standard_normal((1, n)).astype(np.float32)) for n in {s.n_cols for s in token}}
    q8 = {n: rt.alloc((1, n // 32 * ops.Q8_1_BLOCK_BYTES), np.uint8) for n in x}
    outs = [rt.alloc((1, s.n_rows), np.float32) for s in token]

    def one_token():
        for weights in layers:
            for (shape, w), out in zip(weights, outs):
                ops.matvec(rt, x[shape.n_cols], w, shape.type_name, shape.n_cols, out=out, q8_scratch=q8[shape.n_cols])

    bandwidth = copy_bandwidth(rt, timer, copy_bytes)
    token_bytes = n_layers * sum(s.nbytes for s in token)
    print(f"device: {getattr(rt, 'device_name', rt.name)} ({rt.name}); copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(read + write)")
    print(f"{'matrix':<22}{'type':<6}{'shape':>14}{'bytes':>12}{'us':>10}{'GB/s':>9}{'roofline':>10}")
    for shape, w in layers[0][:6] + layers[0][-3:]:
        xs, out, scratch = x[shape.n_cols], outs[token.index(shape)], q8[shape.n_cols]
        seconds = timer(lambda: ops.matvec(rt, xs, w, shape.type_name, shape.n_cols, out=out, q8_scratch=scratch), reps)
        print(f"{shape.name:<22}{shape.type_name:<6}{f'{shape.n_rows}x{shape.n_cols}':>14}{shape.nbytes:>12}"
              f"{seconds * 1e6:>10.1f}{shape.nbytes / seconds / 1e9:>9.1f}{shape.nbytes / seconds / bandwidth:>10.0%}")
    seconds = timer(one_token, reps)
    print(f"one token over {n_layers} layers ({len(token) * n_layers} matvecs, {token_bytes / 1e6:.1f} MB of weights): "
          f"{seconds * 1e3:.2f} ms, {token_bytes / seconds / 1e9:.1f} GB/s = {token_bytes / seconds / bandwidth:.0%} "
          f"of the copy roofline (launches from Python)")
    if rt.name == "cupy":
        rt.begin_capture()
        one_token()
        graph = rt.end_capture()
        seconds = timer(lambda: rt.replay(graph), reps)
        print(f"the same as one CUDA graph: {seconds * 1e3:.2f} ms, {token_bytes / seconds / 1e9:.1f} GB/s = "
              f"{token_bytes / seconds / bandwidth:.0%} of the copy roofline; "
              f"{1 / seconds * n_layers / 48:.0f} tokens/s upper bound for 48 layers (matvecs only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
