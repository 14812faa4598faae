"""The training step (dinowm/step.py): one graph per compiled region and no recompilation, equal losses
compiled and eager, the sync-free non-finite skip, the gradient clip; on a GPU: no host sync, CUDA graphs
draw new dropout masks per replay and reproduce from a seed. Tiny shapes (depth 1, 32 px, batch 2)."""
import copy

import pytest
import torch

from dinowm.cli import train
from dinowm.config import ConfigError, load_config
from dinowm.models.world_model import build_world_model
from dinowm.schedule import Schedule
from dinowm.step import StepStats, TrainStep, build_optimizers
from franka_fixtures import write_franka_dataset

TINY = ["--data.img_size", "32", "--model.encoder_image_size", "28", "--model.predictor_depth", "1",
        "--model.predictor_heads", "2", "--model.predictor_dim_head", "16", "--model.predictor_mlp_dim", "64",
        "--data.num_hist", "2", "--model.ac_dim", "32", "--model.ac_depth", "1", "--model.ac_heads", "2",
        "--training.dtype", "fp32"]
SCHEDULE = Schedule("cosine", warmup_steps=2, total_steps=30, min_lr_ratio=0.1, decay_fraction=0.2)  # lr changes


def tiny(family: str, device="cpu", dropout=0.1, backend="reference", seed=0):
    """(cfg, model, inputs) of a tiny model of `family` and one random batch of 2 (features cached)."""
    cfg = load_config("demo.toml", [*TINY, "--model.predictor", family, "--model.predictor_dropout", str(dropout),
                                    "--model.attention_backend", backend])
    torch.manual_seed(seed)
    model = build_world_model(cfg.model, cfg.data).to(device)
    t = cfg.data.num_hist + cfg.data.num_pred
    inputs = {"obs": torch.rand(2, t, 3, 32, 32, device=device) * 2 - 1, "proprio": torch.randn(2, t, 3, device=device),
              "action": torch.randn(2, t, 9 * cfg.data.frameskip, device=device)}
    with torch.no_grad():
        inputs["visual"] = model.encode_visual(inputs["obs"])
    return cfg, model, inputs


def make_step(cfg, model, device="cpu", **kwargs) -> TrainStep:
    return TrainStep(model, build_optimizers(model, cfg.optim), SCHEDULE,
                     torch.device(device), **kwargs)


def trained(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["vit", "ac"])
def test_compiled_step_is_one_graph_per_region_without_recompilation(family):
    """Dropout on, the learning rate changing every step, logging steps, a validation forward in eval mode
    and a skipped non-finite step: after the warm-up (one plain and one logging step) nothing recompiles, and
    fullgraph=True means a graph break (a host read among them) would raise. Losses equal the eager step's."""
    cfg, model, inputs = tiny(family)
    eager_model = copy.deepcopy(model)
    compiled, eager = make_step(cfg, model, compile=True, backend="aot_eager"), make_step(cfg, eager_model)
    torch._dynamo.reset()
    schedule = [False, True, False, False, True, False]  # decode_prediction per step (True: a logging step)
    compiled_losses, eager_losses = [], []
    for i, decode in enumerate(schedule):
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            torch.manual_seed(i)
            compiled_losses.append(compiled(inputs, i, decode)["loss"].item())
            if i == 3:  # validation: eval mode, no grad, the model called directly (as Trainer.validate)
                model.eval()
                with torch.no_grad():
                    model(**inputs, decode_prediction=True)
        torch.manual_seed(i)
        eager_losses.append(eager(inputs, i, decode)["loss"].item())
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)

    poisoned = dict(inputs, proprio=inputs["proprio"] * float("nan"))
    before = trained(model)
    steps_before = [s["step"].clone() for opt in compiled.optimizers.values() for s in opt.state.values()]
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(poisoned, len(schedule), False)
    assert not out["finite"] and not torch.isfinite(out["loss"])
    assert all(torch.equal(v, p) for v, p in zip(before.values(), trained(model).values()))  # no update
    steps_after = [s["step"] for opt in compiled.optimizers.values() for s in opt.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(steps_before, steps_after))  # Adam's step count too
    assert torch._dynamo.utils.counters["graph_break"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "ac"])
def test_inductor_step_matches_eager_over_20_steps(family):
    """The code torch.compile generates (inductor, fp32, dropout 0: inductor draws its own masks) trains
    like the eager step. From the same weights the first loss agrees to fp32 rounding; over 20 steps the
    curves agree to 2e-3: inductor sums in another order, and Adam divides each update by sqrt(v), so a
    rounding-level difference in a near-zero gradient becomes an update difference of order lr that
    compounds (the AC family drifts ~8e-4 by step 20)."""
    cfg, model, inputs = tiny(family, dropout=0.0)
    eager_model = copy.deepcopy(model)
    compiled, eager = make_step(cfg, model, compile=True), make_step(cfg, eager_model)
    got = [compiled(inputs, i, i % 5 == 4)["loss"].item() for i in range(20)]
    want = [eager(inputs, i, i % 5 == 4)["loss"].item() for i in range(20)]
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    assert got == pytest.approx(want, rel=2e-3, abs=1e-6)


