"""Supernet: independent locally pruned candidates at several levels per sub-layer, built block
by block with error accumulation and stored compactly on disk (docs/algorithm.md §5, §6).

Layout of one iteration: ``iter{t}/manifest.json`` and ``iter{t}/blk{b:03d}.{attn|mlp}/L{k:+d}.safetensors``
holding ``weight`` (the kept input columns of the refitted o_proj/down_proj, [d_out, kept·unit])
and ``kept`` / ``kept_kv`` (int32 ascending unit indices).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm.auto import tqdm

from tyr import arch
from tyr.arch import ArchSpec
from tyr.budget import Gene, Shape, SubLayer, attn_removed, attn_structures, layout, mlp_removed
from tyr.errors import UserError
from tyr.infra import atomic_json, atomic_write, dist, sha256_file
from tyr.local import DAMP, GQA_MODES, SALIENCIES, SCHEDULES, make_problem, prune_attention, solve_problem
from tyr.modeling import compact_cols, expand_cols
from tyr.stream import (
    BlockInputs,
    LazyModel,
    collect_gram,
    forward_block,
    on_device,
    propagate_mlp,
    to_device,
)

__all__ = [
    "ACCUMULATIONS",
    "Candidate",
    "Store",
    "SupernetOptions",
    "build",
    "propagation_weight",
]

log = logging.getLogger(__name__)

ACCUMULATIONS = ("expectation", "centre", "none")  # the first is the default
SCHEMA_VERSION = 1


@dataclass
class Candidate:
    level: int
    units: int  # units asked for (attention: of 2·d·d_h)
    kept: tuple[int, ...]  # kept heads or neurons, ascending
    kept_kv: tuple[int, ...]  # kept KV heads (attention only)
    removed_params: int  # real parameters removed
    eps: float
    path: str = ""
    sha256: str = ""
    bytes: int = 0
    weight: Tensor | None = field(default=None, repr=False)  # compact, loaded on demand

    def meta(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("weight")
        return d


class Store:
    """A self-describing directory of one iteration's candidates with a versioned manifest."""

    def __init__(self, root: Path, iteration: int, identity: dict[str, Any]) -> None:
        self.dir = root / f"iter{iteration}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"
        self.identity = identity
        manifest = None
        if self.manifest_path.is_file():
            try:
                manifest = json.loads(self.manifest_path.read_text())
                manifest["sublayers"]
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s is damaged (%s); its sub-layers are recomputed", self.manifest_path, exc)
                manifest = None
        if manifest is not None:
            if manifest.get("identity") != identity:
                raise UserError(
                    f"{self.dir} holds a supernet built with a different configuration",
                    "delete that work directory or pass another --workdir",
                )
            self.sublayers: dict[str, Any] = manifest["sublayers"]
        else:
            self.sublayers = {}
            self._write_manifest()

    @staticmethod
    def key(gene: Gene) -> str:
        return f"blk{gene.block:03d}.{gene.kind}"

    def _write_manifest(self) -> None:
        if not dist.is_main():  # rank 0 alone writes; the others keep the same state in memory
            return
        manifest = {"schema_version": SCHEMA_VERSION, "identity": self.identity, "sublayers": self.sublayers}
        atomic_json(self.manifest_path, manifest)

    def finished(self, gene: Gene) -> list[Candidate] | None:
        """The stored candidates of a finished sub-layer whose files all verify, else None
        (a corrupt or missing file is reported and the sub-layer is recomputed, §5.5)."""
        entry = self.sublayers.get(self.key(gene))
        if entry is None or entry.get("status") != "done":
            return None
        cands = [
            Candidate(**{**c, "kept": tuple(c["kept"]), "kept_kv": tuple(c["kept_kv"])})
            for c in entry["candidates"]
        ]
        for c in cands:
            path = self.dir / c.path
            if not path.is_file() or sha256_file(path) != c.sha256:
                log.warning(
                    "%s: %s is missing or corrupt; recomputing this sub-layer", self.key(gene), c.path
                )
                return None
        return cands

    def load_all(self, genes: list[Gene]) -> dict[Gene, list[Candidate]] | None:
        """Every gene's verified candidates when the whole iteration is finished, else None.
        An unfinished manifest returns at once: the build verifies its files as it resumes."""
        if any(self.sublayers.get(self.key(g), {}).get("status") != "done" for g in genes):
            return None
        out = {}
        for gene in genes:
            cands = self.finished(gene)
            if cands is None:
                return None
            out[gene] = cands
        return out

    def save(self, gene: Gene, cands: list[Candidate]) -> None:
        folder = self.dir / self.key(gene)
        if dist.is_main():
            folder.mkdir(exist_ok=True)
        for c in cands:
            assert c.weight is not None
            tensors = {
                "weight": c.weight.detach().to("cpu").contiguous(),
                "kept": torch.tensor(c.kept, dtype=torch.int32),
                "kept_kv": torch.tensor(c.kept_kv, dtype=torch.int32),
            }
            rel = f"{self.key(gene)}/L{c.level:+d}.safetensors"
            path = self.dir / rel
            data = save(tensors)
            if dist.is_main():
                atomic_write(path, data)
            c.path, c.sha256, c.bytes = rel, hashlib.sha256(data).hexdigest(), len(data)
        self.sublayers[self.key(gene)] = {"status": "done", "candidates": [c.meta() for c in cands]}
        self._write_manifest()

    def release(self) -> None:
        """Delete the candidate files once the iteration's search has finished (only its genome,
        in ``search.json``, travels on): the work directory holds one supernet at a time. The
        manifest keeps the identity and forgets the sub-layers, so a search result lost later
        makes the iteration build again rather than trust files that are gone."""
        self.sublayers = {}
        self._write_manifest()
        if dist.is_main():
            for folder in self.dir.glob("blk*"):
                shutil.rmtree(folder, ignore_errors=True)

    def weight(self, cand: Candidate) -> Tensor:
        """A candidate's compact weight: the one just solved, else read from its file (not
        kept: host memory holds a block's candidates while it is built, not the supernet)."""
        if cand.weight is not None:
            return cand.weight
        return load_file(str(self.dir / cand.path))["weight"]


