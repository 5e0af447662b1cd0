"""expert_rows, the MoE row mapping: every (token, expert) pair once, rows grouped by device (in
the order of each device's lowest selected expert), then by ascending expert, tokens ascending
within an expert, and the maps back to the router's (T, k) slots."""
import numpy as np
import pytest

from engine.arch.layers import expert_rows


@pytest.mark.parametrize("seed", range(20))
def test_rows_are_grouped_by_device_then_expert(seed):
    rng = np.random.default_rng(seed)
    n_expert, n_tokens = int(rng.integers(2, 40)), int(rng.integers(1, 30))
    check_rows(rng, n_expert, n_tokens, rng.integers(0, 3, n_expert))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("n_devices", [1, 2])
def test_a_decode_step_maps_the_same_way(seed, n_devices):
    """One token (the shortcut of one device, the general mapping of two)."""
    rng = np.random.default_rng(seed)
    n_expert = int(rng.integers(2, 130))
    check_rows(rng, n_expert, 1, rng.integers(0, n_devices, n_expert))


def check_rows(rng, n_expert, n_tokens, device_of):
    k = int(rng.integers(1, min(8, n_expert) + 1))
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(n_tokens)]).astype(np.int64)
    rows = expert_rows(ids, lambda e: f"CUDA{device_of[e]}")

    spans = [(device, span) for device, device_spans in rows.segments for span in device_spans]
    assert [a for _, (_, a, _) in spans] == [0] + [b for _, (_, _, b) in spans[:-1]]
    assert spans[-1][1][2] == ids.size == len(rows.row_token)
    devices = [device for device, _ in rows.segments]
    assert len(set(devices)) == len(devices)
    assert devices == sorted(devices, key=lambda d: min(e for e in np.unique(ids) if f"CUDA{device_of[e]}" == d))
    for device, device_spans in rows.segments:
        experts = [e for e, _, _ in device_spans]
        assert experts == sorted(experts) and all(f"CUDA{device_of[e]}" == device for e in experts)
        for expert, a, b in device_spans:
            tokens = rows.row_token[a:b]
            assert tokens.tolist() == np.nonzero((ids == expert).any(axis=1))[0].tolist()
            slots = rows.row_slot[a:b] - tokens * k
            assert (ids[tokens, slots] == expert).all()

    row_expert = ids.reshape(-1)[rows.row_slot]
    assert np.array_equal(rows.slot_order, np.argsort(ids, axis=-1, kind="stable"))
    assert np.array_equal(rows.row_token[rows.slot_row], np.repeat(np.arange(n_tokens)[:, None], k, axis=1))
    assert np.array_equal(row_expert[rows.slot_row], np.sort(ids, axis=-1))
