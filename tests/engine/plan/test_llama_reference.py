"""Reading llama.cpp's own buffer sizes from its log, and the command that prints them."""
from engine.plan.llama_reference import comparable_run_config, parse_llama_log, perplexity_command
from engine.run_config import RunConfig

MIB = 1 << 20

# lines of `llama-perplexity -m gemma-3-270m-q4_k_m.gguf -c 512 -b 128 -ub 128 -fa on -t 2 -v -nr
# --no-warmup --chunks 1 --fit on` (the dry pass with no memory taken, then the real load)
LOG = """\
0.00.443.154 I load_tensors:          CPU model buffer size =     0.00 MiB
0.00.445.384 I llama_context:        CPU  output buffer size =     1.00 MiB
0.00.445.511 I llama_kv_cache:        CPU KV buffer size =     0.00 MiB
0.00.445.566 I llama_kv_cache:        CPU KV buffer size =     0.00 MiB
0.00.446.001 I resolve_fused_ops: Flash Attention enabled
0.00.448.927 I sched_reserve:        CPU compute buffer size =   128.63 MiB
0.00.448.950 I sched_reserve: graph: nodes = 727, splits = 1, input objects = 4, input tensors = 9
0.00.941.829 I load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
0.00.946.808 I llama_context:        CPU  output buffer size =     1.00 MiB
0.00.946.871 I llama_kv_cache:        CPU KV buffer size =     1.50 MiB
0.00.947.067 I llama_kv_cache:        CPU KV buffer size =     7.50 MiB
0.00.953.493 I sched_reserve:        CPU compute buffer size =   128.63 MiB
0.00.953.500 I sched_reserve: graph: nodes = 727, splits = 1, input objects = 4, input tensors = 9
"""


def test_each_load_is_read_separately():
    dry, real = parse_llama_log(LOG)
    assert dry.compute_bytes == {"CPU": round(128.63 * MIB)} and dry.n_nodes == 727 and dry.n_splits == 1
    assert dry.flash_attn is True and dry.kv_bytes == {"CPU": 0} and dry.output_bytes == {"CPU": MIB}
    assert real.kv_bytes == {"CPU": 9 * MIB} and real.model_bytes == {"CPU_Mapped": round(235.16 * MIB)}


def test_the_command_keeps_one_sequence():
    # llama-perplexity runs batch / context sequences side by side: the batch is held to the context
    rc = RunConfig(n_ctx=512, n_batch=2048, n_ubatch=1024, flash_attn="off", type_k="q8_0")
    cmd = perplexity_command("llama-perplexity", "m.gguf", "t.txt", rc, 512)
    assert cmd[cmd.index("-b") + 1] == "512" and cmd[cmd.index("-ub") + 1] == "512"
    assert cmd[cmd.index("-fa") + 1] == "off" and cmd[cmd.index("-ctk") + 1] == "q8_0"
    assert "--fit" in cmd and "-nr" in cmd
    same = comparable_run_config(rc, 512)
    assert (same.n_ctx, same.n_batch, same.n_ubatch, same.n_seq) == (512, 512, 512, 1)