@dataclass(frozen=True)
class SupernetOptions:
    saliency: str = SALIENCIES[0]
    schedule: str = SCHEDULES[0]
    gqa: str = GQA_MODES[0]
    damp: float = DAMP
    accumulation: str = ACCUMULATIONS[0]


def _attn_candidates(
    o: nn.Linear, H: Tensor, shape: Shape, sub: SubLayer, opt: SupernetOptions
) -> list[Candidate]:
    problem = make_problem(o.weight.T, H, damp=opt.damp)

    def solve(k: int) -> Candidate:
        options = list(sub.fixed) if sub.fixed and k == 0 else attn_structures(shape, sub.units(k), opt.gqa)
        sol = prune_attention(problem, shape, options, mode=opt.gqa, saliency=opt.saliency)
        kept = tuple(int(h) for h in sol.kept)
        heads = layout(kept, shape.n_q, shape.n_kv)
        weight = compact_cols(sol.weight.T.to(device="cpu", dtype=o.weight.dtype), kept, shape.head_dim)
        removed = attn_removed(shape, kept)
        return Candidate(k, sub.units(k), kept, heads.kept_kv, removed, sol.eps, weight=weight)

    return dist.map_ordered(solve, list(sub.levels))  # levels solved on different ranks


def _mlp_candidates(
    down: nn.Linear, H: Tensor, shape: Shape, sub: SubLayer, opt: SupernetOptions, low_memory: bool
) -> list[Candidate]:
    """The FFN candidates of every level. `low_memory`: each level computes H_d⁻¹ afresh and
    updates it in place instead of copying the shared one (the same values: one d_ff² matrix of
    the solver dtype held instead of two, for one inversion more per level)."""
    problem = make_problem(down.weight.T, H, damp=opt.damp)

    def solve(k: int) -> Candidate:
        sol = solve_problem(
            problem, 1, sub.units(k), saliency=opt.saliency, schedule=opt.schedule, consume=low_memory
        )
        kept = tuple(int(j) for j in sol.kept)
        weight = compact_cols(sol.weight.T.to(device="cpu", dtype=down.weight.dtype), kept, 1)
        removed = mlp_removed(shape, len(kept))
        return Candidate(k, sub.units(k), kept, (), removed, sol.eps, weight=weight)

    out: list[Candidate] = dist.map_ordered(solve, list(sub.levels))
    eps = [c.eps for c in out]
    if any(b < a - 1e-9 for a, b in zip(eps, eps[1:], strict=False)):
        log.debug("block %d mlp: ε not non-decreasing over levels: %s", sub.gene.block, eps)
    return out


