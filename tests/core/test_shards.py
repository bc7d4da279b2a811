"""spheregen.shards: a batch evaluated as one shard per CPU thread gives the batch's loss
and gradient (the Sphere Encoder's draws are made once, before the split), the trainer
uses it where it applies, and nothing else changes."""

from __future__ import annotations

import threading

import pytest
import torch

from spheregen.interfaces import DataSpec, ShardableLoss
from spheregen.shards import ThreadShards, shard_rows, sharded_backward, use_thread_shards
from spheregen_plugins.sphere_encoder.config import SphereEncoderConfig
from spheregen_plugins.sphere_encoder.method import SphereEncoder

CPU = torch.device("cpu")


def _sphere_encoder(seed: int = 0, **options) -> SphereEncoder:
    """A tiny Sphere Encoder with every weight non-zero (zero-init heads and gates would
    leave most gradients trivially 0), label dropout and hard cases on."""
    torch.manual_seed(seed)
    cfg = SphereEncoderConfig(size="tiny", patch_size=4, mixer_depth=1, head="conv", hard_case_prob=0.5, **options)
    model = SphereEncoder(cfg, DataSpec(image_size=16, channels=3, num_classes=4)).train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _batch(b: int = 10):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, 16, 16, generator=gen) * 2 - 1, torch.arange(b) % 4


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_shard_rows_cover_the_batch_in_near_equal_parts():
    assert shard_rows(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert shard_rows(2, 4) == [slice(0, 1), slice(1, 2)]  # no empty shard
    for b, n in ((64, 2), (17, 4), (5, 5)):
        sizes = [s.stop - s.start for s in shard_rows(b, n)]
        assert sum(sizes) == b and max(sizes) - min(sizes) <= 1


def test_thread_shards_run_in_order_on_one_thread_each_and_restore_the_count():
    pool = ThreadShards(2)
    try:
        before = torch.get_num_threads()
        seen = pool.run([lambda: (threading.get_ident(), torch.get_num_threads())] * 2)
        assert [n for _, n in seen] == [1, 1] and seen[0][0] == threading.get_ident() != seen[1][0]
        assert torch.get_num_threads() == before
        with pytest.raises(ZeroDivisionError):  # a worker's exception reaches the caller
            pool.run([lambda: 1, lambda: 1 / 0])
        assert torch.get_num_threads() == before
        with pytest.raises(ValueError, match="3 calls for 2 thread shards"):
            pool.run([lambda: 1] * 3)
    finally:
        pool.close()
    with pytest.raises(ValueError, match="at least 2"):
        ThreadShards(1)


def test_the_sphere_encoder_draws_its_randomness_once_per_batch():
    """loss(x, y) and loss(x, y, draws=loss_draws(x, y)) are the same numbers and leave
    the global RNG in the same state; every draw has the batch as its leading dim."""
    x, y = _batch()
    model = _sphere_encoder()
    assert isinstance(model, ShardableLoss)
    torch.manual_seed(3)
    plain, _ = model.loss(x, y)
    after_plain = torch.rand(4)
    torch.manual_seed(3)
    draws = model.loss_draws(x, y)
    given, _ = model.loss(x, y, draws=draws)
    assert torch.equal(plain, given) and torch.equal(after_plain, torch.rand(4))
    assert {"drop_e", "r", "s", "r_big", "e", "drop_big", "drop_small", "drop_e2"} == set(draws)
    assert all(v.shape[0] == x.shape[0] for v in draws.values())
    with pytest.raises(ValueError, match="at least 3 per device"):
        model.loss_draws(x[:2], y[:2])


@pytest.mark.parametrize("options", [{}, {"hard_case_fix": False, "lat_con_weight": 0.0}])
def test_sharded_backward_gives_the_batch_loss_and_gradient(options):
    x, y = _batch()
    whole, sharded = _sphere_encoder(**options), _sphere_encoder(**options)
    torch.manual_seed(5)
    loss, logs = whole.loss(x, y)
    loss.backward()
    pool = ThreadShards(3)  # 4 + 3 + 3 rows
    try:
        torch.manual_seed(5)
        s_loss, s_logs = sharded_backward(sharded, _params(sharded), x, y, pool)
        again = _sphere_encoder(**options)
        torch.manual_seed(5)
        sharded_backward(again, _params(again), x, y, pool)
    finally:
        pool.close()
    torch.testing.assert_close(s_loss, loss.detach(), rtol=1e-5, atol=1e-7)
    assert logs.keys() == s_logs.keys() and all(abs(logs[k] - s_logs[k]) <= 1e-5 * abs(logs[k]) + 1e-7 for k in logs)
    for p, q, r in zip(_params(whole), _params(sharded), _params(again)):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
        assert torch.equal(q.grad, r.grad)  # deterministic for a shard count


def test_sharded_backward_scales_accumulates_and_keeps_the_parameters_layout():
    """scale × the batch's gradient, added to existing grads, in each parameter's strides
    (autograd.grad returns the SwiGLU's w3 gradient transposed; torch's fused AdamW
    ignores strides); the global RNG ends where the whole-batch step leaves it."""
    x, y = _batch(8)
    whole, model = _sphere_encoder(), _sphere_encoder()
    torch.manual_seed(0)
    whole.loss(x, y)[0].backward()
    after_whole = torch.rand(3)
    params = _params(model)
    pool = ThreadShards(2)
    try:
        torch.manual_seed(0)
        sharded_backward(model, params, x, y, pool, scale=0.25)
        assert torch.equal(torch.rand(3), after_whole)
        first = [p.grad.clone() for p in params]
        torch.manual_seed(0)
        sharded_backward(model, params, x, y, pool, scale=0.25)
    finally:
        pool.close()
    for p, g, w in zip(params, first, _params(whole)):
        assert p.grad.stride() == p.stride()
        torch.testing.assert_close(g, 0.25 * w.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p.grad, 2 * g)


@pytest.mark.parametrize("conditional, dropout", [(False, 0.1), (True, 0.0)])
def test_unconditional_no_dropout_and_more_threads_than_rows(conditional, dropout):
    x, y = _batch(3)
    whole, sharded = (_sphere_encoder(label_dropout=dropout, conditional=conditional) for _ in range(2))
    torch.manual_seed(2)
    whole.loss(x, y)[0].backward()
    pool = ThreadShards(4)  # 3 rows: three shards of one
    try:
        torch.manual_seed(2)
        sharded_backward(sharded, _params(sharded), x, y, pool)
    finally:
        pool.close()
    for p, q in zip(_params(whole), _params(sharded)):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_fused_adamw_after_thread_shards_steps_as_after_the_whole_batch():
    x, y = _batch(8)
    whole, sharded = _sphere_encoder(), _sphere_encoder()
    torch.manual_seed(0)
    whole.loss(x, y)[0].backward()
    pool = ThreadShards(2)
    try:
        torch.manual_seed(0)
        sharded_backward(sharded, _params(sharded), x, y, pool)
    finally:
        pool.close()
    for model in (whole, sharded):
        torch.optim.AdamW(_params(model), lr=1e-2, fused=True).step()
    for p, q in zip(_params(whole), _params(sharded)):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_thread_shards_apply_only_where_they_are_the_batchs_step(monkeypatch):
    model = _sphere_encoder()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert use_thread_shards(True, model, CPU, 1, "no", False, 32) == 2
    assert use_thread_shards(True, model, CPU, 1, "no", False, 31) == 0  # < 16 rows a shard
    assert use_thread_shards(False, model, CPU, 1, "no", False, 64) == 0  # train.thread_shards = false
    assert use_thread_shards(True, torch.nn.Linear(2, 2), CPU, 1, "no", False, 64) == 0  # no ShardableLoss
    assert use_thread_shards(True, model, torch.device("cuda"), 1, "no", False, 64) == 0
    assert use_thread_shards(True, model, CPU, 2, "no", False, 64) == 0  # processes: DDP all-reduces
    assert use_thread_shards(True, model, CPU, 1, "bf16", False, 64) == 0  # autocast is per thread
    assert use_thread_shards(True, model, CPU, 1, "no", True, 64) == 0  # a compiled step
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert use_thread_shards(True, model, CPU, 1, "no", False, 64) == 0


def test_a_drop_mask_of_the_wrong_shape_is_refused():
    model = _sphere_encoder()
    with pytest.raises(ValueError, match=r"drop must have shape \(4,\)"):
        model.encoder.label_embed(torch.zeros(4, dtype=torch.long), 4, torch.zeros(3, dtype=torch.bool))


def test_the_trainer_shards_a_sphere_encoders_batch_over_its_threads(tiny_experiment, tmp_path, monkeypatch):
    """At 2 threads the runner trains the Sphere Encoder in thread shards (on by default),
    to the weights of the whole-batch step up to rounding; ``train.thread_shards = false``
    trains the batch whole."""
    from spheregen import runner
    from spheregen.artifacts import read_final
    from spheregen.experiment import load_experiment
    from spheregen.workspace import Workspace

    methods = ('[[methods]]\nname = "se"\nmethod = { name = "sphere-encoder", size = "tiny", patch_size = 2, '
               'mixer_depth = 1 }\n')
    calls = []
    real = runner.sharded_backward
    monkeypatch.setattr(runner, "sharded_backward", lambda *a, **k: calls.append(a[4].n) or real(*a, **k))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    finals = {}
    for flag in ("true", "false"):
        overrides = ["train.steps=2", "train.batch_size=32", f"train.thread_shards={flag}"]
        ws = Workspace(load_experiment(tiny_experiment("", methods), overrides),
                       tmp_path / flag / "runs", tmp_path / flag / "reports")
        finals[flag] = read_final(runner.train(ws, ws.exp.methods[0], progress=False).parent)[0]
        # two steps of two shards each with the option on, and no more calls with it off
        assert calls == [2, 2], flag
    for k, v in finals["true"].items():
        torch.testing.assert_close(v, finals["false"][k], rtol=1e-3, atol=1e-5)
