"""Placement: per-tensor and per-expert devices, incremental weight totals, rules, undo, saving."""
import json
import random
import re

import pytest

from engine.devices import Device, simulated_gpus
from engine.plan.inventory import Role
from engine.plan.placement import Moved, Placement, TensorRef, expert_ranges, parse_expert_ranges
from engine.plan.rule_search import layers_regex, range_regex
from preset_inventory import make_inventory

GIB = 1 << 30




DEVICES = [Device("CPU", "cpu", 512 * GIB)] + simulated_gpus("24GiB,24GiB")


@pytest.fixture(scope="module")
def tiny():
    return make_inventory("tiny-deepseek-v3")      # 4 layers (1 dense), 16 experts


@pytest.fixture(scope="module")
def deepseek():
    return make_inventory("deepseek-v3")


def recount(placement):
    """Per-device bytes from scratch, from the per-expert devices."""
    totals = {d: 0 for d in placement.device_names}
    for t in placement.inventory.tensors:
        if placement.is_split(t.name):
            for device in placement.expert_devices(t.name):
                totals[device] += t.expert_bytes
        else:
            totals[placement.device_of(t.name)] += t.n_bytes
    return totals


def test_layer_devices_and_rules_place_every_tensor(tiny):
    layers = ["CUDA0", "CUDA0", "CUDA1", "CUDA1", "CUDA1"]      # 4 layers + output
    p = Placement.from_rules(tiny, DEVICES, layers, [(r"blk\.3\.ffn_up_exps", "CUDA0"), ("exps", "CPU")])
    assert p.device_of("token_embd.weight") == "CPU"            # llama.cpp keeps the input layer on the CPU
    assert p.device_of("output.weight") == "CUDA1"
    assert p.device_of("blk.0.attn_q_a.weight") == "CUDA0"
    assert p.device_of("blk.2.ffn_gate_exps.weight") == "CPU"
    assert p.device_of("blk.3.ffn_up_exps.weight") == "CUDA0"  # first match wins
    assert p.layer_home_device(2) == "CUDA1"
    by_name = tiny.by_name
    expected = {"CPU": by_name["token_embd.weight"].n_bytes, "CUDA0": 0, "CUDA1": 0}
    for t in tiny.tensors:
        if t.layer is None and t.name != "token_embd.weight":
            expected["CUDA1"] += t.n_bytes
        elif t.layer is not None:
            if t.name == "blk.3.ffn_up_exps.weight":
                device = "CUDA0"
            elif re.search("exps", t.name):
                device = "CPU"
            else:
                device = layers[t.layer]
            expected[device] += t.n_bytes
    assert p.weight_bytes() == expected


def test_bad_device_and_bad_rule_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="CUDA7.*available: CPU, CUDA0, CUDA1"):
        Placement.from_rules(tiny, DEVICES, ["CPU"] * 5, [("exps", "CUDA7")])
    with pytest.raises(ValueError, match="invalid tensor pattern"):
        Placement.from_rules(tiny, DEVICES, ["CPU"] * 5, [("blk.(", "CPU")])
    with pytest.raises(ValueError, match="5 entries"):
        Placement.from_rules(tiny, DEVICES, ["CPU"] * 4, [])
    p = Placement(tiny, DEVICES)
    with pytest.raises(ValueError, match="has no experts"):
        p.assign(TensorRef("blk.1.attn_q_a.weight", frozenset({0})), "CUDA0")
    with pytest.raises(ValueError, match="experts 0..15"):
        p.assign(TensorRef("blk.1.ffn_up_exps.weight", frozenset({16})), "CUDA0")
    with pytest.raises(KeyError, match="no tensor"):
        p.device_of("blk.9.attn_q.weight")


def test_expert_moves_split_then_collapse_and_undo(tiny):
    p = Placement(tiny, DEVICES)
    name = "blk.1.ffn_down_exps.weight"
    expert_bytes = tiny.by_name[name].expert_bytes
    before = p.weight_bytes()
    moved = p.assign(TensorRef(name, frozenset({0, 1, 2})), "CUDA1")
    assert moved == [Moved(TensorRef(name, frozenset({0, 1, 2})), "CPU", "CUDA1")]
    assert p.is_split(name)
    assert p.expert_devices(name)[:4] == ("CUDA1", "CUDA1", "CUDA1", "CPU")
    assert p.weight_bytes()["CUDA1"] == 3 * expert_bytes
    assert p.device_bytes(name) == {"CPU": 13 * expert_bytes, "CUDA1": 3 * expert_bytes}
    assert p.device_of(name) == "CPU"                 # where most of its bytes are
    moved2 = p.assign(TensorRef(name, frozenset({2, 3})), "CUDA0")
    assert sorted(m.from_device for m in moved2) == ["CPU", "CUDA1"]
    for m in reversed(moved + moved2):                  # undo, newest first
        p.assign(m.ref, m.from_device)
    assert not p.is_split(name)
    assert p.weight_bytes() == before
    assert p == Placement(tiny, DEVICES)


