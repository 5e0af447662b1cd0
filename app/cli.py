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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        module, parser = command_parser(argv[0])
        args = parser.parse_args(argv[1:])
        from engine.errors import user_error_message
        try:
            return module.run(args) or 0
        except KeyboardInterrupt:
            return 130
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
