"""The llama.cpp command line: real users' lines parse to the per-device bytes llama.cpp would
load, and every emitted line parses back to the same placement."""
import random
import re
from fractions import Fraction

import pytest

from engine.devices import Device, simulated_gpus
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.plan.llama_args import (IK_LLAMA_CPP_DEFAULTS, KV_CACHE_TYPES, LLAMA_CPP_DEFAULTS, emit_llama_args,
                                    llama_layer_devices, parse_llama_args, refused_combinations)
from engine.plan.placement import Placement, TensorRef
from preset_inventory import make_inventory
from engine.run_config import RunConfig

GIB = 1 << 30
CPU = Device("CPU", "cpu", 512 * GIB)
FOUR_GPUS = [CPU] + simulated_gpus("24GiB,24GiB,24GiB,48GiB")
ONE_GPU = [CPU] + simulated_gpus("24GiB")
THREE_GPUS = [CPU] + simulated_gpus("24GiB,12GiB,16GiB")




# --- an independent model of llama.cpp's rule, in exact fractions ------------------------------

def reference_layer_device(il, n_layer, n_gpu_layers, gpus, split):
    """load_tensors: the last n_gpu_layers of (layers + output) on GPUs, split by cumulative proportions."""
    n_gpu_layers = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    start = max(n_layer + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layer + 1)
    if not gpus or il < start:
        return "CPU"
    weights = [Fraction(x) for x in (list(split or []) + [0] * len(gpus))[:len(gpus)]]
    if not any(weights):
        weights = [Fraction(g.total_bytes) for g in gpus]
    position, cumulative = Fraction(il - start, active), 0
    for gpu, w in zip(gpus, weights):
        cumulative += w
        if cumulative / sum(weights) > position:
            return gpu.name
    raise AssertionError("position past the last split point")


def reference_device(name, layer, n_layer, layer_device, rules):
    for pattern, device in rules:
        if re.search(pattern, name):
            return device
    if name.startswith("token_embd"):
        return "CPU"
    if layer is not None:
        return layer_device(layer)
    if name.startswith("output"):
        return layer_device(n_layer)
    return layer_device(0)      # rope_freqs


def expected_weight_bytes(inventory, devices, n_gpu_layers, split, rules):
    gpus = [d for d in devices if d.is_gpu]
    totals = {d.name: 0 for d in devices}
    for t in inventory.tensors:
        device = reference_device(t.name, t.layer, inventory.n_layer,
                                  lambda il: reference_layer_device(il, inventory.n_layer, n_gpu_layers, gpus, split),
                                  rules)
        totals[device] += t.n_bytes
    return totals


def assert_round_trip(parsed, devices, inventory):
    emitted = emit_llama_args(parsed.placement, parsed.run_config, devices)
    assert emitted.exact, emitted.notes
    for again in (parse_llama_args(emitted.args, inventory, devices), parse_llama_args(emitted.text, inventory, devices)):
        assert again.placement.tensor_devices() == parsed.placement.tensor_devices()
        assert again.run_config == parsed.run_config
    return emitted


# --- users' command lines ----------------------------------------------------------------------

DEEPSEEK_MOE_LAYER_BYTES = 6_477_100_032    # by hand: 3 x 2_113_929_216 expert tensors + 135_312_384 other
DEEPSEEK_EXPS_TENSOR_BYTES = 2_113_929_216  # 256 experts x 2048 x 7168, Q4_K: 144 bytes per 256
DEEPSEEK_TOKEN_EMBD_BYTES = 521_256_960     # 129280 rows x 28 blocks x 144
DEEPSEEK_OUTPUT_LAYER_BYTES = 521_285_632   # output (as token_embd) + output_norm 7168 x 4

