"""The compiled training step (issue 13 item 5): compiled layers without graph breaks or per-layer recompiles,
equal to eager, and a step with no synchronising op.

torch.compile runs on CPU: ``aot_eager`` (dynamo + AOT autograd, no code generation) for the structural
checks, ``inductor`` (generated C++) for one equality check. A synchronising op is one that makes the host
wait for a GPU (``.item()``, ``nonzero``, boolean indexing, ...): counted from the aten ops the step
dispatches, which are the same on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from beit3.model import build_model
from beit3.model.layers import Packing
from beit3.pretrain.objective import MaskedDataModeling, ObjectiveConfig, masked_positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from step_syncs import OpTrace  # noqa: E402  (bench/step_syncs.py: the synchronising aten ops)
from three_pass import ThreePassObjective  # noqa: E402  (bench/three_pass.py: boolean indexing, three passes)

PAPER, RELEASED = "beit3_tiny_paper_patch16_64", "beit3_tiny_patch16_64"
VOCAB, CODES = 100, 32


def cpu_batch(seed: int = 0) -> dict:
    """A host micro-batch as the loader gives it (codes in place of tokenizer views): padded texts,
    exact-count image masks, separate pair masking."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int, length: int) -> dict:
        ids = torch.randint(4, VOCAB, (n, length), generator=g)
        pad = torch.zeros(n, length, dtype=torch.bool)
        pad[0, -3:] = True
        chosen = (torch.rand(n, length, generator=g) < 0.3) & ~pad
        chosen[:, 1] = True
        return {"text": torch.where(chosen, 3, ids), "text_padding_mask": pad,
                "text_labels": torch.where(chosen, ids, -100)}  # fmt: skip

    def image(n: int) -> dict:
        mask = torch.zeros(n, 16, dtype=torch.bool)
        for row in mask:
            row[torch.randperm(16, generator=g)[:6]] = True  # exact count, as block masking gives
        return {"image": torch.randn(n, 3, 64, 64, generator=g), "image_mask": mask,
                "image_codes": torch.randint(0, CODES, (n, 16), generator=g)}  # fmt: skip

    pair = {**image(3), **text(3, 6)}
    pair["image_mask"][1:] = False  # separate masking: pair 0 masks its image, the others their text
    pair["text_labels"][0] = -100
    return {"image": image(2), "text": text(3, 9), "pair": pair}


def _task(name: str = PAPER, drop_path: float = 0.1, **overrides) -> MaskedDataModeling:
    torch.manual_seed(0)
    model = build_model(
        name, vocab_size=VOCAB, visual_vocab_size=CODES, drop_path_rate=drop_path, **overrides
    )
    return MaskedDataModeling(model, cfg=ObjectiveConfig(label_smoothing=0.1)).train()


