"""CUDA correctness checks, run with ``pytest -m gpu`` on a machine with a GPU (skipped without one):
the fused LoRA linear in bf16 against a float32 reference (output, input and coefficient gradients,
its factor path under autocast and its folded path), fold, a learner's ``bf16-mixed`` fit on the GPU
and its export (the merge saved and evaluated), and evaluation under autocast.

Tolerances are set for bf16, whose unit roundoff is u = 2^-9 (about 2e-3): a GEMM rounds its inputs
to bf16 and accumulates in float32, so one module's output and input gradient are off by a few u in
norm (1e-2 allowed; 4.6e-3 measured under CPU autocast); a coefficient gradient sums products of two
such GEMM outputs over every row and rank, terms that largely cancel (5e-2 allowed; 3.1e-2 measured).
A whole model compounds every layer's rounding, so its logits are held to what bf16 costs the same
merge done densely (1.5 times that, plus 1e-2) and its gradients to a cosine similarity of 0.99. A
learner's coefficients move by about the learning rate per Adam step whatever the gradient's size, so
a run in bf16 and one in float32 agree to well under a step unless some gradient changed sign.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lmerge.adapters import LoraAdapter
from lmerge.adapters.align import align_keys
from lmerge.learn.coefficients import Coefficients
from lmerge.learn.fused import attach, layer_groups
from lmerge.learn.merged_linear import FusedLoRALinear

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

CUDA = torch.device("cuda")
VALUES = [[0.4, -0.3], [0.7, 0.2]]  # layer-wise, signed (tanh): distinct per layer and adapter


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm())


def fused_llama(zoo, weight_dtype: torch.dtype, factor_dtype: torch.dtype):
    """The zoo's Llama on the GPU in ``weight_dtype`` with adapters llama_a and llama_b fused in
    ``factor_dtype``, layer-wise tanh coefficients set to VALUES; returns (model, fused, coefficients)."""
    adapters = [LoraAdapter(zoo[name]) for name in ("llama_a", "llama_b")]
    keys, _ = align_keys(adapters, "common")
    names, _, group_of = layer_groups(keys, "layer_wise")
    coefficients = Coefficients(2, len(names), "tanh", VALUES, names)
    model = AutoModelForCausalLM.from_pretrained(zoo["llama"], dtype=weight_dtype).to(CUDA).eval()
    fused = attach(model, adapters, keys, coefficients, group_of, dtype=factor_dtype)
    assert coefficients.raw.device.type == "cuda"
    return model, fused, coefficients


def ids(count: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (count, length), generator=torch.Generator().manual_seed(0)).to(CUDA)


@pytest.mark.parametrize("path", ["factor", "folded"])
def test_fused_module_in_bf16_matches_float32(zoo, path, monkeypatch):
    """Every fused module: bf16 weights and factors (the factor path under autocast, as ``bf16-mixed``
    runs it; the folded path without, where it applies) against float32 on the GPU."""
    monkeypatch.setattr(FusedLoRALinear, "folds", lambda self, rows: path == "folded")
    _, reference, reference_coefficients = fused_llama(zoo, torch.float32, torch.float32)
    _, fused, coefficients = fused_llama(zoo, torch.bfloat16, torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    for key, module in fused.modules.items():
        x = torch.randn(64, module.base.in_features, generator=generator).to(CUDA)
        # A linear loss: its output gradient is exact in both, so the gradients compare the backward alone.
        weights = torch.randn(64, module.base.out_features, generator=generator).to(CUDA)
        results = []
        pairs = (
            (reference.modules[key], reference_coefficients, torch.float32),
            (module, coefficients, torch.bfloat16),
        )
        for candidate, c, dtype in pairs:
            c.raw.grad = None
            rows = x.to(dtype).detach().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=path == "factor" and dtype != torch.float32):
                y = candidate(rows)
            assert y.dtype == dtype
            (y.float() * weights).sum().backward()
            results.append((y, rows.grad, c.raw.grad.clone()))
        (y32, grad_x32, grad_c32), (y16, grad_x16, grad_c16) = results
        assert relative_error(y16, y32) < 1e-2, key
        assert relative_error(grad_x16, grad_x32) < 1e-2, key
        assert grad_c16.dtype == torch.float32 and relative_error(grad_c16, grad_c32) < 5e-2, key


def dense_merge_bf16_error(zoo) -> float:
    """What bf16 costs the merged function itself, the yardstick of the whole-model checks: the relative
    error of the logits of the merge folded in float32, then cast to bf16 and run under autocast, against
    float32. (The zoo's adapters dwarf the base weights, and a tiny random model amplifies rounding
    through its layers: about 6e-2 under CPU autocast, twelve times the bare model's.)"""
    model, fused, _ = fused_llama(zoo, torch.float32, torch.float32)
    fused.fold()
    with torch.no_grad():
        reference = model(input_ids=ids()).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            merged = model.to(torch.bfloat16)(input_ids=ids()).logits.float()
    return relative_error(merged, reference)


def test_fused_model_under_autocast_matches_float32(zoo):
    """The whole model as ``bf16-mixed`` runs it (bf16 weights and factors, autocast) against float32:
    the merge adds no error of its own to bf16's (logits), and the coefficient gradients of a token
    loss point the same way."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model, _, coefficients = fused_llama(zoo, dtype, dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(input_ids=ids()).logits
        logits.float().log_softmax(-1)[..., :8].mean().backward()
        results.append((logits.float(), coefficients.raw.grad.flatten()))
    (logits32, grad32), (logits16, grad16) = results
    assert relative_error(logits16, logits32) < 1.5 * dense_merge_bf16_error(zoo) + 1e-2
    assert F.cosine_similarity(grad16.double(), grad32.double(), dim=0) > 0.99


def test_fold_on_the_gpu_matches_a_float32_merge(zoo):
    model, fused, coefficients = fused_llama(zoo, torch.bfloat16, torch.bfloat16)
    reference, reference_fused, _ = fused_llama(zoo, torch.float32, torch.float32)
    with torch.no_grad():
        expected = reference(input_ids=ids()).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused.fold()
            reference_fused.fold()
            folded = model(input_ids=ids()).logits.float()
    assert all(type(model.get_submodule(key)) is torch.nn.Linear for key in fused.modules)
    for key in fused.modules:
        weight = model.get_submodule(key).weight
        assert weight.dtype == torch.bfloat16 and weight.device.type == "cuda"
        # Formed in float32 and rounded once: within bf16's rounding of the float32 merge.
        assert relative_error(weight, reference.get_submodule(key).weight) < 1e-2, key
    assert relative_error(folded, expected) < 1.5 * dense_merge_bf16_error(zoo) + 1e-2
    fused.unfold()
    assert isinstance(model.get_submodule(next(iter(fused.modules))), FusedLoRALinear)


def _fit(tasks, tmp_path, accelerator: str, precision: str, model_dtype: str):
    from lightning.pytorch import Trainer, seed_everything

    from lmerge.data import CatalogDataModule
    from lmerge.learn import AdaMerging

    seed_everything(0, workers=True)
    learner = AdaMerging(str(tasks), ["alpha", "beta"], ["alpha", "beta"], lr=0.05, model_dtype=model_dtype)
    data = CatalogDataModule(str(tasks), ["alpha", "beta"], fit_split="test", batch_size=4)
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(learner, datamodule=data)
    return learner


def test_learner_fits_in_bf16_mixed_on_the_gpu_like_float32_on_the_cpu(tasks, tmp_path):
    """``lmerge fit --trainer.accelerator gpu --trainer.precision bf16-mixed --model.model_dtype bf16``:
    the model is built under Lightning's root device, its factors are stored in bf16, and three Adam
    steps land where float32 on the CPU lands; the export saves the merge and evaluates it on the GPU."""
    from lmerge.pipeline import export_learned_merge

    gpu = _fit(tasks, tmp_path / "gpu", "gpu", "bf16-mixed", "bf16")
    cpu = _fit(tasks, tmp_path / "cpu", "cpu", "32-true", "fp32")
    module = next(iter(gpu.fused.modules.values()))
    assert module.A_cat.dtype == torch.bfloat16 and module.A_cat.device.type == "cuda"
    assert gpu.coefficients.raw.dtype == torch.float32
    assert gpu.coefficients.values() != [[0.3, 0.3]]
    torch.testing.assert_close(
        torch.tensor(gpu.coefficients.values()), torch.tensor(cpu.coefficients.values()), atol=1e-2, rtol=0
    )
    bundle = export_learned_merge(gpu, str(tmp_path / "out"), save="lora", eval_tasks=["alpha", "beta"])
    assert (bundle / "merge_spec.yaml").is_file()
    saved = list((tmp_path / "out").rglob("adapter_model.safetensors"))
    assert len(saved) == 1


def test_evaluation_under_autocast_matches_float32(tasks, zoo, tmp_path):
    """A merge evaluated on the GPU with ``eval_precision: bf16-mixed`` scores as in float32 (a test
    example on a near tie may flip: 20 examples, so 0.1 is two of them)."""
    from lmerge.merge.config import MergeConfig
    from lmerge.pipeline import run_merge

    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        config = MergeConfig(
            adapters=["alpha", "beta"],
            method="task_vector",
            catalog=str(tasks),
            eval_tasks=["alpha", "beta"],
            eval_precision=precision,
            output_dir=str(tmp_path / precision),
        )
        result = run_merge(config)
        scores[precision] = {task: (t["merged"], t["single"]) for task, t in result.evaluation.tasks.items()}
    for task, (merged, single) in scores["bf16-mixed"].items():
        assert abs(merged - scores["32-true"][task][0]) <= 0.1 and abs(single - scores["32-true"][task][1]) <= 0.1
