"""Drawing what a pipeline did: every rank's forward, backward, weight-gradient and waiting time."""

from __future__ import annotations

COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#55A868", "W": "#8172B2", "wait": "#C0C0C0"}


def simulated_events(actions: list[list], v: int = 1, cost: dict | None = None, style: str = "loop") -> list[list]:
    """A schedule's per-rank events ``(kind, mb, chunk, t0, t1)`` as :func:`.schedules.simulate` runs it
    (time in cost units), for :func:`plot_timeline`: what the schedule should look like, beside what a
    recorded step (``PipelineEngine(record=True)``) did."""
    from gptpar.parallel.pipeline.schedules import simulate

    cost = cost or {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
    sim = simulate(actions, v, cost, style)
    return [
        [(a.kind, a.mb, a.chunk, sim.start[(r, i)], sim.start[(r, i)] + cost[a.kind]) for i, a in enumerate(acts)]
        for r, acts in enumerate(actions)
    ]


def plot_timeline(
    events_by_rank: list[list[tuple]], path: str, title: str = "pipeline timeline", unit: str = "ms"
) -> str:
    """Write a PNG of per-rank events ``(kind, mb, chunk, t0, t1)`` (seconds; ``unit="steps"``: simulated
    cost units) to ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 1e3 if unit == "ms" else 1.0
    p = len(events_by_rank)
    fig, ax = plt.subplots(figsize=(12, 0.6 * p + 1.5))
    for r, events in enumerate(events_by_rank):
        for kind, mb, chunk, t0, t1 in events:
            ax.barh(
                p - 1 - r,
                (t1 - t0) * k,
                left=t0 * k,
                height=0.8,
                color=COLORS.get(kind, "black"),
                edgecolor="white",
                linewidth=0.5,
            )
            if kind != "wait" and (t1 - t0) > 0:
                ax.text(
                    (t0 + t1) / 2 * k,
                    p - 1 - r,
                    f"{kind}{mb}" + (f".{chunk}" if chunk else ""),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"rank {r}" for r in range(p - 1, -1, -1)])
    ax.set_xlabel("time (ms)" if unit == "ms" else "time (simulated units)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, ["forward", "backward", "input grad", "weight grad", "waiting"], loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