def _step(task: MaskedDataModeling, batch: dict, seed: int = 3, fn=None):
    task.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the drop-path draws
    loss, metrics = (fn or task)(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def _assert_close_steps(a, b, rtol: float, atol: float) -> None:
    torch.testing.assert_close(b[0], a[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(b[1][k], a[1][k], rtol=rtol, atol=atol, msg=k)
    assert a[2].keys() == b[2].keys()
    for n in a[2]:
        torch.testing.assert_close(b[2][n], a[2][n], rtol=rtol, atol=atol, msg=n)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch._dynamo.reset()


# ---- fixed-size gathers and synchronisation -------------------------------------------------------------
def test_masked_positions_are_fixed_size_gathers_of_the_selection():
    select = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    index, valid = masked_positions(select)
    assert index.shape == valid.shape == (3, 5)  # largest count 3, rounded up to 8, at most L = 5
    for row in range(3):
        assert index[row][valid[row]].tolist() == torch.nonzero(select[row]).flatten().tolist()
    labels = torch.full((2, 40), -100)
    labels[0, [3, 9]] = 7
    labels[1, :11] = 5
    index, valid = masked_positions(labels)
    assert index.shape == (2, 16) and valid.sum(1).tolist() == [2, 11]
    assert index[0, :2].tolist() == [3, 9] and index[1, :11].tolist() == list(range(11))
    with pytest.raises(ValueError, match="must be \\(B, L\\)"):
        masked_positions(torch.zeros(3, dtype=torch.bool), "image_mask")


def test_the_gathered_loss_equals_boolean_indexing():
    """The fixed-size gathers pick the same rows as the boolean indexing they replace (the losses, metrics and
    gradients of the prepared batch equal those of the batch the objective indexes itself, through the
    three-pass reference with boolean indexing)."""
    task = _task(drop_path=0.0)
    prepared = task.prepare_batch(cpu_batch(1), torch.device("cpu"))
    assert prepared["text"]["text_label_index"].shape[1] % 8 == 0
    reference = _step(task, cpu_batch(1), fn=lambda b: ThreePassObjective.forward(task, b))
    _assert_close_steps(reference, _step(task, prepared), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [PAPER, RELEASED])
def test_the_step_on_the_device_has_no_synchronising_op(name):
    """prepare_batch (its device part: copies, the visual tokenizer) and the forward and backward of the task
    dispatch no op that would make the host wait for the GPU; the old objective (boolean indexing of masked
    positions) did, which shows the trace sees them."""
    from bench.three_pass import ThreePassObjective

    task = _task(name)
    batch = cpu_batch(2)
    with OpTrace() as trace:
        prepared = task.prepare_batch(batch, torch.device("cpu"))
        loss, _ = task(prepared)
        loss.backward()
    assert len(trace.ops) > 100 and trace.syncing == []
    with OpTrace() as old:
        loss, _ = ThreePassObjective.forward(task, cpu_batch(2))
        loss.backward()
    assert old.syncing  # nonzero / boolean index of the masked positions


# ---- compiled layers -------------------------------------------------------------------------------------
def _packed_inputs(model, batch: dict):
    """The arguments forward_mixed gives layer 0's forward_packed, for torch._dynamo.explain."""
    captured = {}
    layer = model.beit3.encoder.layers[-1]
    original = type(layer).forward_packed

    def spy(self, x, packing, masks, drop=None, **more):
        captured.setdefault(id(self), (x.detach().requires_grad_(), packing, masks, drop))
        return original(self, x, packing, masks, drop, **more)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(layer), "forward_packed", spy)
        model.forward_mixed(batch)
    return layer, captured[id(layer)]


@pytest.mark.parametrize("name", [PAPER, RELEASED])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_no_graph_break_inside_a_layer(name, padded, fresh_dynamo):
    task = _task(name, drop_path=0.2)
    batch = task.prepare_batch(cpu_batch(3), torch.device("cpu"))
    if not padded:
        for key in ("text", "pair"):
            batch[key]["text_padding_mask"] = None
    keep = ("image", "image_mask", "text", "text_padding_mask")
    inputs = {k: {n: v for n, v in sub.items() if n in keep} for k, sub in batch.items()}
    layer, (x, packing, masks, drop) = _packed_inputs(task.model, inputs)
    assert (
        isinstance(packing, Packing) and drop is not None
    )  # the top layer: drop path and (paper) VL experts
    explained = torch._dynamo.explain(type(layer).forward_packed.__get__(layer))(x, packing, masks, drop)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_forty_layers_with_drop_path_compile_three_graphs_and_never_again(fresh_dynamo):
    """Stochastic depth rises layer by layer (40 rates); the compiled layers share graphs: one for the first
    layer (no drop path), one for the layers with drop path, one for those with vision-language experts.
    Later steps (new draws, new data of the same shapes) compile nothing."""
    task = _task(PAPER, drop_path=0.1, depth=40, vl_expert_layers=3)
    task.model.compile_layers("aot_eager")
    for seed in range(3):
        _step(task, task.prepare_batch(cpu_batch(seed), torch.device("cpu")), seed)
        stats = task.model.compile_stats()
        assert stats == {"graphs": 3, "frames": 3, "graph_breaks": 0}, (seed, stats)


def test_compiled_layers_follow_eval_and_checkpointing(fresh_dynamo):
    """Eval mode (no drop path) and activation checkpointing run the compiled layers too, equal to eager."""
    task = _task(PAPER, drop_path=0.1)
    batch = task.prepare_batch(cpu_batch(4), torch.device("cpu"))
    eager = _step(task, batch)
    task.model.set_grad_checkpointing(True)
    task.model.compile_layers("aot_eager")
    _assert_close_steps(eager, _step(task, batch), rtol=1e-5, atol=1e-6)
    task.eval()
    with torch.no_grad():
        compiled = task(batch)[0]
    task.model.compile_layers(None)
    assert task.model.compiled is None and "forward_packed" not in vars(task.model.beit3.encoder.layers[0])
    with torch.no_grad():
        torch.testing.assert_close(compiled, task(batch)[0], rtol=1e-5, atol=1e-6)
    assert task.model.compile_stats()["graph_breaks"] == 0


@pytest.mark.slow  # inductor generates and compiles C++ for one graph, forward and backward (about 40 s)
def test_inductor_compiled_step_equals_eager(fresh_dynamo):
    """Inductor's generated code computes what eager does (aot_eager above covers the graph structure:
    stochastic depth, vision-language experts, checkpointing); two layers of one structure, one graph."""
    task = _task(PAPER, drop_path=0.0, depth=2, vl_expert_layers=0)
    batch = task.prepare_batch(cpu_batch(5), torch.device("cpu"))
    eager = _step(task, batch)
    task.model.compile_layers("inductor")
    compiled = _step(task, batch)
    _assert_close_steps(eager, compiled, rtol=1e-4, atol=1e-5)
    assert task.model.compile_stats()["graph_breaks"] == 0


def test_the_task_declares_its_layers_as_zero3_gathering_units():
    from beit3.engine.task import zero3_gather_units

    task = _task(PAPER)
    layers = list(task.model.beit3.encoder.layers)
    assert zero3_gather_units(task) == layers  # the default
    task.layer_gathering = False
    assert zero3_gather_units(task) == []
    task.model.compile_layers("aot_eager")
    assert zero3_gather_units(task) == layers  # compiled layers must be units

    class Foreign(torch.nn.Module):
        def zero3_gather_units(self):
            return [torch.nn.Linear(2, 2)]

    with pytest.raises(TypeError, match="not its submodules"):
        zero3_gather_units(Foreign())


# ---- through the engine -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain_assets(tmp_path_factory) -> dict:
    from tiny_data import write_pretrain_data

    return write_pretrain_data(tmp_path_factory.mktemp("compiled_pretrain"))


def _pretrain(assets: dict, out: Path, *extra: str) -> dict[int, float]:
    import os
    import subprocess

    from engine_helpers import tensorboard_scalars
    from tiny_data import set_args, tiny_pretrain_settings

    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "beit3.pretrain.train",
        "--config", str(repo / "pretrain/recipes/demo.toml"),
        "--ds-config", str(repo / "ds_configs/zero3_fp32.json"),
        "--ds-set", "train_micro_batch_size_per_gpu=3",
        "--output-dir", str(out),
        *set_args(tiny_pretrain_settings(assets)),
        "--set", "model.name=beit3_tiny_paper_patch16_64",
        "--set", "model.drop_path_rate=0.1",
        "--set", "train.total_steps=3",
        "--set", "train.warmup_steps=1",
        "--set", "train.log_every=1",
        "--set", "train.save_every=0",
        "--set", "data.num_workers=0",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tensorboard_scalars(out, "loss/total")


@pytest.mark.slow  # two 2-rank pretraining runs of 3 steps (about 60 s)
@pytest.mark.multiprocess
def test_compiled_pretraining_under_zero3_follows_the_eager_run(pretrain_assets, tmp_path):
    """beit3-pretrain with [model] compile = "layers" on 2 gloo ranks under ZeRO-3 (each layer one gathering
    unit): the same losses as the eager run, and no graph break inside the compiled layers."""
    import json

    eager = _pretrain(pretrain_assets, tmp_path / "eager")
    compiled = _pretrain(pretrain_assets, tmp_path / "compiled", "--set", "model.compile=layers",
                         "--set", "model.compile_backend=aot_eager")  # fmt: skip
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6), step
    stats = json.loads((tmp_path / "compiled" / "compile.json").read_text())
    assert stats["graph_breaks"] == 0 and 1 <= stats["graphs"] <= 6, stats


def test_the_project_issues_no_synchronising_op_in_a_trained_step(tmp_path):
    """Through the real engine (one gloo rank, bench/step_syncs.py in its own process: DeepSpeed's global
    state stays out of this one): per optimizer step under ZeRO-0 and ZeRO-3, no synchronising op comes from
    the project's code (prepare_batch, the model, the objective); DeepSpeed's own are reported beside."""
    import json
    import os
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench" / "step_syncs.py"
    cmd = [sys.executable, str(bench), "--configs", "zero0_fp32.json", "zero3_fp32.json", "--steps", "1",
           "--name", "syncs", "--results-dir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "syncs.json").read_text())
    assert [r["config"] for r in rows] == ["zero0_fp32.json", "zero3_fp32.json"]
    for row in rows:
        assert row["steps_counted"] == 1
        assert row["project_per_step"] == 0, row["sources"]
        assert row["deepspeed_per_step"] > 0  # the trace sees DeepSpeed's own (its step's norm checks)
