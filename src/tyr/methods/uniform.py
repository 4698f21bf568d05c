"""Uniform structural pruning: every block pruned by the same fraction with the local pruner and
full (chosen-path) error propagation — block b is calibrated on the outputs of the already
pruned blocks < b. The paper's local-pruning baseline (docs/algorithm.md §10.2, Table 4)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tyr import arch
from tyr.arch import ArchSpec
from tyr.budget import Shape, attn_structures, initial_centres, layout
from tyr.local import (
    DAMP,
    GQA_MODES,
    SALIENCIES,
    SCHEDULES,
    Solution,
    magnitude_order,
    make_problem,
    prune_attention,
    solution_for_kept,
    solve,
)
from tyr.modeling import LayerPlan
from tyr.stream import (
    BlockInputs,
    LazyModel,
    collect_gram,
    editing,
    intermediate_placement,
    on_device,
    propagate_mlp,
)

__all__ = ["SolverOptions", "prune_uniform"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolverOptions:
    saliency: str = SALIENCIES[0]
    schedule: str = SCHEDULES[0]
    gqa: str = GQA_MODES[0]
    solver: str = "obs"  # "magnitude": baseline ranking by weight norm, no compensation, no refit
    damp: float = DAMP


def _solve_mlp(W: Tensor, H: Tensor, r: int, opt: SolverOptions) -> Solution:
    if opt.solver == "magnitude":
        problem = make_problem(W, H, damp=opt.damp)
        gone = set(magnitude_order(problem.W, 1)[:r])
        kept = torch.tensor([j for j in range(W.shape[0]) if j not in gone], dtype=torch.long)
        return solution_for_kept(problem, kept, 1, refit_weights=False)
    return solve(W, H, 1, r, saliency=opt.saliency, schedule=opt.schedule, damp=opt.damp)


@torch.inference_mode()
def prune_uniform(
    model: nn.Module,
    spec: ArchSpec,
    shape: Shape,
    inputs: BlockInputs,
    sparsity: float,
    opt: SolverOptions,
    device: str = "cpu",
    lazy: LazyModel | None = None,
) -> list[LayerPlan | None]:
    """Prune every block in place (masked: refitted o_proj/down_proj with zero columns) and
    return the per-block plans. `inputs` (block-0 inputs) are consumed: on return they hold the
    pruned model's final hidden states. A lazy model (`lazy`, :mod:`tyr.stream.lazy`) is read and written one
    block at a time."""
    centres = initial_centres(shape, sparsity, opt.gqa)  # the search's level 0
    # A lazy model is pruned in the low-memory way throughout: the MLP's d_ff-wide intermediate
    # activations, 4× the hidden states, wait on disk (or are recomputed) while down_proj is solved.
    streamed = lazy is not None
    plans: list[LayerPlan | None] = []
    blocks = arch.layers(model, spec)
    with tqdm(total=len(blocks), desc="pruning blocks", unit="block") as bar:
        for b, layer in enumerate(blocks):
            with editing(layer, lazy), on_device(layer, device, lazy):
                a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)
                H_A = collect_gram(layer, a.o, inputs, device).H
                sol_a = prune_attention(
                    make_problem(a.o.weight.T, H_A, damp=opt.damp),
                    shape,
                    attn_structures(shape, centres["attn"][b], opt.gqa),
                    mode=opt.gqa,
                    saliency=opt.saliency,
                    magnitude=opt.solver == "magnitude",
                )
                heads = layout(sol_a.kept.tolist(), shape.n_q, shape.n_kv)
                a.o.weight.copy_(sol_a.weight.T.to(a.o.weight))

                # Pass 2 (sequential): down_proj statistics under the pruned attention.
                solved: list[Solution] = []

                def choose(H: Tensor, m=m, b=b, solved=solved) -> Tensor:
                    solved.append(_solve_mlp(m.down.weight.T, H, centres["mlp"][b], opt))
                    return solved[0].weight.T

                propagate_mlp(
                    layer,
                    m.down,
                    inputs,
                    choose,
                    residual=spec.mlp_output_is_residual,
                    device=device,
                    z_offload=intermediate_placement(inputs.hidden.offload, device, streamed),
                )
                sol_f = solved[0]
                kept = tuple(sol_f.kept.tolist())
                plan = LayerPlan(heads, kept, None, None)  # a lazy block keeps its weights on disk
                if not streamed:
                    plan.o_weight, plan.down_weight = plan.consumers(
                        a.o.weight.detach().to("cpu"), m.down.weight.detach().to("cpu"), shape.head_dim
                    )
                plans.append(plan)
                eps = (sol_a.eps, sol_f.eps)
                del sol_a, sol_f, solved  # full-size solver weights: freed before the block is written
            log.debug(
                "block %d: heads %d/%d, kv %d, neurons %d, eps %.4f / %.4f",
                b,
                len(heads.kept_q),
                shape.n_q,
                len(heads.kept_kv),
                len(kept),
                *eps,
            )
            bar.set_postfix(heads=len(heads.kept_q), neurons=len(kept))
            bar.update()
    return plans
