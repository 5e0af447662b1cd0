"""Opening the app. Until the designer window lands, this prints the plan of the model."""
from __future__ import annotations


def open_app(model: str | None, sim_gpus: str | None) -> int:
    from engine.default_model import default_model_path
    from app.commands import plan as plan_command
    import argparse
    path = model or str(default_model_path(progress=print))
    args = argparse.Namespace(file=path, sim_gpus=sim_gpus, margin="0", gpu_overhead="450MiB", json=False,
                              llama_args=["-ngl", "all"])
    return plan_command.run(args)
