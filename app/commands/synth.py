"""offload-studio synth --preset NAME --quant TYPE -o out.gguf [--sparse]: a synthetic GGUF of a real shape."""
from engine.synth.writer import add_synth_arguments as add_arguments, run_synth as run

__all__ = ["add_arguments", "run"]
