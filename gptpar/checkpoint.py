"""Sharded checkpoints: each rank writes its own shard; a checkpoint appears only when complete.

Layout on disk::

    OUT/checkpoints/step_000020/meta.json        step, layout, model config, run state (rank 0)
    OUT/checkpoints/step_000020/rank_00003.pt    this rank's parameter shards (+ tp specs), optimizer, RNG
    OUT/checkpoints/latest                       "step_000020"

Integrity: every rank file has a SHA-256 beside it (``rank_00003.pt.sha256``), checked before it is
read; every load error names the file. ``latest`` is only ever a ``step_NNNNNN`` name inside OUT. A
checkpoint is never written with a non-finite parameter.

Atomicity: ranks write into ``step_000020.tmp``; after a barrier rank 0 writes ``meta.json``, renames the
folder, then replaces ``latest`` (write-then-rename). A crash at any point leaves the previous ``latest``
pointing at a complete checkpoint. Files load with ``torch.load(weights_only=True)``: no code runs from a
checkpoint.

Resharding: a rank's file records, for every parameter, its tp sharding spec and the rank's coordinates,
so :func:`load_full_state_dict` rebuilds the full (reference-layout) weights from any layout's files, and
:func:`load` shards them for the current one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch

from gptpar.errors import GptparConfigError, GptparError
from gptpar.parallel.mesh import ParallelState
from gptpar.sharding import shard_tensor, tp_spec, unshard_tensor
from gptpar.testing import CRASH_IN_SAVE, fault_point

CRASH_ENV = CRASH_IN_SAVE  # tests: die after writing this rank's file, before the rename (gptpar.testing)


def _root(out: str) -> str:
    return os.path.join(out, "checkpoints")


def latest(out: str) -> str | None:
    """The newest complete checkpoint folder under ``out``, or None if there is none. A ``latest`` pointer
    that names something other than a step folder inside OUT, or a folder that is not there, is an error."""
    path = os.path.join(_root(out), "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    if not re.fullmatch(r"step_\d{6,}", name):
        raise GptparConfigError(f"{path!r} holds {name!r}, not a checkpoint folder name (step_NNNNNN) inside OUT")
    folder = os.path.join(_root(out), name)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        raise GptparConfigError(f"{path!r} points at {name!r}, which is missing or incomplete (no meta.json)")
    return folder


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def prune(out: str, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (never the one ``latest`` names)."""
    root = _root(out)
    current = os.path.basename(latest(out) or "")
    steps = sorted(n for n in os.listdir(root) if re.fullmatch(r"step_\d{6,}", n))
    for name in steps[: max(0, len(steps) - keep)]:
        if name != current:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def verify(folder: str) -> dict:
    """Check a checkpoint folder whole (meta.json, every rank file and its checksum); returns its meta."""
    meta = read_meta(folder)
    for r in range(meta["world_size"]):
        _check_file(os.path.join(folder, f"rank_{r:05d}.pt"))
    return meta


def _barrier(state: ParallelState) -> None:
    if state.world_size > 1:
        from gptpar.parallel import comm

        comm.all_reduce(torch.zeros(1, device=state.device), state.world)


