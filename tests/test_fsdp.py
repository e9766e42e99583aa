"""FSDP2 under `torchrun` x 2 (CPU, gloo) trains like one process; checkpoints cross world sizes.

Cross-resume: a DCP checkpoint of 2 FSDP2 processes resumes on 1, and a normal checkpoint of 1
process resumes on 2 under FSDP2 and under DDP; every resumed run logs the uninterrupted losses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import grad_norms, losses
from test_distributed_stages import launch
from test_train import recipe_for

from smolforge.cli import main as cli_main
from smolforge.config import save_recipe
from smolforge.errors import SmolforgeError
from smolforge.model import ModelConfig, Transformer, debug
from smolforge.train import checkpoint as ckpt
from smolforge.train import distributed as dist_utils
from smolforge.train import fsdp
from smolforge.train.loop import train

STEPS = dict(max_steps=6, log_every=1, save_every=3, eval_every=0, batch_size=4, warmup_steps=2, grad_accum=2)


def assert_close(want: list[tuple[int, float]], got: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(want, got):
        assert abs(a - b) < 1e-5, (step, a, b)


def rewind(run_dir: Path, step: int = 3) -> None:
    """Leave the run as if it had stopped right after checkpoint `step`."""
    for path in ckpt._step_dirs(run_dir / "checkpoints"):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    (run_dir / "checkpoints" / "latest").write_text(ckpt.checkpoint_name(step) + "\n")


def test_fsdp2_trains_like_one_process_and_checkpoints_cross_world_sizes(prepared, tmp_path):  # noqa: F811
    single = train(recipe_for(prepared, tmp_path / "single", **STEPS))
    want = losses(single.run_dir)

    save_recipe(recipe_for(prepared, tmp_path / "fsdp", **STEPS, parallel="fsdp2"), tmp_path / "fsdp.yaml")
    launch("pretrain", tmp_path / "fsdp.yaml")
    run_dir = tmp_path / "fsdp" / "tiny"
    assert_close(want, losses(run_dir))
    # The clipped norm is computed over sharded (DTensor) gradients; FSDP2 averages them over ranks
    # as DDP does, so the loss scaling by world_size holds (a wrong factor shows here, not in losses).
    assert grad_norms(run_dir) == pytest.approx(grad_norms(single.run_dir), rel=1e-5)

    # Periodic checkpoints are DCP shards; final/ is a normal checkpoint with the gathered weights.
    step6 = run_dir / "checkpoints" / "step_000006"
    assert fsdp.is_sharded_checkpoint(step6) and not (step6 / ckpt.WEIGHTS_FILE).exists()
    assert {p.name for p in (step6 / ckpt.DCP_DIR).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    ckpt.verify_checkpoint(step6)  # hashes cover the shards
    final, _ = ckpt.load_model(run_dir / "final")
    reference, _ = ckpt.load_model(single.final_checkpoint)
    for name, tensor in reference.state_dict().items():
        assert torch.allclose(final.state_dict()[name], tensor, atol=1e-4), name
    with pytest.raises(SmolforgeError, match="smolforge consolidate"):
        ckpt.load_model(step6)
    assert cli_main(["consolidate", str(step6), str(tmp_path / "gathered")]) == 0
    gathered, _ = ckpt.load_model(tmp_path / "gathered")
    for name, tensor in final.state_dict().items():
        assert torch.equal(gathered.state_dict()[name], tensor), name
    assert ckpt.read_meta(tmp_path / "gathered")["step"] == 6
    # A damaged shard is caught by its recorded hash: resume falls back to the previous checkpoint.
    shard = step6 / ckpt.DCP_DIR / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    with pytest.warns(UserWarning, match="distcp is corrupt"):
        assert ckpt.find_resume_checkpoint(run_dir).name == "step_000003"

    # 2 -> 1: the FSDP2 run's DCP checkpoint at step 3 resumes in one process (DCP reshards).
    rewind(run_dir)
    resumed = train(recipe_for(prepared, tmp_path / "fsdp", **STEPS, parallel="fsdp2"), resume=True)
    assert_close(want, losses(resumed.run_dir))

    # 1 -> 2: the single run's normal checkpoint at step 3 resumes on 2 processes, FSDP2 and DDP.
    for parallel in ("fsdp2", "ddp"):
        shutil.copytree(single.run_dir, tmp_path / parallel / "tiny")
        rewind(tmp_path / parallel / "tiny")
        save_recipe(recipe_for(prepared, tmp_path / parallel, **STEPS, parallel=parallel), tmp_path / "r.yaml")
        launch("pretrain", tmp_path / "r.yaml", "--resume")
        assert_close(want, losses(tmp_path / parallel / "tiny"))


def test_fsdp2_accumulates_locally_until_the_last_micro_batch(tmp_path):
    """set_requires_gradient_sync(False) leaves no reduced gradient (no reduce-scatter) until the
    step's last micro-batch, and the sharded result equals the plain model's accumulated gradient."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 128}))
        sharded = fsdp.shard_model(fsdp.plain_model(plain.config, plain.state_dict()), torch.device("cpu"), False)
        assert fsdp.is_sharded(sharded) and not fsdp.is_sharded(plain)
        micro = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
        for index, ids in enumerate(micro):
            last = index == len(micro) - 1
            for model in (plain, sharded):
                with dist_utils.gradient_sync(model, sync=last):
                    model(ids).logits.float().logsumexp(-1).mean().backward()
            if not last:
                assert all(p.grad is None for p in sharded.parameters())
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
        for name, p in plain.named_parameters():
            assert torch.allclose(grads[name], p.grad, atol=1e-6), name
        want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
        got = dist_utils.clip_grad_norm(sharded.parameters(), 0.1)
        assert type(got) is torch.Tensor and got.item() == pytest.approx(want.item(), rel=1e-6)
        for name, p in sharded.named_parameters():
            assert torch.allclose(p.grad.full_tensor(), dict(plain.named_parameters())[name].grad, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_consolidate_refuses_what_is_not_a_dcp_checkpoint(tmp_path):
    torch.manual_seed(0)
    ckpt.save_checkpoint(tmp_path / "plain", Transformer(ModelConfig(**{**debug().model_dump(), "vocab_size": 128})))
    with pytest.raises(SmolforgeError, match="not a sharded"):
        fsdp.consolidate(tmp_path / "plain", tmp_path / "out")