def propagation_weight(
    cands: list[Candidate], store: Store, dense: Tensor, size: int, n: int, total: int, accumulation: str
) -> Tensor:
    """W_prop in Linear orientation (§6.1): `expectation` = Σ α_e·Ŵ_e with α_e ∝ 1 − s_e
    (paper Eq. 5, exact by linearity §6.2), `centre` = the level-0 candidate, `none` = dense."""
    if accumulation == "none":
        return dense
    if accumulation == "centre":
        c = next(c for c in cands if c.level == 0)
        return expand_cols(store.weight(c).float(), c.kept, size, n).to(dense)
    if accumulation != "expectation":
        raise ValueError(f"unknown accumulation {accumulation!r}; expected one of {ACCUMULATIONS}")
    alphas = [1 - c.removed_params / total for c in cands]
    norm = sum(alphas)
    mean = torch.zeros(dense.shape, dtype=torch.float32, device=dense.device)
    if norm <= 0:
        return mean.to(dense)
    for c, a in zip(cands, alphas, strict=True):
        if a > 0:
            mean += (a / norm) * expand_cols(store.weight(c).float().to(dense.device), c.kept, size, n)
    return mean.to(dense)


@torch.inference_mode()
def build(
    model: nn.Module,
    spec: ArchSpec,
    shape: Shape,
    inputs: BlockInputs,
    sublayers: dict[Gene, SubLayer],
    store: Store,
    opt: SupernetOptions,
    device: str = "cpu",
    desc: str = "supernet",
    lazy: LazyModel | None = None,
) -> dict[Gene, list[Candidate]]:
    """Solve (or load) every sub-layer's candidates, block by block; each block is calibrated on
    inputs propagated through the previous blocks' W_prop (§5.4). The model's weights are left
    dense (a lazy model's block is read from disk and dropped again); `inputs` are consumed.
    With a lazy model (memory is short), the FFN solver holds one H_d⁻¹ at a time."""
    out: dict[Gene, list[Candidate]] = {}
    # Dense activations of the first chunk (rank 0 holds it), for the §6.5 check.
    probe = inputs.hidden[0].clone() if dist.is_main() else None
    blocks = arch.layers(model, spec)
    attn_total, mlp_total = shape.attn_params(shape.n_q, shape.n_kv), shape.mlp_params(shape.intermediate)
    with tqdm(total=len(blocks), desc=desc, unit="block") as bar:
        for b, layer in enumerate(blocks):
            with on_device(layer, device, lazy):
                a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)
                dense_o, dense_down = a.o.weight.detach().clone(), m.down.weight.detach().clone()
                if probe is not None:
                    kw0 = to_device(inputs.kwargs_for(layer, 0), device)
                    probe = forward_block(layer, probe.to(device), kw0).to("cpu")

                ga, gf = Gene(b, "attn"), Gene(b, "mlp")
                cands_a = store.finished(ga)
                if cands_a is None:
                    H_A = collect_gram(layer, a.o, inputs, device).H
                    cands_a = _attn_candidates(a.o, H_A, shape, sublayers[ga], opt)
                    store.save(ga, cands_a)
                a.o.weight.copy_(
                    propagation_weight(
                        cands_a, store, dense_o, shape.head_dim, shape.n_q, attn_total, opt.accumulation
                    )
                )

                # Sequential: FFN statistics under A_b's propagation weight (§6.3).
                found = store.finished(gf)
                chosen: list[list[Candidate]] = []

                def choose(
                    H: Tensor, m=m, gf=gf, found=found, chosen=chosen, dense_down=dense_down
                ) -> Tensor:
                    cands = found
                    if cands is None:
                        cands = _mlp_candidates(m.down, H, shape, sublayers[gf], opt, lazy is not None)
                        store.save(gf, cands)
                    chosen.append(cands)
                    return propagation_weight(
                        cands, store, dense_down, 1, shape.intermediate, mlp_total, opt.accumulation
                    )

                propagate_mlp(
                    layer, m.down, inputs, choose, residual=spec.mlp_output_is_residual, device=device
                )
                cands_f = chosen[0]
                a.o.weight.copy_(dense_o)
                m.down.weight.copy_(dense_down)

            gap = None if probe is None else (inputs.hidden[0] - probe).norm() / probe.norm().clamp(min=1e-30)
            drift = dist.share(None if gap is None else float(gap))
            assert drift is not None
            pruned = any(c.removed_params > 0 for c in cands_a + cands_f)
            if opt.accumulation != "none" and pruned and drift == 0.0:
                raise RuntimeError(
                    f"block {b}: propagated activations equal the dense ones; accumulation is not acting"
                )
            log.debug("block %d: ‖X̄ − X_dense‖/‖X_dense‖ = %.4f", b, drift)
            for c in cands_a + cands_f:
                c.weight = None  # on disk; read again when a genome or a plan needs it
            out[ga], out[gf] = cands_a, cands_f
            bar.set_postfix(drift=f"{drift:.3f}")
            bar.update()
    return out
