"""Human-readable sizes, the way llama.cpp's logs print them (binary units)."""


def format_bytes(n_bytes: int) -> str:
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def mib(n_bytes: int) -> float:
    return n_bytes / (1 << 20)
