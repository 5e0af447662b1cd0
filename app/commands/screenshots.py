"""offload-studio screenshots --out DIR [MODEL]: a PNG of each panel, rendered offscreen."""
from __future__ import annotations

import os


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("model", nargs="?", help="GGUF file (default: the built-in model)")
    p.add_argument("--sim-gpus", default="24GiB,24GiB", help="simulated GPUs shown in the designer")
    p.add_argument("--run-model", help="runnable GGUF for the perplexity panel, and the chat panel without "
                                       "--chat-model (default: the built-in base model)")
    p.add_argument("--chat-model", help="runnable GGUF for the chat panel (default: the built-in chat model "
                                        "when one is installed)")


def run(args) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from app.screenshots import render_screenshots
    from engine.synth.default_model import default_model_path, smollm2_path
    default = str(default_model_path(print))
    run_model = args.run_model or default
    chat_model = args.chat_model or (None if args.run_model else smollm2_path())
    for path in render_screenshots(args.out, args.model or default, args.sim_gpus, run_model, chat_model):
        print(path)
    return 0