USER_LINES = [
    pytest.param(
        "llama-4-maverick", FOUR_GPUS,
        './llama-server -m Llama-4-Maverick-17B-128E-Instruct-Q4_K_M-00001-of-00005.gguf '
        '--n-gpu-layers 49 --tensor-split 25,25,25,25 --override-tensor "exps=CPU"',
        49, [25, 25, 25, 25], [("exps", "CPU")],
        # 24 MoE layers x 3 x (128 x 8192 x 5120 Q4_K = 3_019_898_880) + token_embd 202048 x 2880
        {"CPU": 72 * 3_019_898_880 + 581_898_240},
        "-ngl 49 -ts 1,1,1,1 --cpu-moe -c 0".replace(" -c 0", ""), id="maverick-exps-cpu"),
    pytest.param(
        "deepseek-v3", FOUR_GPUS, "-ngl 27 -ts 17,20,21,45", 27, [17, 20, 21, 45], [],
        # 27 of 62 -> layers 35..60 and the output; 17/103 of 27 positions -> layers 35..39 on CUDA0
        {"CUDA0": 5 * DEEPSEEK_MOE_LAYER_BYTES, "CUDA3": 10 * DEEPSEEK_MOE_LAYER_BYTES + DEEPSEEK_OUTPUT_LAYER_BYTES},
        "-ngl 27 -ts 3,3,4,7", id="deepseek-ngl27"),
    pytest.param(
        "deepseek-v3", FOUR_GPUS,
        r'-ngl 100 -ts 17,20,21,45 -ot "ffn_down_exps=CPU,blk\.4[0-9]\.ffn_.*_exps=CPU,'
        r'blk\.5[0-9]\.ffn_.*_exps=CPU,blk\.6[0-9]\.ffn_.*_exps=CPU"',
        100, [17, 20, 21, 45],
        [("ffn_down_exps", "CPU"), (r"blk\.4[0-9]\.ffn_.*_exps", "CPU"), (r"blk\.5[0-9]\.ffn_.*_exps", "CPU"),
         (r"blk\.6[0-9]\.ffn_.*_exps", "CPU")],
        # 58 ffn_down_exps + up/gate of layers 40..60 (42), and token_embd
        {"CPU": 211_914_178_560},
        r"-ngl 62 -ts 6,7,7,16 -ot 'ffn_down_exps=CPU,blk\.[4-6][0-9]\.ffn_.*_exps=CPU'", id="deepseek-ot"),
    pytest.param(
        "llama-4-scout", ONE_GPU,
        r'-ngl 100 -ot "blk\.[0-8]\.ffn_up_exps=CUDA0,blk\.[0-8]\.ffn_down_exps=CUDA0,exps=CPU"',
        100, None, [(r"blk\.[0-8]\.ffn_up_exps", "CUDA0"), (r"blk\.[0-8]\.ffn_down_exps", "CUDA0"), ("exps", "CPU")],
        # 48 gate + 39 x 2 up/down expert tensors of 16 x 8192 x 5120 (377_487_360) + token_embd
        {"CPU": 126 * 377_487_360 + 581_898_240},
        r"-ngl 49 -ot 'blk\.(9|[1-4][0-9])\.ffn_.*_exps=CPU,ffn_gate_exps=CPU'", id="scout-ot-carve-out"),
    pytest.param(
        "deepseek-v3", ONE_GPU,
        "--n-gpu-layers 63 --override-tensor exps=CPU -mla 2 -fa -amb 512 -fmoe --ctx-size 16384 -ctk f16",
        63, None, [("exps", "CPU")],
        {"CPU": DEEPSEEK_TOKEN_EMBD_BYTES + 58 * 3 * DEEPSEEK_EXPS_TENSOR_BYTES, "CUDA0": 9_366_784_000},
        "-ngl 62 --cpu-moe -c 16384 -fa on", id="deepseek-ik"),
]


@pytest.mark.parametrize("preset_name, devices, line, n_gpu_layers, split, rules, literal_bytes, emitted_text",
                         USER_LINES)
def test_users_lines_give_llama_cpp_bytes_and_round_trip(preset_name, devices, line, n_gpu_layers, split, rules,
                                                         literal_bytes, emitted_text):
    inventory = make_inventory(preset_name)
    parsed = parse_llama_args(line, inventory, devices)
    weights = parsed.placement.weight_bytes()
    assert weights == expected_weight_bytes(inventory, devices, n_gpu_layers, split, rules)
    assert {d: weights[d] for d in literal_bytes} == literal_bytes
    assert sum(weights.values()) == inventory.total_bytes
    emitted = assert_round_trip(parsed, devices, inventory)
    assert emitted.text == emitted_text
    assert len(emitted.text) < len(line)