@pytest.mark.slow
def test_trainer_compiled_run_compiles_three_graphs_once(dataset, tmp_path):
    """training.compile = true through fit(): logging steps, validations and a checkpoint between steps;
    afterwards exactly the forward (plain and logging step) and the gradient part were compiled, each once
    (the first step runs eagerly: StepTimer counts its FLOPs under a dispatch mode)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    train([*RUN, "--data.path", str(dataset), "--out", str(tmp_path / "run"), "--training.max_steps", "7",
           "--logging.every_steps", "3", "--eval.every_steps", "2", "--checkpoint.every_steps", "5",
           "--training.compile", "true", "--model.attention_backend", "reference"])
    assert counters["stats"]["unique_graphs"] == 3 and counters["graph_break"] == {}


def test_grad_clip_bounds_the_norm_and_changes_the_update():
    cfg, model, inputs = tiny("vit", dropout=0.0)
    plain_model, clipped_model = copy.deepcopy(model), copy.deepcopy(model)
    reference = {"predictor": torch.optim.AdamW, "embeddings": torch.optim.AdamW, "decoder": torch.optim.Adam}
    start = trained(model)

    # off (0, the default): the update of plain PyTorch (forward, backward, torch.optim's default kernels)
    plain = make_step(cfg, plain_model)
    out = plain(inputs, 0)
    decay = {"predictor": cfg.optim.predictor_weight_decay, "embeddings": cfg.optim.embedding_weight_decay,
             "decoder": 0.0}
    lrs = {"predictor": cfg.optim.predictor_lr, "embeddings": cfg.optim.embedding_lr, "decoder": cfg.optim.decoder_lr}
    opts = {name: reference[name](group, lr=SCHEDULE.factor(0) * lrs[name],
                                   weight_decay=decay[name])
            for name, group in model.parameter_groups().items()}
    model.train()
    model(**inputs)["loss"].backward()
    for opt in opts.values():
        opt.step()
    for (k, got), want in zip(trained(plain_model).items(), trained(model).values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=k)
    assert out["grad_norm"] == pytest.approx(
        torch.nn.utils.get_total_norm([p.grad for p in plain.params]).item(), rel=1e-6)  # unclipped

    # on: the applied gradients have at most the clip's norm, and the update differs
    clip = 1e-3 * out["grad_norm"].item()
    clipped = make_step(cfg, clipped_model, grad_clip=clip)
    out_clipped = clipped(inputs, 0)
    assert out_clipped["grad_norm"] == pytest.approx(out["grad_norm"].item(), rel=1e-5)  # logged: before the clip
    applied = torch.nn.utils.get_total_norm([p.grad for p in clipped.params]).item()
    assert applied == pytest.approx(clip, rel=1e-4)
    moved = [(trained(m)[k] - start[k]).norm() for m in (plain_model, clipped_model) for k in start]
    half = len(start)
    assert sum(moved[half:]) < 0.5 * sum(moved[:half])  # Adam normalises the scale, eps then dominates


def test_step_stats_sum_on_the_device_and_skip_nonfinite_steps():
    stats = StepStats(torch.device("cpu"), skips=5)
    one = torch.ones((), dtype=torch.bool)
    stats.add({"loss": torch.tensor(1.0), "grad_norm": torch.tensor(2.0), "finite": one})
    stats.add({"loss": torch.tensor(float("nan")), "grad_norm": torch.tensor(float("inf")), "finite": ~one})
    stats.add({"loss": torch.tensor(3.0), "decoder_pred_loss": torch.tensor(7.0), "finite": one})
    stats.add({"loss": torch.tensor(float("nan")), "finite": ~one})
    stats.add({"loss": torch.tensor(float("nan")), "finite": ~one})
    look = stats.read(new_window=False)
    assert look == stats.read()
    assert look["means"] == {"loss": 2.0, "grad_norm": 2.0, "decoder_pred_loss": 7.0}
    assert look["nonfinite"] == ["gradients", "loss"]
    assert (look["skips"], look["run"], look["longest"]) == (8, 2, 2)
    stats.add({"loss": torch.tensor(4.0), "finite": one})
    after = stats.read()
    assert after["means"] == {"loss": 4.0} and after["nonfinite"] == []
    assert (after["skips"], after["run"], after["longest"]) == (8, 0, 2)  # the run in progress at the read
    assert stats.read()["longest"] == 0
    stats.add({"loss": torch.tensor(5.0), "copy_last_loss": torch.tensor(float("nan")), "finite": one})
    side = stats.read()  # a non-finite side value of an applied step is reported, not averaged
    assert side["means"] == {"loss": 5.0} and side["nonfinite"] == ["copy_last_loss"] and side["skips"] == 8


def test_step_stats_of_a_resumed_run_continue_its_run_of_skips():
    stats = StepStats(torch.device("cpu"), skips=4, run=2)
    stats.add({"loss": torch.tensor(float("nan")), "finite": torch.zeros((), dtype=torch.bool)})
    assert {k: v for k, v in stats.read().items() if k in ("skips", "run", "longest")} == \
        {"skips": 5, "run": 3, "longest": 3}


@pytest.fixture
def dataset(tmp_path):
    return write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))


RUN = ["--config", "demo.toml", "--data.demo_episodes", "0", "--data.frameskip", "2", "--data.split_ratio", "0.6",
       "--training.batch_size", "4", "--eval.max_batches", "1", "--eval.rollout_horizon", "2",
       "--logging.progress_bar", "false", "--training.device", "cpu", *TINY]


def test_grad_norm_is_logged_and_cuda_graphs_are_refused_on_cpu(dataset, tmp_path):
    import json

    train([*RUN, "--data.path", str(dataset), "--out", str(tmp_path / "run"), "--training.max_steps", "2",
           "--logging.every_steps", "1", "--training.grad_clip", "0.5"])
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    norms = [r["grad_norm"] for r in records if r["split"] == "train"]
    assert len(norms) == 2 and all(0 < n < float("inf") for n in norms)
    with pytest.raises(ConfigError, match=r"training.cuda_graphs = true needs a CUDA device"):
        train([*RUN, "--data.path", str(dataset), "--out", str(tmp_path / "g"), "--training.cuda_graphs", "true"])


# ----------------------------------------------------------------------------------------------
# GPU: scripts/gpu_check.sh runs these
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_step_never_syncs_the_host(compile):
    """After a warm-up step (optimiser state, compilation), steps and their statistics run under
    torch.cuda.set_sync_debug_mode("error"): any synchronising call raises."""
    cfg, model, inputs = tiny("vit", device="cuda", backend="auto")
    step = make_step(cfg, model, "cuda", compile=compile, grad_clip=1.0)
    stats = StepStats(torch.device("cuda"))
    for i, decode in enumerate([False, True]):  # warm-up: both graphs
        stats.add(step(inputs, i, decode))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 6):
            stats.add(step(inputs, i, i == 4))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.read()["skips"] == 0


def graph_losses(seed: int, dropout: float, steps: int = 3, lr_scale: float = 0.0, **kwargs) -> list[float]:
    cfg, model, inputs = tiny("vit", device="cuda", dropout=dropout, backend="auto", seed=seed)
    step = make_step(cfg, model, "cuda", cuda_graphs=True, **kwargs)
    step.base_lrs = {k: v * lr_scale for k, v in step.base_lrs.items()}  # lr 0: the same weights every step
    losses = [step(inputs, i)["loss"].item() for i in range(step.graph.WARMUP + 1 + steps)]
    assert step.graph.graphs  # captured
    return losses[-steps:]  # the replays


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_draw_new_dropout_masks_and_a_seed_reproduces():
    """Triton attention dropout (kern's device seed) and torch's dropout, eager step captured (the compiled
    step captured: test_gpu_compiled_cuda_graph_step_trains_like_eager; a compile per model is slow)."""
    replays = graph_losses(0, dropout=0.1)
    assert len(set(replays)) == len(replays), replays  # same weights and inputs: only the masks differ
    assert graph_losses(0, dropout=0.1) == replays  # a fixed seed reproduces
    assert len(set(graph_losses(0, dropout=0.0))) == 1  # without dropout they are equal


@pytest.mark.gpu
def test_gpu_compiled_cuda_graph_step_trains_like_eager():
    cfg, model, inputs = tiny("vit", device="cuda", dropout=0.0, backend="auto")
    eager_model = copy.deepcopy(model)
    graphed, eager = make_step(cfg, model, "cuda", compile=True, cuda_graphs=True), make_step(cfg, eager_model, "cuda")
    got = [graphed(inputs, i, i == 6)["loss"].item() for i in range(8)]
    want = [eager(inputs, i, i == 6)["loss"].item() for i in range(8)]
    assert got == pytest.approx(want, rel=1e-3, abs=1e-5)  # TF32 / kernel choice differences only
