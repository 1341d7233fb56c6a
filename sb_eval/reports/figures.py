"""A matplotlib figure as the bytes of a PNG file, for the reports to write atomically."""

from __future__ import annotations

import io

from matplotlib.figure import Figure


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