def test_ik_line_run_settings_and_report():
    parsed = parse_llama_args(USER_LINES[-1].values[2], make_inventory("deepseek-v3"), ONE_GPU)
    assert parsed.run_config == LLAMA_CPP_DEFAULTS.replace(n_ctx=16384, flash_attn="on")
    status = {flag: s for flag, s, _ in parsed.report}
    assert status == {"--n-gpu-layers": "applied", "--override-tensor": "applied", "-mla": "ignored", "-fa": "applied",
                      "-amb": "ignored", "-fmoe": "ignored", "--ctx-size": "applied", "-ctk": "applied"}


def test_ik_only_flags_are_recognised_with_their_arity():
    line = ("-fmoe -rtr -amb 512 -mla 3 -ser 7,1 -gr -smgs --no-fused-up-gate -khad -ctv q8_0 -ctk q8_0 "
            "-no-fmoe -gfm 0,1024 -ngl 10")
    parsed = parse_llama_args(line, make_inventory("tiny-deepseek-v3"), ONE_GPU)
    report = {flag: (status, message) for flag, status, message in parsed.report}
    for flag in ("-fmoe", "-rtr", "-amb", "-mla", "-ser", "-gr", "-smgs", "--no-fused-up-gate", "-khad", "-gfm"):
        assert report[flag][0] == "ignored" and "ik_llama.cpp" in report[flag][1]
    assert report["-ctv"][0] == report["-ngl"][0] == "applied"     # values were not taken as flags
    assert parsed.run_config.type_v == parsed.run_config.type_k == "q8_0"
    assert parsed.n_gpu_layers == 10


def test_unknown_buffer_type_lists_the_devices():
    inventory = make_inventory("tiny-deepseek-v3")
    with pytest.raises(ValueError, match=r"-ot exps=CUDA7: unknown buffer type 'CUDA7'; "
                                         r"available: CPU, CUDA0, CUDA1, CUDA2, CUDA3"):
        parse_llama_args("-ngl 99 -ot exps=CUDA7", inventory, FOUR_GPUS)
    with pytest.raises(ValueError, match="'CUDA_Host'.*host buffer.*use CPU"):
        parse_llama_args("-ot exps=CUDA_Host", inventory, FOUR_GPUS)


@pytest.mark.parametrize("line, flag", [("-ngl x", "-ngl"), ("-ts 3,a", "-ts"), ("-c 4k", "-c"),
                                        ("-ot exps", "-ot"), ("-sm rows", "-sm"), ("-ncmoe -2", "-ncmoe"),
                                        ("-ot 'blk.(=CPU'", "-ot|pattern"), ("-ctk q9_9", "-ctk"), ("-ngl", "-ngl")])
def test_malformed_values_name_the_flag(line, flag):
    with pytest.raises(ValueError, match=flag):
        parse_llama_args(line, make_inventory("tiny-deepseek-v3"), FOUR_GPUS)


def test_n_cpu_moe_keeps_the_first_layers_experts_on_the_cpu():
    inventory = make_inventory("deepseek-v3")
    parsed = parse_llama_args("-ngl 99 -ts 1,1,1,1 --n-cpu-moe 10", inventory, FOUR_GPUS)
    rules = [(rf"blk\.{il}\.ffn_(up|down|gate|gate_up)_(ch|)exps", "CPU") for il in range(10)]
    weights = parsed.placement.weight_bytes()
    assert weights == expected_weight_bytes(inventory, FOUR_GPUS, 99, [1, 1, 1, 1], rules)
    # layers 0..2 are dense: the experts of layers 3..9 move
    assert weights["CPU"] == DEEPSEEK_TOKEN_EMBD_BYTES + 7 * 3 * DEEPSEEK_EXPS_TENSOR_BYTES
    assert assert_round_trip(parsed, FOUR_GPUS, inventory).text == "-ngl 62 -ts 1,1,1,1 --n-cpu-moe 10"
    without = emit_llama_args(parsed.placement, parsed.run_config, FOUR_GPUS, use_n_cpu_moe=False)
    assert without.text == r"-ngl 62 -ts 1,1,1,1 -ot 'blk\.[3-9]\.ffn_.*_exps=CPU'"


