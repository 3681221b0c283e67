"""A plot of flatquant's per-layer training losses (from the pass summary)."""
from __future__ import annotations


def plot_losses(summary: dict, path) -> None:
    """A PNG of the per-epoch training loss of every layer (dashed: auto re-training). Draws on
    its own Agg canvas: matplotlib's global state (backend, pyplot) is left alone."""
    from matplotlib import cm
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = max(len(summary.get("layers", [])), 1)
    for j, rec in enumerate(summary.get("layers", [])):
        color = cm.viridis(j / max(n - 1, 1))
        ys = rec.get("epoch_losses") or []
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, color=color, marker="." if len(ys) < 30 else None,
                    label=f"layer {rec['layer']}")
        re = (rec.get("retrain") or {}).get("epoch_losses") or []
        if re:
            ax.plot(range(1, len(re) + 1), re, color=color, linestyle="--", label=f"layer {rec['layer']} (auto)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer output MSE (training mean)")
    ax.set_title("flatquant: per-layer training loss")
    if summary.get("layers"):
        ax.legend(fontsize=7, ncol=2 if n > 8 else 1)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
