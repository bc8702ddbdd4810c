"""Shared by the model-level tests: train the reference and a parallel GPT on the same batches and return
everything (loss, full logits, full gradients, final weights) in the reference's layout."""

import torch

from gptpar import GPT, ParallelGPT, init_parallel
from gptpar.models import gather_grads, gather_state_dict
from gptpar.parallel import comm
from gptpar.parallel.data import allreduce_gradients

TOL = dict(rtol=1e-5, atol=1e-6)


def batch(config, seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (b, config.seq_len), generator=g)
    tgt = torch.randint(0, config.vocab_size, (b, config.seq_len), generator=g)
    return idx, tgt


def optimizer(model):
    # SGD with momentum, not Adam: Adam's first steps normalise each gradient to about +-lr, so a gradient
    # near eps (1e-8) turns a 1e-12 rounding difference into a visible weight difference. The comparison
    # is of the parallel model's gradients and updates, which SGD passes through linearly.
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)


def train_reference(config, steps):
    model = GPT(config)
    opt = optimizer(model)
    out = []
    for step in range(steps):
        idx, tgt = batch(config, seed=step)
        logits, loss = model(idx, tgt)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out.append({"logits": logits.detach(), "loss": loss.detach(), "grads": grads})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out, model.state_dict()


def train_parallel(config, layout, steps, options=None):
    """Runs on every rank: a ParallelGPT over ``layout`` trained like :func:`train_reference`."""
    st = init_parallel(layout)
    model = ParallelGPT(config, st, **(options or {}))
    opt = optimizer(model)
    out = []
    for step in range(steps):
        idx, tgt = batch(config, seed=step)
        logits, loss = model(idx, tgt)
        loss.backward()
        allreduce_gradients(model, st.cp)  # cp ranks hold partial gradients of replicated weights
        # Reassemble the full logits: vocab slices over tp, then token shards (in position order) over cp.
        logits = comm.all_gather(logits.detach(), st.tp, dim=-1)
        gathered = comm.all_gather(logits, st.cp, dim=1)
        positions = comm.all_gather(model.local_positions(config.seq_len), st.cp, dim=0)
        full = torch.empty_like(gathered)
        full[:, positions] = gathered
        out.append({"logits": full, "loss": loss.detach(), "grads": gather_grads(model, st.tp)})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out, gather_state_dict(model, st.tp)


def close(got, want, where, tol=TOL):
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{where}: {m}")


def assert_matches_reference(results, reference, label, tol=TOL):
    ref_steps, ref_sd = reference
    for rank, (steps, sd) in enumerate(results):
        for s, (got, want) in enumerate(zip(steps, ref_steps, strict=True)):
            where = f"{label} rank {rank} step {s}"
            close(got["loss"], want["loss"], f"{where} loss", tol)
            close(got["logits"], want["logits"], f"{where} logits", tol)
            assert got["grads"].keys() == want["grads"].keys()
            for n in want["grads"]:
                close(got["grads"][n], want["grads"][n], f"{where} grad {n}", tol)
        assert sd.keys() == ref_sd.keys()
        for n in ref_sd:  # weights after the optimizer steps
            close(sd[n], ref_sd[n], f"{label} rank {rank} weight {n}", tol)


def train_pipeline(config, layout, steps, schedule, micro_batches, v=1, options=None, batch_size=4, seq_len=None):
    """Runs on every rank: the pipeline engine over ``layout`` trained like :func:`train_reference` with
    ``batch_size`` sequences per step. Returns per-step losses and this rank's full (tp-gathered)
    gradients, its final weights, and the last step's stats."""
    from gptpar.pipeline import make_pipeline

    st = init_parallel(layout)
    engine, part = make_pipeline(config, st, schedule, micro_batches, v, **(options or {}))
    params = [p for c in engine.chunks for p in c.parameters()]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    out = []
    for step in range(steps):
        idx, tgt = batch(config, seed=step, b=batch_size)
        if seq_len is not None:
            idx, tgt = idx[:, :seq_len], tgt[:, :seq_len]
        loss = engine.step(idx, tgt)
        grads = {}
        for c in engine.chunks:
            grads.update(gather_grads(c, st.tp))
        out.append({"loss": loss.detach(), "grads": grads})
        opt.step()
        opt.zero_grad(set_to_none=True)
    sd = {}
    for c in engine.chunks:
        sd.update(gather_state_dict(c, st.tp))
    return out, sd, engine.last_stats, part.report()


def merge_pipeline_results(results, config):
    """Union every pp rank's gradients and weights into one reference-shaped result per step."""
    steps = len(results[0][0])
    merged = [{"loss": results[0][0][s]["loss"], "grads": {}} for s in range(steps)]
    sd = {}
    for rank_steps, rank_sd, _, _ in results:
        for s in range(steps):
            assert torch.equal(rank_steps[s]["loss"], merged[s]["loss"]), "pp ranks disagree on the loss"
            merged[s]["grads"].update(rank_steps[s]["grads"])
        sd.update(rank_sd)
    if config.tie_embeddings:
        for s in range(steps):  # the last stage's copy of the tied embedding must equal the first's
            g = merged[s]["grads"]
            if "lm_head.weight" in g:
                close(g.pop("lm_head.weight"), g["wte.weight"], "tied embedding copies' gradients")
    return merged, sd