def test_split_mode_none_puts_everything_on_the_main_gpu():
    inventory = make_inventory("deepseek-v3")
    parsed = parse_llama_args("-ngl 99 -sm none -mg 1 -ts 3,1", inventory, FOUR_GPUS)
    assert parsed.placement.weight_bytes() == {
        "CPU": DEEPSEEK_TOKEN_EMBD_BYTES, "CUDA0": 0, "CUDA1": inventory.total_bytes - DEEPSEEK_TOKEN_EMBD_BYTES,
        "CUDA2": 0, "CUDA3": 0}
    assert parsed.run_config.split_mode == "none" and parsed.run_config.main_gpu == 1
    assert assert_round_trip(parsed, FOUR_GPUS, inventory).text == "-ngl 62 -sm none -mg 1"
    with pytest.raises(ValueError, match="-mg 4: there are 4 GPUs"):
        parse_llama_args("-sm none -mg 4", inventory, FOUR_GPUS)


def test_per_expert_split_is_flagged_and_placed_where_most_bytes_are():
    inventory = make_inventory("tiny-deepseek-v3")
    placement = parse_llama_args("-ngl 99 -ts 1,1", inventory, THREE_GPUS).placement
    placement.assign(TensorRef("blk.2.ffn_up_exps.weight", frozenset(range(10))), "CPU")    # 10 of 16
    emitted = emit_llama_args(placement, LLAMA_CPP_DEFAULTS, THREE_GPUS)
    assert not emitted.exact
    assert any("blk.2.ffn_up_exps.weight" in note and "cannot split" in note for note in emitted.notes)
    again = parse_llama_args(emitted.args, inventory, THREE_GPUS).placement
    assert again.device_of("blk.2.ffn_up_exps.weight") == "CPU"
    for name, device in placement.tensor_devices().items():
        if name != "blk.2.ffn_up_exps.weight":
            assert again.device_of(name) == device


def test_a_broad_rule_may_lean_on_an_exact_rule_ahead_of_it():
    inventory = make_inventory("tiny-deepseek-v3")
    placement = parse_llama_args("-ngl 99", inventory, ONE_GPU).placement
    for t in inventory.layers[2].tensors:
        if t.name.startswith("blk.2.ffn_") and t.name != "blk.2.ffn_down_exps.weight":
            placement.assign(TensorRef(t.name), "CPU")
    emitted = emit_llama_args(placement, LLAMA_CPP_DEFAULTS, ONE_GPU)
    assert emitted.text == r"-ngl 5 -ot 'blk\.2\.ffn_down_exps=CUDA0,blk\.2\.ffn_=CPU'"
    assert parse_llama_args(emitted.args, inventory, ONE_GPU).placement == placement


def test_repeated_override_flags_keep_command_line_order():
    inventory = make_inventory("tiny-deepseek-v3")
    parsed = parse_llama_args(r"-ngl 0 -ot blk\\.1\\.=CUDA0 --override-tensor 'blk\.[0-3]\.=CUDA1,exps=CUDA0'",
                              inventory, THREE_GPUS)
    assert parsed.overrides == [(r"blk\.1\.", "CUDA0"), (r"blk\.[0-3]\.", "CUDA1"), ("exps", "CUDA0")]
    assert parsed.placement.device_of("blk.1.ffn_up_exps.weight") == "CUDA0"
    assert parsed.placement.device_of("blk.2.ffn_up_exps.weight") == "CUDA1"
    assert parsed.placement.device_of("output.weight") == "CPU"


def test_row_split_is_kept_and_noted():
    inventory = make_inventory("tiny-deepseek-v3")
    parsed = parse_llama_args("-ngl 99 -sm row -ts 1,1 -mg 1", inventory, THREE_GPUS)
    assert parsed.run_config.split_mode == "row" and parsed.run_config.main_gpu == 1
    emitted = assert_round_trip(parsed, THREE_GPUS, inventory)
    assert emitted.text == "-ngl 5 -sm row -ts 1,1 -mg 1"
    assert any("-sm row" in note for note in emitted.notes)


