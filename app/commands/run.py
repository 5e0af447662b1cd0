"""offload-studio run -m FILE -p PROMPT: stream a completion of the prompt (no chat template)."""
from __future__ import annotations

import sys

from app.commands.model_args import ACCEPTS_LLAMA_ARGS, add_model_arguments, load_model  # noqa: F401
from engine.run.generate import Session, generate
from engine.run.sampling import SamplerSettings

DEFAULT_CTX = 4096


def add_sampling_arguments(p) -> None:
    defaults = SamplerSettings()
    p.add_argument("-n", "--n-predict", type=int, default=256, help="tokens to generate")
    p.add_argument("--temp", type=float, default=defaults.temperature, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=defaults.top_k)
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--min-p", type=float, default=defaults.min_p)
    p.add_argument("--repeat-penalty", type=float, default=defaults.repeat_penalty)
    p.add_argument("--repeat-last-n", type=int, default=defaults.repeat_last_n)
    p.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty)
    p.add_argument("--frequency-penalty", type=float, default=defaults.frequency_penalty)
    p.add_argument("-s", "--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampler_settings(args) -> SamplerSettings:
    return SamplerSettings(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                           presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                           seed=args.seed)


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="text to continue")
    add_sampling_arguments(p)


def stream(events, out=None) -> tuple[object, str]:
    """Print each event's text as it comes; return the last event and the whole text."""
    out = out or sys.stdout
    last, pieces = None, []
    for last in events:
        out.write(last.text)
        out.flush()
        pieces.append(last.text)
    return last, "".join(pieces)


def print_stats(last) -> None:
    print(f"\n[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} t/s, {last.generation_tokens} generated "
          f"at {last.generation_tps:.1f} t/s, finished: {last.finish_reason}]", file=sys.stderr)


def run(args) -> int:
    loaded = load_model(args, n_ctx_default=DEFAULT_CTX)
    session = Session(loaded.model, loaded.tokenizer)
    prompt = loaded.tokenizer.encode(args.prompt, add_special=True, parse_special=True)
    print(args.prompt, end="")
    last, _ = stream(generate(session, prompt, sampler_settings(args), args.n_predict, args.stop))
    print_stats(last)
    return 0
