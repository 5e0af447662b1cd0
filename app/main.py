"""Opening the app: the main window on the given model, or on the built-in default model."""
from __future__ import annotations


def open_app(model: str | None, sim_gpus: str | None) -> int:
    from app.app import run_app
    return run_app(model, sim_gpus)