def test_program_name_model_and_unknown_flags_are_reported_not_fatal():
    parsed = parse_llama_args("llama-cli -m /models/x.gguf --frobnicate 3 --wibble -ngl 5 --seed -1 --jinja",
                              make_inventory("tiny-deepseek-v3"), ONE_GPU)
    report = {flag: (status, message) for flag, status, message in parsed.report}
    assert report["llama-cli"] == ("ignored", "program name")
    assert report["-m"][0] == "not-placement" and parsed.model_path == "/models/x.gguf"
    assert report["--frobnicate"] == ("ignored", "unknown flag; took '3' as its value")
    assert report["--wibble"] == ("ignored", "unknown flag")
    assert report["--seed"][0] == report["--jinja"][0] == "not-placement"
    assert parsed.n_gpu_layers == 5


@pytest.mark.parametrize("line, mode", [("-fa", "on"), ("-fa off", "off"), ("-fa auto", "auto"), ("-no-fa", "off"),
                                        ("--flash-attn on -ngl 3", "on"), ("-fa -ngl 3", "on"), ("", "auto")])
def test_flash_attn_with_and_without_a_value(line, mode):
    parsed = parse_llama_args(line, make_inventory("tiny-deepseek-v3"), ONE_GPU)
    assert parsed.run_config.flash_attn == mode


def test_missing_ngl_is_llama_cpp_auto_all_layers():
    parsed = parse_llama_args("-c 8192", make_inventory("tiny-deepseek-v3"), ONE_GPU)
    assert set(parsed.layer_devices) == {"CUDA0"}
    assert ("-ngl", "default") in [(flag, status) for flag, status, _ in parsed.report]


def test_devices_flag_limits_the_gpus():
    parsed = parse_llama_args("-ngl 99 -dev CUDA1,CUDA3", make_inventory("deepseek-v3"), FOUR_GPUS)
    assert set(parsed.layer_devices) == {"CUDA1", "CUDA3"}       # split 24:48 by memory
    assert parsed.layer_devices.count("CUDA1") == 21                # positions 0..20 of 62 below 1/3


def test_run_settings_round_trip():
    inventory = make_inventory("tiny-deepseek-v3")
    rc = RunConfig(n_ctx=32768, n_batch=4096, n_ubatch=1024, type_k="q8_0", type_v="q4_0", flash_attn="off",
                   n_seq=2, n_threads=16)
    placement = parse_llama_args("-ngl 0", inventory, ONE_GPU).placement
    emitted = emit_llama_args(placement, rc, ONE_GPU)
    assert emitted.args == ["-ngl", "0", "-c", "32768", "-b", "4096", "-ub", "1024", "-ctk", "q8_0", "-ctv", "q4_0",
                            "-fa", "off", "-np", "2", "-t", "16"]
    assert parse_llama_args(emitted.text, inventory, ONE_GPU).run_config == rc


def test_layer_split_equals_exact_fraction_model():
    rng = random.Random(3)
    gpus = FOUR_GPUS[1:]
    for _ in range(300):
        n_layer = rng.choice([4, 32, 48, 61, 94])
        n_gpu_layers = rng.randint(-2, n_layer + 5)
        split = rng.choice([None, [rng.randint(0, 50) for _ in range(rng.randint(1, 5))]])
        ours = llama_layer_devices(n_layer, n_gpu_layers, gpus, split)
        assert ours == [reference_layer_device(il, n_layer, n_gpu_layers, gpus, split) for il in range(n_layer + 1)]


def test_split_point_exactly_on_a_layer_goes_to_the_next_gpu():
    # -ts 1,1 over 62 positions: position 31 is exactly 0.5; upper_bound sends it to the second GPU
    devices = llama_layer_devices(61, 62, FOUR_GPUS[1:3], [1, 1])
    assert devices.count("CUDA0") == 31 and devices[31] == "CUDA1"


def random_placement(inventory, devices, rng):
    gpus = [d for d in devices if d.is_gpu]
    names = [d.name for d in devices]
    if rng.random() < 0.5:
        ts = [rng.randint(0, 4) for _ in gpus] or None
        layers = llama_layer_devices(inventory.n_layer, rng.randint(0, inventory.n_layer + 2), gpus, ts)
    else:
        layers = [rng.choice(names) for _ in range(inventory.n_layer + 1)]
    placement = Placement(inventory, devices, layers)
    kinds = sorted({t.name.split(".", 2)[2] for t in inventory.tensors if t.layer is not None})
    for _ in range(rng.randint(0, 6)):
        device, move = rng.choice(names), rng.random()
        if move < 0.4:      # one tensor
            targets = [rng.choice(inventory.tensors).name]
        elif move < 0.7:    # a column: one kind in a range of layers
            kind, lo = rng.choice(kinds), rng.randrange(inventory.n_layer)
            targets = [f"blk.{il}.{kind}" for il in range(lo, rng.randint(lo, inventory.n_layer - 1) + 1)]
        else:               # whole layers
            il = rng.randrange(inventory.n_layer)
            targets = [t.name for t in inventory.layers[il].tensors]
        for name in targets:
            if name in inventory.by_name:
                placement.assign(TensorRef(name), device)
    return placement