def save(out: str, step: int, chunks, optimizer, state: ParallelState, meta: dict, extra: dict | None = None) -> str:
    """Write this rank's shard of step ``step``; returns the checkpoint folder (collective over the world)."""
    bad = [n for c in chunks for n, p in c.named_parameters() if not torch.isfinite(p).all()]
    flag = torch.tensor([float(bool(bad))], device=state.device)
    if state.world_size > 1:
        from gptpar.parallel import comm

        comm.all_reduce(flag, state.world, op=comm.ReduceOp.MAX)
    if flag.item():  # every rank refuses alike, before anything is written
        raise GptparError(
            f"refusing to write checkpoint step {step}: non-finite values in "
            + (f"{bad[:3]} (rank {state.rank})" if bad else "another rank's parameters")
        )
    name = f"step_{step:06d}"
    final = os.path.join(_root(out), name)
    tmp = final + ".tmp"
    if state.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(state)
    params, specs = {}, {}
    for chunk in chunks:
        for n, p in chunk.named_parameters(remove_duplicate=False):
            params[n] = p.detach().cpu().clone()
            specs[n] = list(tp_spec(p))
    rng = {
        "torch": torch.get_rng_state(),  # tp-local dropout streams too: resume with dropout is bitwise
        "tp_local": [c.rng.state_dict() if getattr(c, "rng", None) is not None else None for c in chunks],
    }
    if torch.cuda.is_available() and state.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(state.device)
    blob = {
        "params": params,
        "specs": specs,
        "coords": state.coords,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "optimizer_by_name": optimizer_state_by_name(optimizer, chunks) if optimizer is not None else None,
        "rng": rng,
        "extra": extra or {},
    }
    path = os.path.join(tmp, f"rank_{state.rank:05d}.pt")
    torch.save(blob, path + ".part")
    with open(path + ".sha256.part", "w") as f:
        f.write(_sha256(path + ".part"))
    os.replace(path + ".sha256.part", path + ".sha256")
    os.replace(path + ".part", path)
    fault_point(step, state.rank, state.world_size, out, where="save")
    _barrier(state)
    if state.rank == 0:
        full_meta = {
            **meta,
            "step": step,
            "world_size": state.world_size,
            "layout": {"tp": state.layout.tp, "pp": state.layout.pp, "dp": state.layout.dp, "cp": state.layout.cp},
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(full_meta, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = os.path.join(_root(out), "latest")
        with open(pointer + ".tmp", "w") as f:
            f.write(name)
        os.replace(pointer + ".tmp", pointer)
    _barrier(state)
    return final


# ---------------------------------------------------------------------------------------------- optimizer state
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def optimizer_state_by_name(optimizer, chunks) -> dict:
    """The optimizer's state keyed by parameter name, in a form any layout can reassemble: AdamW moments
    as this rank's tp pieces (shaped like its parameter); ZeRO-1's flat slices as ``(start, end, state)``
    pieces of each parameter's tp-local flat range (plus its fp32 masters); the step count."""
    from gptpar.parallel.zero import ZeroAdamW

    names = {}
    for c in chunks:
        for n, p in c.named_parameters():
            names.setdefault(p, n)
    if isinstance(optimizer, ZeroAdamW):
        pieces: dict[str, list] = {}
        for prm, start, end, views in optimizer.param_pieces():
            pieces.setdefault(names[prm], []).append((start, end, {k: v.clone() for k, v in views.items()}))
        return {"kind": "zero", "step": optimizer.t, "pieces": pieces}
    dense, step = {}, 0
    for p, n in names.items():
        st = optimizer.state.get(p)
        if st and "exp_avg" in st:
            dense[n] = {k: st[k].detach().clone() for k in ADAM_KEYS}
            step = int(st["step"])
    return {"kind": "adamw", "step": step, "dense": dense}


def _full_optimizer_state(folder: str, meta: dict) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """Every parameter's optimizer state as full (reference-layout) tensors, from any layout's files."""
    by_tp: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    specs, shapes, step = {}, {}, 0
    for r in range(meta["world_size"]):
        blob = _load(os.path.join(folder, f"rank_{r:05d}.pt"), mmap=True)
        opt = blob.get("optimizer_by_name")
        if opt is None:
            raise GptparConfigError(f"checkpoint {folder!r} predates layout-independent optimizer state")
        c, step = blob["coords"], opt["step"]
        for n, spec in blob["specs"].items():
            specs[n] = tuple(spec)
        if opt["kind"] == "adamw":
            if c["dp"] == 0 and c["cp"] == 0:  # dp and cp replicas hold the same moments
                for n, st in opt["dense"].items():
                    by_tp.setdefault(n, {})[c["tp"]] = st
            continue
        for n, pieces in opt["pieces"].items():  # ZeRO: slices spread over dp x cp, per tp rank
            local = blob["params"][n]
            shapes[n, c["tp"]] = local.shape
            flat = by_tp.setdefault(n, {}).setdefault(
                c["tp"], {k: torch.zeros(local.numel()) for k in ("master", *ADAM_KEYS)}
            )
            for start, end, st in pieces:
                for k, v in st.items():
                    flat[k][start:end] = v
    for (n, t), shape in shapes.items():
        by_tp[n][t] = {k: v.view(shape) for k, v in by_tp[n][t].items()}
    full = {}
    for n, pieces in by_tp.items():
        dim, chunks = specs[n]
        keys = pieces[min(pieces)].keys()
        full[n] = {
            k: unshard_tensor([pieces[t][k] for t in sorted(pieces)], dim, chunks)
            if dim is not None
            else pieces[min(pieces)][k].clone()
            for k in keys
        }
    return full, step


@torch.no_grad()
def load_optimizer_resharded(folder: str, meta: dict, optimizer, chunks, state: ParallelState) -> None:
    """Give ``optimizer`` (torch AdamW or ZeRO-1, at this rank's layout) the state saved at any layout."""
    from gptpar.parallel.zero import ZeroAdamW

    full, step = _full_optimizer_state(folder, meta)
    local = {}
    for c in chunks:
        for n, p in c.named_parameters():
            if n not in full:
                raise GptparConfigError(f"checkpoint {folder!r} has no optimizer state for {n!r}")
            dim, ch = tp_spec(p)
            local[p] = {
                k: shard_tensor(v, dim, ch, state.tp.size, state.tp.rank).to(p.device) for k, v in full[n].items()
            }
    if isinstance(optimizer, ZeroAdamW):
        optimizer.load_param_state(lambda p: local[p], step)
        return
    for p, st in local.items():
        optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            **{k: st[k].to(p.dtype).contiguous() for k in ADAM_KEYS},
        }


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise GptparConfigError(f"{folder!r} is not a complete gptpar checkpoint (no meta.json)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GptparConfigError(f"{path!r} is not valid JSON: {e}") from None


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise GptparConfigError(f"checkpoint file {path!r} is missing")
    if not os.path.exists(path + ".sha256"):
        raise GptparConfigError(f"checkpoint file {path!r} has no checksum ({os.path.basename(path)}.sha256)")
    with open(path + ".sha256") as f:
        want = f.read().strip()
    if _sha256(path) != want:
        raise GptparConfigError(
            f"checkpoint file {path!r} is corrupt: its SHA-256 differs from the one written at save "
            f"({os.path.getsize(path)} bytes now)"
        )


def _load(path: str, mmap: bool = False) -> dict:
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # e.g. a file written by something else: name it
        raise GptparConfigError(f"checkpoint file {path!r} cannot be read: {type(e).__name__}: {e}") from None


def iter_full_tensors(folder: str, names: list[str] | None = None):
    """``(name, full tensor)`` for each parameter (reference names; ``names`` picks and orders them), rebuilt
    from a checkpoint of any layout one at a time: the rank files are memory-mapped, so only the pieces of
    the tensor being assembled are read. A tied output layer missing from a file is the embedding."""
    meta = read_meta(folder)
    blobs, holders, specs = {}, {}, {}
    for r in range(meta["world_size"]):
        blob = _load(os.path.join(folder, f"rank_{r:05d}.pt"), mmap=True)
        c = blob["coords"]
        if c["dp"] != 0 or c["cp"] != 0:
            continue  # replicas
        blobs[r] = blob
        for n in blob["params"]:
            holders.setdefault(n, {})[c["tp"]] = r
            specs[n] = tuple(blob["specs"][n])
    for n in names if names is not None else list(holders):
        src = n if n in holders else ("wte.weight" if n == "lm_head.weight" else None)
        if src not in holders:
            raise GptparConfigError(f"checkpoint {folder!r} has no parameter {n!r}")
        by_tp = holders[src]
        dim, chunks = specs[src]
        pieces = [blobs[by_tp[t]]["params"][src] for t in sorted(by_tp)]
        yield n, (unshard_tensor(pieces, dim, chunks) if dim is not None else pieces[0].clone())


def load_full_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """The full, unsharded weights (reference parameter names) from a checkpoint of any layout."""
    return dict(iter_full_tensors(folder))


def check_config(meta: dict, config_dict: dict, folder: str) -> None:
    from dataclasses import fields

    from gptpar.models.gpt import GPTConfig

    # a field newer than the checkpoint reads as its default (what the checkpoint's model had)
    defaults = {f.name: f.default for f in fields(GPTConfig)}
    saved = meta.get("model", {})
    diffs = [
        f"{k}: checkpoint {saved.get(k, defaults.get(k))!r} vs now {v!r}"
        for k, v in config_dict.items()
        if saved.get(k, defaults.get(k)) != v
    ]
    if diffs:
        raise GptparConfigError(f"checkpoint {folder!r} was saved for a different model ({'; '.join(diffs)})")


def load(folder: str, chunks, optimizer, state: ParallelState, config_dict: dict) -> dict:
    """Restore weights (any saved layout) and, for the same layout, optimizer and RNG state. Returns meta."""
    meta = read_meta(folder)
    check_config(meta, config_dict, folder)
    same_layout = meta["layout"] == {
        "tp": state.layout.tp,
        "pp": state.layout.pp,
        "dp": state.layout.dp,
        "cp": state.layout.cp,
    }
    if same_layout:
        blob = _load(os.path.join(folder, f"rank_{state.rank:05d}.pt"))
        with torch.no_grad():
            for chunk in chunks:
                for n, p in chunk.named_parameters(remove_duplicate=False):
                    p.copy_(blob["params"][n])
        if optimizer is not None and blob["optimizer"] is not None:
            optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"]["torch"])
        for c, sd in zip(chunks, blob["rng"].get("tp_local", []), strict=False):
            if sd is not None and getattr(c, "rng", None) is not None:
                c.rng.load_state_dict(sd)
        if "cuda" in blob["rng"] and state.device.type == "cuda":
            torch.cuda.set_rng_state(blob["rng"]["cuda"], state.device)
        meta["resharded"] = False
        meta["extra"] = blob["extra"]
        return meta
    full = load_full_state_dict(folder)
    with torch.no_grad():
        for chunk in chunks:
            for n, p in chunk.named_parameters(remove_duplicate=False):
                src = full.get(n, full.get("wte.weight") if n == "lm_head.weight" else None)
                if src is None:
                    raise GptparConfigError(f"checkpoint {folder!r} has no parameter {n!r}")
                dim, c = tp_spec(p)
                p.copy_(shard_tensor(src, dim, c, state.tp.size, state.tp.rank))
    if optimizer is not None:
        load_optimizer_resharded(folder, meta, optimizer, chunks, state)
    meta["resharded"] = True
    meta["extra"] = {}
    if state.rank == 0:
        print(f"gptpar: resharded checkpoint from {meta['layout']} to {state.layout} (weights and optimizer state)")
    return meta


def export_checkpoint(ckpt: str, out: str, *, dtype: torch.dtype | None = None, **kw) -> str:
    """A transformers directory from a gptpar checkpoint saved at any layout, one parameter at a time
    (the shards are memory-mapped; no whole model is assembled). Returns ``out``."""
    from gptpar.models.gpt import GPTConfig
    from gptpar.models.hf import architecture_of, hf_shapes, source_dtype, write_hf_dir

    meta = read_meta(ckpt)
    config = GPTConfig.from_dict(meta["model"])
    hf = meta.get("hf") or {}
    dtype = dtype or (source_dtype(hf["config"]) if hf.get("config") else torch.float32)
    arch = architecture_of(config)
    names = list(hf_shapes(config, arch))
    write_hf_dir(
        out,
        config,
        iter_full_tensors(ckpt, names),
        dtype=dtype,
        base_config=hf.get("config"),
        tokenizer_dir=meta.get("tokenizer_dir"),
        **kw,
    )
    return out
