"""offload-studio perplexity -m FILE -f TEXT -c 512 [--chunks N]: llama-perplexity's method and output,
and KL divergence against a saved base (--kl-divergence-base FILE, then --kl-divergence)."""
from __future__ import annotations

import sys
from pathlib import Path

from app.commands.model_args import ACCEPTS_LLAMA_ARGS, add_model_arguments, load_model  # noqa: F401
from engine.eval import perplexity as ppl


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("-f", "--file", required=True, help="text file")
    p.add_argument("--chunks", type=int, default=0, help="evaluate at most this many chunks (0: all)")
    p.add_argument("--kl-divergence-base", metavar="FILE",
                   help="with --kl-divergence: the base to compare with; without: where to save this run as a base")
    p.add_argument("--kl-divergence", action="store_true", help="compare with the base instead of computing PPL")


def chunk_evaluator(model):
    def eval_chunk(tokens):
        cache = model.new_cache()
        return model.eval_logits(tokens, cache)
    return eval_chunk


def run(args) -> int:
    if "-c" not in args.llama_args and "--ctx-size" not in args.llama_args:
        args.llama_args = [*args.llama_args, "-c", "512"]
    loaded = load_model(args)
    tokenizer, model = loaded.tokenizer, loaded.model
    n_ctx = loaded.parsed.run_config.n_ctx
    text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    tokens = tokenizer.encode(text, add_special=True)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    n_chunks = args.chunks or None
    print(f"perplexity: tokenized {len(tokens)} tokens; calculating over chunks of {n_ctx}", file=sys.stderr)
    if args.kl_divergence:
        if not args.kl_divergence_base:
            raise ValueError("--kl-divergence needs --kl-divergence-base FILE (saved by an earlier run)")
        events = ppl.kl_divergence(tokens, n_ctx, chunk_evaluator(model), args.kl_divergence_base, bos, n_chunks)
        return print_kld(events)
    if args.kl_divergence_base:
        events = ppl.save_kl_base(tokens, n_ctx, chunk_evaluator(model), args.kl_divergence_base, bos, n_chunks)
    else:
        events = ppl.perplexity(tokens, n_ctx, chunk_evaluator(model), bos, n_chunks)
    for event in events:
        if isinstance(event, ppl.PerplexityResult):
            print()
            print(ppl.format_final_estimate(event))
        else:
            if event.chunk == 1:
                print(ppl.format_eta(event), file=sys.stderr)
            print(ppl.format_perplexity_line(event), end="", flush=True)
    return 0


def print_kld(events) -> int:
    for event in events:
        if isinstance(event, ppl.KLDivergenceStats):
            print()
            print(ppl.format_kld_report(event))
        else:
            print(ppl.format_kld_chunk_line(event), flush=True)
    return 0
