"""Blockwise Barlow Twins: block layout, gradient isolation, noise, schedules, learning."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from knn_probe import knn_accuracy, single_thread  # noqa: F401  (a fixture)

from ssl_lib.config import load_config
from ssl_lib.data import SSLDataModule
from ssl_lib.methods import build_method, load_method
from ssl_lib.methods.blockwise import inject_noise
from ssl_lib.train import train

PROJECTOR = {"hidden_dim": 32, "out_dim": 24, "num_layers": 3, "hidden_bias": False}


def _model(make_config, overrides=(), **method):
    cfg = make_config(
        "blockwise_barlow_twins",
        list(overrides),
        method={"head_dim": 16, **method},
        model={"projector": {**PROJECTOR, "last_bias": False}},
        data={"views": ["bt_a", "bt_b"]},
    )
    torch.manual_seed(0)
    return build_method(cfg)


def _views(batch=8):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)]


def _params(model, block):
    return [p for m in model.block_modules(block) for p in m.parameters()]


def test_blocks_heads_and_identical_projectors(make_config):
    model = _model(make_config)
    assert model.block_stages == [[0], [1], [2], [3]]
    assert [h[0].in_channels for h in model.heads] == model.backbone.stage_dims
    assert all(h[0].out_channels == 16 and h[0].kernel_size == (1, 1) for h in model.heads)
    first = model.projector[0].state_dict()
    first_ids = {id(p) for p in model.projector[0].parameters()}
    for proj in model.projector[1:]:  # deep copies: same values, separate parameters
        assert all(torch.equal(v, first[k]) for k, v in proj.state_dict().items())
        assert not {id(p) for p in proj.parameters()} & first_ids
    # one criterion (affine-free global standardisation + cross-correlation) for all blocks
    assert [n for n, _ in model.named_modules() if n.endswith("criterion")] == ["criterion"]
    assert not list(model.criterion.parameters())
    model.eval()
    x = _views()[0]
    assert model(x).shape == (8, 16)
    assert torch.equal(model(x), model.block_features(x, 3))


def test_custom_split_and_invalid_layouts(make_config):
    model = _model(make_config, blocks=[[0, 1], [2, 3]], block_weights=[1.0, 0.5])
    assert model.num_blocks == 2 and len(model.projector) == 2
    assert [h[0].in_channels for h in model.heads] == [32, 128]
    for bad in ([[0], [2], [1, 3]], [[0, 1], [2]], [[0], [], [1, 2, 3]]):
        with pytest.raises(ValueError, match="method.blocks"):
            _model(make_config, blocks=bad)
    with pytest.raises(ValueError, match="block_weights"):
        _model(make_config, block_weights=[1.0])
    with pytest.raises(ValueError, match="noise_type"):
        _model(make_config, noise_type="spatial")


def test_gradient_isolation_between_blocks(make_config):
    model = _model(make_config)
    views = _views()
    for block in range(model.num_blocks):
        model.zero_grad(set_to_none=True)
        outs = [model.block_outputs(v, block) for v in views]
        model.block_loss(outs[0][block], outs[1][block], block).backward()
        for other in range(model.num_blocks):
            grads = [p.grad for p in _params(model, other)]
            if other == block:
                assert all(g is not None and g.abs().sum() > 0 for g in grads[:1])
            else:
                assert all(g is None or torch.all(g == 0) for g in grads), (block, other)


def test_summed_losses_equal_separate_backwards(make_config):
    model = _model(make_config, block_weights=[1.0, 2.0, 0.5, 1.0])
    params = [p for p in model.parameters() if p.requires_grad]
    outs = [model.block_outputs(v, 3) for v in _views()]
    losses = [
        w * model.block_loss(outs[0][b], outs[1][b], b) for b, w in enumerate(model.block_weights)
    ]
    summed = torch.autograd.grad(sum(losses), params, retain_graph=True, allow_unused=True)
    separate = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    for i, g in enumerate(summed):
        parts = [s[i] for s in separate if s[i] is not None]
        if g is None:
            assert not parts
        else:
            torch.testing.assert_close(g, sum(parts))


def test_compute_loss_sums_weighted_blocks(make_config):
    model = _model(make_config, block_weights=[1.0, 2.0, 0.5, 1.0], noise_std=0.0)
    total, extra = model.compute_loss(_views(), torch.zeros(8), torch.arange(8))
    expected = sum(w * extra[f"loss_block{b}"] for b, w in enumerate(model.block_weights))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["all", "hw", "c", "channel"])
def test_noise_modes(mode):
    h = torch.randn(4, 6, 5, 7) * torch.arange(1, 7).view(1, 6, 1, 1)
    dims = {"all": None, "hw": (2, 3), "c": (2,), "channel": (1,)}[mode]
    std = h.std() if dims is None else h.std(dim=dims, keepdim=True)
    torch.manual_seed(5)
    got = inject_noise(h, 0.25, mode)
    torch.manual_seed(5)
    torch.testing.assert_close(got, h + 0.25 * std * torch.randn_like(h))


def test_noise_only_in_training_and_before_the_detach(make_config):
    model = _model(make_config)
    x = _views()[0]
    seen = []
    model.backbone.stages[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    outs = model.block_outputs(x, 1)
    clean = model.backbone.stages[0](x)  # train mode: the same batch statistics
    assert torch.equal(seen[0], outs[0])  # block 1 consumed block 0's noisy output ...
    assert not seen[0].requires_grad  # ... detached
    noise = seen[0] - clean
    assert noise.abs().max() > 0
    assert (noise.std() / clean.std()).item() == pytest.approx(0.25, rel=0.1)
    model.eval()
    seen.clear()
    outs = model.block_outputs(x, 1)
    torch.testing.assert_close(seen[0], model.backbone.stages[0](x))
    torch.testing.assert_close(outs[0], seen[0])


class _Recorder(pl.Callback):
    """Per training step: which blocks received gradients, which are trainable / in train mode."""

    def __init__(self):
        self.steps = []

    def on_after_backward(self, trainer, model):
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "grads": [any(p.grad is not None for p in _params(model, b)) for b in range(4)],
                "trainable": [all(p.requires_grad for p in _params(model, b)) for b in range(4)],
                "training": [model.heads[b].training for b in range(4)],
                "block0": [p.detach().clone() for p in _params(model, 0)],
            }
        )


@pytest.mark.parametrize("epochs_per_block", [1, None])
def test_sequential_schedule_freezes_earlier_blocks(make_config, epochs_per_block):
    model = _model(
        make_config,
        ["trainer.max_epochs=4"],
        schedule="sequential",
        epochs_per_block=epochs_per_block,
    )
    recorder = _Recorder()
    trainer = pl.Trainer(
        max_epochs=4,
        limit_train_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=SSLDataModule(model.cfg.data))
    for step in recorder.steps:
        active = step["epoch"]
        assert step["grads"] == [b == active for b in range(4)]
        assert step["trainable"] == [b >= active for b in range(4)]
        assert step["training"] == [b >= active for b in range(4)]
    first, last = recorder.steps[1]["block0"], recorder.steps[-1]["block0"]
    assert all(torch.equal(a, b) for a, b in zip(first, last, strict=True))  # frozen after epoch 0


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_short_run_beats_random_init_per_block(tmp_path):
    # Measured 20-NN of the last block's head, one thread: random init 0.392; after 2 / 4 / 16
    # epochs (14 / 28 / 112 steps) 0.606 / 0.729 / 0.842.
    cfg = load_config(
        "demo/barlow_twins",
        [
            "method.name=blockwise_barlow_twins",
            "method.head_dim=64",
            "trainer.max_epochs=4",
            f"run.output_dir={tmp_path}",
            "trainer.progress_bar=false",
        ],
    )
    torch.manual_seed(cfg.run.seed)
    random_model = build_method(cfg).eval()
    trained = load_method(str(train(cfg) / "checkpoints" / "last.ckpt")).eval()
    accs = {}
    for name, model in [("random", random_model), ("trained", trained)]:
        accs[name] = [
            knn_accuracy(lambda x, b=b, m=model: m.block_features(x, b), cfg.data)
            for b in range(model.num_blocks)
        ]
        accs[f"{name}_backbone"] = knn_accuracy(model.backbone, cfg.data)
    print("20-NN accuracy per block (head outputs):", accs)
    assert accs["trained"][-1] > accs["random"][-1] + 0.03
