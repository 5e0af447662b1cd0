"""llama-bench-style speed: prompt processing (pp) and text generation (tg) tokens per second."""
from __future__ import annotations

import time

import numpy as np

from app.commands.common import print_table
from app.commands.model_args import load_model


def bench_inference(args) -> int:
    loaded = load_model(args, n_ctx_default=max(512, args.n_prompt + args.n_gen + 1))
    model = loaded.model
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.hparams.n_vocab, args.n_prompt, dtype=np.int32)
    model.eval_logits(prompt[:8], model.new_cache(), last_only=True)        # compile and warm up
    pp, tg = [], []
    for _ in range(args.repetitions):
        cache = model.new_cache()
        start = time.perf_counter()
        model.eval_logits(prompt, cache, last_only=True)
        pp.append(args.n_prompt / (time.perf_counter() - start))
        token = np.array([1], dtype=np.int32)
        start = time.perf_counter()
        for _ in range(args.n_gen):
            model.eval_logits(token, cache)
        tg.append(args.n_gen / (time.perf_counter() - start))
    threads = args.threads or "all"
    rows = [[loaded.model.file.name, f"pp{args.n_prompt}", threads, f"{np.mean(pp):.2f} ± {np.std(pp):.2f}"],
            [loaded.model.file.name, f"tg{args.n_gen}", threads, f"{np.mean(tg):.2f} ± {np.std(tg):.2f}"]]
    print_table(["model", "test", "threads", "t/s"], rows)
    return 0
