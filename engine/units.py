"""Human-readable sizes, the way llama.cpp's logs print them (binary units)."""


def format_bytes(n_bytes: int) -> str:
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def format_ranges(values, dash: str = "-", sep: str = ",") -> str:
    """[0, 1, 2, 7] -> '0-2,7': runs of consecutive whole numbers."""
    out, run = [], []
    for v in sorted(values):
        if run and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(f"{run[0]}{dash}{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [v]
    if run:
        out.append(f"{run[0]}{dash}{run[-1]}" if len(run) > 1 else str(run[0]))
    return sep.join(out)


def mib(n_bytes: int) -> float:
    return n_bytes / (1 << 20)
