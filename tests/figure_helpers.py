"""What the figure tests share: reading a drawn figure's tick labels."""
from typing import Any


def overlapping_tick_labels(fig: Any) -> list[str]:
    """The x tick labels of ``fig`` that overlap a neighbour once drawn (for tests of every figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)  # a closed figure too
    canvas.draw()
    renderer, found = canvas.get_renderer(), []
    for ax in fig.axes:
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.get_xticklabels()
                 if t.get_visible() and t.get_text()]
        found += [f"{a} / {b}" for (a, box_a), (b, box_b) in zip(boxes, boxes[1:]) if box_a.overlaps(box_b)]
    return found
