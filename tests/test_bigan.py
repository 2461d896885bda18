"""BiGAN (the CACTUs paper's second embedding): shapes, separated gradients, training and resume."""

from __future__ import annotations

import math

import pytest
import torch

from metalab.errors import ConfigError
from metalab.methods import get_method
from metalab.methods.bigan import BiGAN, BiGANConfig
from metalab.rundir import load_checkpoint, load_method
from metalab.tasks.images import Images
from metalab.train import train

SMALL = BiGANConfig(latent=200, width=4, hidden=16, batch=8)


def _images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_shapes_and_prior():
    torch.manual_seed(0)
    m = get_method("bigan")(SMALL)
    assert isinstance(m, BiGAN) and m.embedding_dim == 200
    x = _images()
    m.eval()
    code = m.encode(x)
    assert code.shape == (8, 200) and code.abs().max() < 1  # in the prior's support
    g = m.generator(m.sample_latent(5, "cpu"))
    assert g.shape == (5, 1, 28, 28) and g.min() >= 0 and g.max() <= 1
    z = m.sample_latent(1000, "cpu")
    assert z.min() >= -1 and z.max() <= 1 and abs(z.mean()) < 0.05
    assert m.reconstruct(x).shape == x.shape
    with pytest.raises(ConfigError):
        BiGAN(SMALL.updated(image_size=30))


def test_optimizer_is_adam_with_beta1_one_half():
    m = BiGAN(SMALL)
    opt = m.make_optimizer()
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["betas"] == (0.5, 0.999) and opt.param_groups[0]["lr"] == 2e-4
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def _grads(m: BiGAN) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_each_loss_reaches_only_its_own_players(one_thread):
    """meta_step writes dD_loss/dθ_D into D and dGE_loss/dθ_{G,E} into G and E, nothing else:
    checked against each loss differentiated alone with the same random draws."""
    torch.manual_seed(0)
    m = BiGAN(SMALL.updated(dropout=0.0)).double()
    x = _images().double()

    def players(name: str) -> str:
        return name.split(".")[0]

    torch.manual_seed(1)
    m.zero_grad(set_to_none=True)
    m.meta_step(Images(x))
    step = _grads(m)
    assert {players(n) for n in step} == {"generator", "encoder", "discriminator"}
    assert len(step) == len(list(m.parameters()))

    for which in ("d", "ge"):
        torch.manual_seed(1)  # the same z
        m.zero_grad(set_to_none=True)
        d_loss, ge_loss, _ = m.losses(x)
        (d_loss if which == "d" else ge_loss).backward()
        alone = _grads(m)
        own = {"discriminator"} if which == "d" else {"generator", "encoder"}
        for name, grad in step.items():
            if players(name) in own:
                torch.testing.assert_close(grad, alone[name], rtol=1e-10, atol=1e-12)
        # and the loss alone does reach the other players, so the separation is meaningful
        other = [n for n in alone if players(n) not in own]
        assert any(alone[n].abs().sum() > 0 for n in other)


def test_a_step_moves_the_players_the_right_way(one_thread):
    """A few optimizer steps on the discriminator's gradient alone raise its accuracy on the
    batch (sanity of the loss signs); the G/E gradient alone lowers the G/E loss."""
    torch.manual_seed(0)
    m = BiGAN(SMALL.updated(dropout=0.0, lr=1e-3))
    opt = m.make_optimizer()
    x = _images(16)
    for which, key in (("discriminator", "d_loss"), ("generator", "ge_loss")):
        torch.manual_seed(5)
        before = m.losses(x)[2][key]
        for _ in range(5):
            torch.manual_seed(5)
            opt.zero_grad(set_to_none=True)
            m.meta_step(Images(x))
            for name, p in m.named_parameters():
                keep = name.startswith("discriminator") == (which == "discriminator")
                if not keep:
                    p.grad = None
            opt.step()
        torch.manual_seed(5)
        assert m.losses(x)[2][key] < before, which


@pytest.mark.realdata
def test_bigan_trains_checkpoints_and_resumes(omniglot_root, tmp_path, one_thread):
    config = SMALL.updated(batch=16, episodes=6, val_every=3, val_episodes=40)
    torch.manual_seed(0)
    run = tmp_path / "run"
    summary = train("bigan", config, run, data_root=omniglot_root, progress=False)
    assert summary.episodes == 6 and summary.best_val is not None and summary.best_val < 0
    assert load_checkpoint(run / "checkpoint.pt")["episode"] == 6
    summary = train(
        "bigan",
        config.updated(episodes=9),
        run,
        resume=True,
        data_root=omniglot_root,
        progress=False,
    )
    assert summary.episodes == 9
    method, checkpoint = load_method(run / "checkpoint.pt")
    assert checkpoint["episode"] == 9
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        z = method.encode(x)
    assert z.shape == (5, 200) and torch.isfinite(z).all()
    # validation: the mean squared pixel error of G(E(x)), in [0, 1]
    error = method.validation_loss(Images(x))
    with torch.no_grad():
        expected = float(((method.reconstruct(x) - x) ** 2).mean())
    assert 0 < error < 1 and math.isclose(error, expected, rel_tol=1e-5)
