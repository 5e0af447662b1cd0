"""Our CPU logits against llama.cpp's on every fixture of ../shared/fixtures, per variant: rel over
all rows, the median row rel and the mean KL (fixtures README), batched and through the KV cache.

    python tools/fixture_errors.py [--activations llama.cpp|f32] [--fa off|on] [--fixtures DIR]

llama.cpp activations are compared with `logits_batch` / `logits_incr` (its default settings: F16
cache, flash attention off, so `--fa off` is the like-for-like run); f32 activations with the exact
`logits_batch_f32ref` (F32 cache)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from engine.run.model import Model
from engine.run_config import RunConfig

# the fixture tests' own measures, so the figures printed here are the ones they assert on
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from forward_parity import INCR_STEPS, batch_and_incremental, kl_mean, rel, row_rel  # noqa: E402

DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def errors(mine: np.ndarray, ref: np.ndarray) -> str:
    """rel / median row rel / mean KL(ref || mine)."""
    return f"{rel(mine, ref):.2e} / {np.median(row_rel(mine, ref)):.2e} / {kl_mean(mine, ref):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", choices=("llama.cpp", "f32"), default="llama.cpp")
    parser.add_argument("--fa", choices=("off", "on"), default="off")
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = parser.parse_args()
    exact = args.activations == "f32"
    cache_type = "f32" if exact else "f16"
    config = RunConfig(n_ctx=512, type_k=cache_type, type_v=cache_type, activations=args.activations,
                       flash_attn=args.fa)
    print(f"activations {args.activations}, -fa {args.fa}: rel / row-med rel / KL, batched | through the cache")
    for fixture in sorted(p for p in args.fixtures.iterdir() if (p / "meta.json").is_file()):
        meta = json.loads((fixture / "meta.json").read_text())
        tokens = np.load(fixture / "tokens.npy")
        for variant, info in meta["variants"].items():
            names = ("logits_batch_f32ref", "logits_batch_f32ref") if exact else ("logits_batch", "logits_incr")
            if not all((fixture / f"{variant}.{name}.npy").is_file() for name in names):
                continue
            batch, incr = batch_and_incremental(Model.load(fixture / f"{variant}.gguf", config), tokens)
            ref_batch, ref_incr = (np.load(fixture / f"{variant}.{name}.npy") for name in names)
            if exact:
                ref_incr = ref_incr[-INCR_STEPS:]
            tolerance = info["recommended_tolerance"]
            keep = [r for r in range(len(ref_batch)) if exact or r not in tolerance["logits_batch"]["exclude_rows"]]
            print(f"{fixture.name:12s} {variant:7s} {errors(batch[keep], ref_batch[keep])} | {errors(incr, ref_incr)}",
                  flush=True)


if __name__ == "__main__":
    main()