def test_whole_tensor_move_of_a_split_tensor_reports_each_part(tiny):
    p = Placement(tiny, DEVICES)
    name = "blk.2.ffn_up_exps.weight"
    p.assign(TensorRef(name, frozenset(range(4))), "CUDA0")
    p.assign(TensorRef(name, frozenset(range(4, 6))), "CUDA1")
    moved = p.assign(TensorRef(name), "CUDA1")
    assert {(m.from_device, len(m.ref.experts)) for m in moved} == {("CPU", 10), ("CUDA0", 4)}
    assert p.device_of(name) == "CUDA1" and not p.is_split(name)
    assert p.weight_bytes() == recount(p)


def test_weight_totals_stay_exact_over_random_moves(tiny):
    rng = random.Random(7)
    p = Placement(tiny, DEVICES)
    names = [t.name for t in tiny.tensors]
    expert_names = [t.name for t in tiny.tensors if t.n_experts]
    for _ in range(500):
        device = rng.choice(p.device_names)
        if rng.random() < 0.6:
            experts = frozenset(rng.sample(range(16), rng.randint(1, 16)))
            p.assign(TensorRef(rng.choice(expert_names), experts), device)
        else:
            p.assign(TensorRef(rng.choice(names)), device)
        assert p.weight_bytes() == recount(p)
    assert sum(p.weight_bytes().values()) == tiny.total_bytes


def test_copy_is_independent_and_equal_until_changed(tiny):
    p = Placement(tiny, DEVICES, ["CUDA0"] * 5)
    q = p.copy()
    assert p == q
    q.assign(TensorRef("blk.1.ffn_up_exps.weight", frozenset({5})), "CPU")
    assert p != q
    assert not p.is_split("blk.1.ffn_up_exps.weight")
    assert p.weight_bytes()["CPU"] == tiny.by_name["token_embd.weight"].n_bytes


def test_saved_form_is_small_and_loads_back_equal(deepseek):
    devices = [Device("CPU", "cpu", 512 * GIB)] + simulated_gpus("24GiB,24GiB,24GiB,48GiB")
    layers = ["CPU"] * 30 + ["CUDA0"] * 10 + ["CUDA1"] * 10 + ["CUDA3"] * 12
    p = Placement.from_rules(deepseek, devices, layers, [("ffn_down_exps", "CPU")])
    p.assign(TensorRef("blk.45.ffn_up_exps.weight"), "CPU")
    p.assign(TensorRef("blk.50.ffn_gate_exps.weight", frozenset(range(0, 256, 2))), "CUDA2")
    saved = json.dumps(p.to_dict())
    assert len(saved) < 4000
    data = json.loads(saved)
    assert data["exceptions"] == {"blk.45.ffn_up_exps.weight": "CPU"}
    assert data["experts"]["blk.50.ffn_gate_exps.weight"]["CUDA3"].startswith("1,3,5")
    loaded = Placement.from_dict(deepseek, devices, data)
    assert loaded == p
    assert loaded.weight_bytes() == p.weight_bytes()


def test_home_device_follows_the_attention(tiny):
    p = Placement(tiny, DEVICES, ["CUDA0"] * 5)
    assert p.layer_home_device(1) == "CUDA0"
    for t in tiny.layers[1].tensors:
        if t.role is Role.ATTENTION:
            p.assign(TensorRef(t.name), "CUDA1")
    assert p.layer_home_device(1) == "CUDA1"
    assert p.layer_home_device(2) == "CUDA0"


def test_tensors_outside_layers_go_where_llama_cpp_puts_them():
    scout = make_inventory("tiny-llama-4")
    p = Placement(scout, DEVICES, ["CUDA0", "CUDA0", "CUDA1", "CUDA1", "CUDA1"])
    assert p.device_of("rope_freqs.weight") == "CUDA0"        # created with layer 0
    assert p.device_of("output_norm.weight") == "CUDA1"       # the output layer
    assert p.device_of("token_embd.weight") == "CPU"


@pytest.mark.parametrize("lo, hi, expected", [
    (40, 60, ["[45][0-9]", "60"]),
    (0, 8, ["[0-8]"]),
    (3, 60, ["[3-9]", "[1-5][0-9]", "60"]),
    (9, 99, ["9", "[1-9][0-9]"]),
    (45, 45, ["45"]),
    (95, 123, ["9[5-9]", "1[01][0-9]", "12[0-3]"]),
])
def test_range_regex_matches_exactly_the_range(lo, hi, expected):
    pieces = range_regex(lo, hi)
    assert pieces == expected
    pattern = re.compile(rf"^({'|'.join(pieces)})$")
    assert [n for n in range(200) if pattern.match(str(n))] == list(range(lo, hi + 1))


def test_layers_regex_and_expert_ranges():
    assert layers_regex([(40, 60)]) == "([45][0-9]|60)"
    assert layers_regex([(0, None)]) == "[0-9]+"
    assert expert_ranges({0, 1, 2, 7, 9, 10}) == "0-2,7,9-10"
    assert parse_expert_ranges("0-2,7,9-10") == [0, 1, 2, 7, 9, 10]
