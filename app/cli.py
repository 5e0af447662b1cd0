"""The `offload-studio` command: no subcommand opens the app; subcommands are imported lazily
so that none of them imports PySide6."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
from pathlib import Path

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
    "warmup": ("app.commands.warmup", "compile the CPU kernels for a model (or the built-in ones) ahead of time"),
}


def app_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:10s} {help_text}" for name, (_, help_text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="offload-studio", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan and run GGUF models across CPU and GPUs.",
        epilog=f"commands (offload-studio COMMAND --help):\n{commands}")
    parser.add_argument("model", nargs="?", help="GGUF file to open in the app (default: the built-in model)")
    parser.add_argument("--sim-gpus", help="simulated GPUs, e.g. 24GiB,24GiB,48GiB")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
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


DEBUG_FLAG = "--debug"      # keeps the traceback of an error that would be reported in one line


def mistyped_command(argv: list[str]) -> str | None:
    """The first argument when it can only be a misspelt subcommand: not an option, not an
    existing file, not something that looks like a path to a model."""
    if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:
        return None
    word = argv[0]
    if os.sep in word or "." in word or Path(word).exists():
        return None
    return word


COMPILE_NOTICE = "compiling CPU kernels for this machine (first run, once)..."


@contextlib.contextmanager
def compile_notice(module):
    """A command that runs a model says so, once, when Numba starts compiling kernels (a cold
    cache takes about a minute to the first token, silent otherwise); `warmup` shows its own."""
    if not getattr(module, "ACCEPTS_LLAMA_ARGS", False) or getattr(module, "REPORTS_COMPILES", False):
        yield
        return
    from kernels.compile_progress import counting_compiles
    told = False

    def tell(progress) -> None:
        nonlocal told
        if progress.active and not told:
            told = True
            print(COMPILE_NOTICE, file=sys.stderr, flush=True)

    with counting_compiles(tell):
        yield


def run_command(name: str, argv: list[str], debug: bool) -> int:
    module, parser = command_parser(name)
    if getattr(module, "ACCEPTS_LLAMA_ARGS", False):
        ours, theirs = split_llama_args(parser, argv)
        args = parser.parse_args(ours)
        args.llama_args = theirs
    else:
        args = parser.parse_args(argv)
    from app.commands.common import escaped_stdout
    from engine.errors import user_error_message
    try:
        with escaped_stdout(), compile_notice(module):
            return module.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:         # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except Exception as e:      # a user-facing command reports errors in one line
        message = user_error_message(e)
        if message is None or debug:
            raise
        print(f"offload-studio {name}: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:], debug)
    word = mistyped_command(argv)
    if word is not None:
        close = difflib.get_close_matches(word, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"offload-studio: error: unknown command {word!r}: {hint}commands: {', '.join(COMMANDS)} "
              f"(a model to open needs a path, e.g. ./{word})", file=sys.stderr)
        return 2
    args = app_parser().parse_args(argv)
    from app.main import open_app
    return open_app(args.model, args.sim_gpus)


if __name__ == "__main__":
    sys.exit(main())
