"""The `offload-studio` command: no subcommand opens the app; subcommands are imported lazily
so that none of them imports PySide6."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "inspect": ("app.commands.inspect", "show a GGUF's metadata, quant mix, per-layer sizes and tensors"),
    "plan": ("app.commands.plan", "per-device memory plan for llama.cpp-style placement flags"),
    "synth": ("app.commands.synth", "write a synthetic GGUF of a real model's shape"),
    "bench": ("app.commands.bench", "prompt/generation tokens per second, or planner timings (--planner)"),
    "run": ("app.commands.run", "stream a completion of a prompt"),
    "chat": ("app.commands.chat", "chat in the terminal through the model's chat template"),
    "eval": ("app.commands.eval", "write the logits of a token sequence to a .npy file"),
    "tokenize": ("app.commands.tokenize", "print the token ids of a text, like llama-tokenize"),
    "perplexity": ("app.commands.perplexity", "perplexity and KL divergence, like llama-perplexity"),
    "screenshots": ("app.commands.screenshots", "render a PNG of each panel, offscreen"),
}


def app_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:10s} {help_text}" for name, (_, help_text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="offload-studio", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan and run GGUF models across CPU and GPUs.",
        epilog=f"commands (offload-studio COMMAND --help):\n{commands}")
    parser.add_argument("model", nargs="?", help="GGUF file to open in the app (default: the built-in model)")
    parser.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,24GiB,48GiB")
    return parser


def command_parser(name: str):
    """The parser of one subcommand; only that subcommand's module is imported."""
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"offload-studio {name}", description=help_text)
    module.add_arguments(parser)
    return module, parser


def split_llama_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate our own options from llama.cpp flags. Only exact option strings are ours:
    argparse alone would read llama.cpp's `-ngl 99` as our `-n` with the value `gl`."""
    actions = parser._option_string_actions
    ours, theirs, i = [], [], 0
    positionals = [a for a in parser._actions if not a.option_strings and a.dest != "llama_args"]
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0] if token.startswith("--") else token
        action = actions.get(name)
        if action is not None:
            takes_value = action.nargs != 0 and "=" not in token
            ours += argv[i:i + 1 + int(takes_value)]
            i += 1 + int(takes_value)
        elif not token.startswith("-") and len([t for t in ours if not t.startswith("-")]) < len(positionals) \
                and not theirs:
            ours.append(token)
            i += 1
        else:
            theirs.append(token)
            i += 1
    return ours, theirs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        module, parser = command_parser(argv[0])
        if getattr(module, "ACCEPTS_LLAMA_ARGS", False):
            ours, theirs = split_llama_args(parser, argv[1:])
            args = parser.parse_args(ours)
            args.llama_args = theirs
        else:
            args = parser.parse_args(argv[1:])
        from engine.errors import user_error_message
        try:
            return module.run(args) or 0
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:         # output piped into `head` and the like
            sys.stderr.close()
            return 0
        except Exception as e:      # a user-facing command reports errors in one line
            message = user_error_message(e)
            if message is None:
                raise
            print(f"offload-studio {argv[0]}: error: {message}", file=sys.stderr)
            return 2
    args = app_parser().parse_args(argv)
    from app.main import open_app
    return open_app(args.model, args.sim_gpus)


if __name__ == "__main__":
    sys.exit(main())
