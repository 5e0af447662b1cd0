"""offload-studio chat -m FILE: a terminal chat through the model's chat template."""
from __future__ import annotations

import sys

from app.commands.model_args import ACCEPTS_LLAMA_ARGS, add_model_arguments, load_model  # noqa: F401
from app.commands.run import DEFAULT_CTX, add_sampling_arguments, print_stats, sampler_settings, stream
from engine.gguf.quoting import printable
from engine.text.chat_template import ChatTemplate
from engine.run.generate import Session, generate


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("-sys", "--system-prompt", default="", help="system message")
    add_sampling_arguments(p)


def run(args) -> int:
    loaded = load_model(args, n_ctx_default=DEFAULT_CTX)
    template = ChatTemplate.from_metadata(loaded.model.metadata, loaded.model.file.architecture)
    session = Session(loaded.model, loaded.tokenizer)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    print(f"chat with {printable(loaded.model.file.name, 200)} ({template.name} template); an empty line or "
          "Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        prompt = loaded.tokenizer.encode(template.render_prompt(messages), add_special=True, parse_special=True)
        try:
            last, reply = stream(generate(session, prompt, sampler_settings(args), args.n_predict, args.stop))
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
            continue
        print()
        print_stats(last)
        messages.append({"role": "assistant", "content": reply})
    return 0