@pytest.mark.parametrize("preset_name", ["tiny-deepseek-v3", "tiny-llama-4", "tiny-qwen3-moe"])
def test_emitted_lines_parse_back_to_the_same_placement(preset_name):
    inventory = make_inventory(preset_name)
    rng = random.Random(preset_name)
    for devices in (THREE_GPUS, ONE_GPU, [CPU]):
        for _ in range(60):
            placement = random_placement(inventory, devices, rng)
            emitted = emit_llama_args(placement, LLAMA_CPP_DEFAULTS, devices)
            assert emitted.exact, emitted.notes
            assert not any("missed" in note for note in emitted.notes), emitted.text
            again = parse_llama_args(emitted.args, inventory, devices).placement
            assert again.tensor_devices() == placement.tensor_devices(), emitted.text


# --- the whole line round-trips: placement, settings, -m and --override-kv ----------------------

def run_configs():
    return st.builds(
        RunConfig, n_ctx=st.sampled_from([0, 512, 4096, 8192, 131072]), n_batch=st.sampled_from([512, 2048, 4096]),
        n_ubatch=st.sampled_from([128, 512, 1024]), type_k=st.sampled_from(KV_CACHE_TYPES),
        type_v=st.sampled_from(KV_CACHE_TYPES), flash_attn=st.sampled_from(["auto", "on", "off"]),
        n_seq=st.integers(1, 4), split_mode=st.sampled_from(["layer", "row", "none"]), main_gpu=st.integers(0, 2),
        n_threads=st.integers(0, 64))


