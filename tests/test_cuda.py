"""The embedded model end to end on a CUDA device against the CPU run of the same seed.

Run with `python -m pytest -m cuda` on a machine with a GPU (needs the embedded model's wheel).
GPU and CPU matrix products round differently, so the two searches may part ways where two
offspring score almost the same; the test therefore requires the same budget and a GPU result
as good as the CPU one, and reports where the genomes differ.
"""

from __future__ import annotations

import pytest
import torch

import tyr

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_embedded_model_on_cuda_matches_the_cpu_run(tmp_path):
    runs = {
        device: tyr.prune(sparsity=0.5, out=tmp_path / device, preset="smoke", device=device, seed=0)
        for device in ("cpu", "cuda")
    }
    cpu, gpu = (runs[d].data for d in ("cpu", "cuda"))
    assert gpu["machine"]["device"].startswith("cuda")
    assert abs(gpu["sparsity_achieved"] - cpu["sparsity_achieved"]) <= 0.005
    g_cpu, g_gpu = (r["search"]["iterations"][0]["genome"] for r in (cpu, gpu))
    differing = [i for i, (a, b) in enumerate(zip(g_cpu, g_gpu, strict=True)) if a != b]
    print(f"genes that differ between CPU and CUDA: {differing or 'none'}")
    # The dense perplexity is the same model on both devices; the searched ones agree closely.
    assert gpu["ppl"]["dense"] == pytest.approx(cpu["ppl"]["dense"], rel=1e-3)
    assert gpu["ppl"]["pruned"] <= cpu["ppl"]["pruned"] * 1.05


def test_a_student_on_the_gpu_holds_the_host_students_values(tmp_path):
    """Built block by block on the GPU, the student's tensors are the host student's, bit for
    bit (slicing and copying only), and its logits agree within the GPU's rounding."""
    from test_fitness import _student_parts

    from tyr.search.fitness import LiveModel

    model, spec, shape, genes, cands, store, genome = _student_parts(tmp_path)
    host = LiveModel(model, spec, shape, genes, cands, store).apply(genome)
    gpu = LiveModel(model, spec, shape, genes, cands, store, device="cuda").apply(genome)
    on_gpu = gpu.state_dict()
    assert all(t.is_cuda for t in on_gpu.values())
    assert all(torch.equal(t, on_gpu[name].cpu()) for name, t in host.state_dict().items())
    ids = torch.arange(16).view(1, 16)
    with torch.inference_mode():
        diff = (host(ids).logits - gpu(ids.cuda()).logits.cpu()).abs().max()
    assert diff < 1e-3
