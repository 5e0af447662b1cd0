"""The decode roofline bench runs end to end (on the emulator: a smoke run, not a measurement)."""
from kernels.cuda import bench


def test_bench_runs_on_the_emulator(capsys):
    assert bench.main(["--emulate"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "one token over 2 layers (22 matvecs" in out


def test_token_shapes_are_qwen3_30b_a3b():
    token = bench.qwen3_30b_a3b_token()
    assert len(token) == 5 + 3 * 8
    # attention q/k/v/o, the f32 router and 8 experts' gate/up/down of width 768, Q4_K_M
    assert sum(s.nbytes for s in token) == (4096 * 2048 + 512 * 2048 + 2048 * 4096) // 256 * 144 \
        + 512 * 2048 // 256 * 210 + 128 * 2048 * 4 + 8 * (2 * 768 * 2048 // 256 * 144 + 2048 * 768 // 256 * 210)
