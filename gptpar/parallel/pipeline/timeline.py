"""Drawing what a pipeline did: every rank's forward, backward, weight-gradient and waiting time."""

from __future__ import annotations

COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#55A868", "W": "#8172B2", "wait": "#C0C0C0"}


def plot_timeline(events_by_rank: list[list[tuple]], path: str, title: str = "pipeline timeline") -> str:
    """Write a PNG of per-rank events ``(kind, mb, chunk, t0, t1)`` (seconds) to ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = len(events_by_rank)
    fig, ax = plt.subplots(figsize=(12, 0.6 * p + 1.5))
    for r, events in enumerate(events_by_rank):
        for kind, mb, chunk, t0, t1 in events:
            ax.barh(
                p - 1 - r,
                (t1 - t0) * 1e3,
                left=t0 * 1e3,
                height=0.8,
                color=COLORS.get(kind, "black"),
                edgecolor="white",
                linewidth=0.5,
            )
            if kind != "wait" and (t1 - t0) > 0:
                ax.text(
                    (t0 + t1) / 2 * 1e3,
                    p - 1 - r,
                    f"{kind}{mb}" + (f".{chunk}" if chunk else ""),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"rank {r}" for r in range(p - 1, -1, -1)])
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, ["forward", "backward", "input grad", "weight grad", "waiting"], loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