OVERRIDES = ["deepseek2.expert_used_count=int:6", "general.name=str:My Model", "tokenizer.ggml.add_bos_token=bool:false"]
ROUND_TRIP_PRESETS = {name: make_inventory(name) for name in ("tiny-deepseek-v3", "tiny-llama-4", "tiny-qwen3-moe")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(preset_name=st.sampled_from(sorted(ROUND_TRIP_PRESETS)), devices=st.sampled_from([THREE_GPUS, ONE_GPU, [CPU]]),
       seed=st.integers(0, 2**32 - 1), rc=run_configs(), model=st.sampled_from([None, "/models/My Model-Q4_K_M.gguf"]),
       override_kv=st.lists(st.sampled_from(OVERRIDES), max_size=2, unique=True),
       dialect=st.sampled_from(["llama.cpp", "ik_llama.cpp"]))
def test_any_plan_round_trips_through_its_line(preset_name, devices, seed, rc, model, override_kv, dialect):
    inventory = ROUND_TRIP_PRESETS[preset_name]
    placement = random_placement(inventory, devices, random.Random(seed))
    emitted = emit_llama_args(placement, rc, devices, model_path=model, override_kv=override_kv, dialect=dialect)
    assert emitted.exact, emitted.notes
    again = parse_llama_args(emitted.text, inventory, devices, dialect=dialect)
    assert again.placement.tensor_devices() == placement.tensor_devices(), emitted.text
    assert again.run_config == emitted.run_config, emitted.text
    assert again.model_path == model and list(again.override_kv) == override_kv
    # the line changes only what llama.cpp cannot mean: -sm none over several GPUs (a layer split,
    # noted), -sm/-mg without a GPU, and ik_llama.cpp's 'auto' flash attention (on)
    written = emitted.run_config
    assert written.replace(split_mode=rc.split_mode, main_gpu=rc.main_gpu, flash_attn=rc.flash_attn) == rc
    if (written.split_mode, written.main_gpu) != (rc.split_mode, rc.main_gpu):
        assert rc.split_mode == "none" or len(devices) == 1
    if rc.split_mode == "none" and written.split_mode == "layer" and len(devices) > 1:
        assert any("split mode 'none'" in note for note in emitted.notes)
    assert written.flash_attn == ("on" if dialect == "ik_llama.cpp" and rc.flash_attn == "auto" else rc.flash_attn)
    if dialect == "ik_llama.cpp":
        assert "--n-cpu-moe" not in emitted.args


def test_a_line_starts_from_llama_cpp_defaults_not_earlier_settings():
    inventory = make_inventory("tiny-deepseek-v3")
    earlier = parse_llama_args("-ngl 0 -ctk q8_0 -ctv q8_0 -fa off -c 8192", inventory, ONE_GPU).run_config
    pasted = parse_llama_args("-ngl 99 --n-cpu-moe 3", inventory, ONE_GPU)
    assert earlier.type_k == "q8_0" and earlier.flash_attn == "off"
    assert pasted.run_config == LLAMA_CPP_DEFAULTS
    assert parse_llama_args("-ngl 99", inventory, ONE_GPU, dialect="ik_llama.cpp").run_config == IK_LLAMA_CPP_DEFAULTS


def test_model_path_and_override_kv_are_kept_in_the_line():
    inventory = make_inventory("tiny-deepseek-v3")
    parsed = parse_llama_args("llama-server -m '/m/DeepSeek V3.gguf' -ngl 99 --override-kv "
                              "deepseek2.expert_used_count=int:6,general.name=str:x -c 4096", inventory, ONE_GPU)
    assert parsed.override_kv == ("deepseek2.expert_used_count=int:6", "general.name=str:x")
    emitted = emit_llama_args(parsed.placement, parsed.run_config, ONE_GPU, model_path=parsed.model_path,
                              override_kv=parsed.override_kv)
    assert emitted.text == ("-m '/m/DeepSeek V3.gguf' -ngl 5 -c 4096 --override-kv deepseek2.expert_used_count=int:6 "
                            "--override-kv general.name=str:x")
    with pytest.raises(ValueError, match="--override-kv: .*int:, float:, bool: or str:"):
        parse_llama_args("--override-kv deepseek2.expert_used_count=6", inventory, ONE_GPU)


def test_ik_lines_turn_flash_attention_off_explicitly_and_avoid_n_cpu_moe():
    inventory = make_inventory("deepseek-v3")
    parsed = parse_llama_args("-ngl 99 -ts 1,1,1,1 --n-cpu-moe 10 -fa off", inventory, FOUR_GPUS)
    emitted = emit_llama_args(parsed.placement, parsed.run_config, FOUR_GPUS, dialect="ik_llama.cpp")
    assert emitted.text == r"-ngl 62 -ts 1,1,1,1 -ot 'blk\.[3-9]\.ffn_.*_exps=CPU' -fa off"
    default_fa = emit_llama_args(parsed.placement, LLAMA_CPP_DEFAULTS, FOUR_GPUS, dialect="ik_llama.cpp")
    assert "-fa" not in default_fa.args and default_fa.run_config.flash_attn == "on"


@pytest.mark.parametrize("line, preset_name, words", [
    ("-ctv q8_0 -fa off", "tiny-qwen3-moe", "quantized V cache (-ctv q8_0) with flash attention off"),
    ("-ctk q8_0 -ctv f16", "tiny-deepseek-v3", "different K and V cache types on an MLA model"),
    ("-b 256 -ub 512", "tiny-qwen3-moe", "-ub 512 is above -b 256"),
])
def test_combinations_llama_cpp_refuses_are_warned_about_both_ways(line, preset_name, words):
    inventory = make_inventory(preset_name)
    parsed = parse_llama_args(line, inventory, ONE_GPU)
    assert any(words in w for w in parsed.warnings), parsed.warnings
    emitted = emit_llama_args(parsed.placement, parsed.run_config, ONE_GPU)
    assert any(words in n for n in emitted.notes), emitted.notes


def test_allowed_combinations_carry_no_warning():
    hparams = make_inventory("tiny-deepseek-v3").hparams
    assert refused_combinations(RunConfig(type_k="q8_0", type_v="q8_0", flash_attn="auto"), hparams) == []
    assert refused_combinations(RunConfig(type_k="q8_0", flash_attn="off"), make_inventory("tiny-qwen3-moe").hparams) == []
