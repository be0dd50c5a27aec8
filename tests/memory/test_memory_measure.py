"""Exact saved-for-backward accounting on small hand-built models."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2a.memory import MemoryReport, measure
from s2a.memory.allocator import probe_for

F32 = 4


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def test_mlp_exact_bytes_by_hand():
    model = _mlp()
    x = torch.randn(3, 8)  # a batch, no grad
    report = measure(model, x)
    # Linear(8,16): addmm saves its input x (3x8) because its weight needs a gradient; the
    #   weight itself is needed only for dL/dx, and x needs none.
    # GELU: saves its input, the first Linear's output (3x16).
    # Linear(16,4): saves its input, the GELU output (3x16), and its weight (a parameter:
    #   excluded).
    # loss mean(y**2): pow saves y (3x4).
    x_b, h_b, g_b, y_b = 3 * 8 * F32, 3 * 16 * F32, 3 * 16 * F32, 3 * 4 * F32
    assert report.saved_bytes == x_b + h_b + g_b + y_b == 528
    assert report.saved_input_bytes == x_b
    assert report.num_saved_storages == 4
    assert report.by_kind == {"linear": x_b + g_b, "gelu": h_b, "pow": y_b}
    assert report.by_module == {"0": x_b, "1": h_b, "2": g_b, "<loss>": y_b}
    # nothing saved by the loss if it is a plain sum
    report = measure(model, x, loss_fn=lambda out, batch: out.sum())
    assert report.saved_bytes == x_b + h_b + g_b
    assert "<loss>" not in report.by_module


def test_param_counts_and_bytes():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    report = measure(model, torch.randn(3, 8))
    total = 8 * 16 + 16 + 16 * 4 + 4
    assert report.total_params == total
    assert report.trainable_params == total - 8 * 16
    assert abs(report.trainable_pct - 100.0 * (total - 128) / total) < 1e-9
    assert report.param_bytes == total * F32
    assert report.trainable_param_bytes == (total - 128) * F32
    assert report.grad_bytes == (total - 128) * F32
    assert report.optimizer_state_bytes is None


class _TwoSavers(nn.Module):
    """sin and cos both save h; h.t() @ ... saves a view of h: one storage, counted once."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        h = self.lin(x)  # 3x8
        return h.sin() + h.cos() + (h.t() @ self.w).sum()


def test_storage_dedup_when_ops_share_a_tensor():
    torch.manual_seed(0)
    model = _TwoSavers()
    x = torch.randn(3, 8)
    report = measure(model, x, loss_fn=lambda out, batch: out.sum())
    # x (linear input, 96 B) + h (96 B) once, although sin, cos and mm (as h.t()) all save it;
    # mm also saves self.w (a parameter: excluded)
    assert report.saved_bytes == 3 * 8 * F32 + 3 * 8 * F32
    assert report.num_saved_tensors == 4  # x, h for sin, h for cos, h.t() for mm
    assert report.num_saved_storages == 2
    # h is attributed to the first op that saved it; unmapped nodes keep their class name
    assert report.by_kind == {"linear": 3 * 8 * F32, "SinBackward0": 3 * 8 * F32}


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))
        self.register_buffer("s", torch.randn(8))

    def forward(self, x):
        return (x * self.w) * self.s


def test_parameters_and_buffers_excluded():
    model = _Scale()
    x = torch.randn(4, 8, requires_grad=True)
    report = measure(model, x, loss_fn=lambda out, batch: out.sum())
    # x*w saves w (for dx: parameter, excluded) and x (for dw: batch input, counted);
    # (x*w)*s saves s (for d(x*w): buffer, excluded), and nothing for ds (a buffer)
    assert report.saved_bytes == 4 * 8 * F32
    assert report.saved_input_bytes == 4 * 8 * F32


def test_frozen_linear_keeps_no_input():
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    lin.weight.requires_grad_(False)  # BitFit: only the bias trains
    for x in (torch.randn(5, 16), torch.randn(5, 16, requires_grad=True)):
        report = measure(lin, x, loss_fn=lambda out, batch: out.sum())
        # dL/db = sum(dL/dy) needs nothing; dL/dx = dL/dy W needs only W (a parameter)
        assert report.saved_bytes == 0
        assert report.by_kind.get("linear", 0) == 0
        assert report.grad_bytes == 32 * F32


def test_everything_frozen_saves_nothing():
    model = _mlp().requires_grad_(False)
    report = measure(model, torch.randn(3, 8))
    assert report.saved_bytes == 0
    assert report.trainable_params == 0
    assert report.grad_bytes == 0


def test_breakdowns_sum_to_total_and_kinds():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.LayerNorm(8 * 6 * 6),
        nn.Dropout(0.5),
        nn.Linear(8 * 6 * 6, 10),
        nn.Softmax(dim=-1),
    )
    report = measure(model, torch.randn(2, 3, 6, 6))
    assert sum(report.by_kind.values()) == report.saved_bytes
    assert sum(report.by_module.values()) == report.saved_bytes
    for kind in ("conv", "batch_norm", "relu", "layer_norm", "dropout", "linear", "softmax"):
        assert kind in report.by_kind, report.by_kind


def test_attention_kind():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)

    report = measure(Attn(), torch.randn(2, 5, 16))
    assert report.by_kind.get("attention", 0) > 0
    assert report.by_module.get("<root>", 0) > 0  # sdpa runs in the root module's forward


class _GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        codes = (x > 0).to(torch.uint8)  # stand-in for packed low-bit codes
        ctx.save_for_backward(codes)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (codes,) = ctx.saved_tensors
        return g * codes


class _S2AGELUFunction(_GELUFunction):
    pass


_S2AGELUFunction.__module__ = "s2a.activations.fake"


class _CustomAct(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.fn.apply(self.lin(x))


def test_custom_function_saved_tensors_are_counted_and_named():
    x = torch.randn(3, 4)
    report = measure(_CustomAct(_GELUFunction), x, loss_fn=lambda o, b: o.sum())
    assert report.by_kind["gelu (custom)"] == 3 * 4  # uint8 codes
    report = measure(_CustomAct(_S2AGELUFunction), x, loss_fn=lambda o, b: o.sum())
    assert report.by_kind["gelu (s2a)"] == 3 * 4


def test_outputs_not_in_loss_are_walked_and_unreachable_nodes_are_other():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.cache = None

        def forward(self, x):
            h = self.lin(x)
            self.cache = h.sin()  # a graph kept alive outside the outputs: unreachable
            return h, h.exp()  # the loss uses only h; exp's graph hangs off the outputs

    x = torch.randn(3, 4)
    report = measure(Branchy(), x, loss_fn=lambda out, batch: out[0].sum())
    # x by the linear; h by sin, a node no walk reaches; exp's result by exp, reached from the
    # second output although the loss ignores it
    assert report.by_kind == {"linear": 3 * 4 * F32, "other": 3 * 4 * F32, "ExpBackward0": 3 * 4 * F32}

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.cache = None

        def forward(self, x):
            h = self.lin(x)
            self.cache = (h * 2).sin()
            return h

    report = measure(Hidden(), x, loss_fn=lambda out, batch: out.sum())
    assert report.by_kind == {"linear": 3 * 4 * F32, "other": 3 * 4 * F32}


def _hook_counts(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    ]


def test_model_left_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    existing = torch.full_like(model[3].bias, 7.0)
    model[3].bias.grad = existing
    model[2].eval()  # mixed training flags must survive
    hooks, flags = _hook_counts(model), [m.training for m in model.modules()]
    rg = [p.requires_grad for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    x = torch.randn(6, 8, requires_grad=True)
    rng = torch.get_rng_state()

    report = measure(model, x, optimizer_step=True)
    assert isinstance(report, MemoryReport)

    assert _hook_counts(model) == hooks
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == rg
    assert model[3].bias.grad is existing and torch.equal(existing, torch.full_like(existing, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "3.bias")
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # BN stats
    assert x.grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    # a second measurement sees exactly the same step
    again = measure(model, x, optimizer_step=True)
    assert again.saved_bytes == report.saved_bytes
    assert again.by_kind == report.by_kind


def test_optimizer_state_bytes():
    model = _mlp()
    report = measure(model, torch.randn(3, 8), optimizer_step=True)
    n_tensors = len(list(model.parameters()))
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a float32 scalar step per parameter
    assert report.optimizer_state_bytes == 2 * report.trainable_param_bytes + 4 * n_tensors


def test_batch_forms_tuple_and_dict():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, a, b=None):
            return self.lin(a) * b

    a, b = torch.randn(2, 4), torch.randn(2, 4)
    r1 = measure(Two(), (a, b))
    r2 = measure(Two(), {"a": a, "b": b})
    assert r1.saved_bytes == r2.saved_bytes > 0


def test_default_loss_uses_model_loss_and_logits():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            logits = self.lin(x)
            return {"loss": logits.sum(), "logits": logits}

    # the model's own loss (a sum) saves nothing beyond the linear input
    report = measure(WithLoss(), torch.randn(3, 4))
    assert report.saved_bytes == 3 * 4 * F32


class _GenericLUT(torch.autograd.Function):
    """A generic custom Function that names its operator only through ctx.name."""

    @staticmethod
    def forward(ctx, x, name):
        ctx.save_for_backward((x > 0).to(torch.uint8))
        ctx.name = name
        return F.silu(x)

    @staticmethod
    def backward(ctx, g):
        (m,) = ctx.saved_tensors
        return g * m, None


class _Anonymous(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward((x > 0).to(torch.uint8))
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (m,) = ctx.saved_tensors
        return g * m


class _AnonReLU(nn.ReLU):
    def forward(self, x):
        return _Anonymous.apply(x)


def test_custom_function_named_by_ctx_or_module():
    x = torch.randn(3, 4)

    class UsesCtxName(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return _GenericLUT.apply(self.lin(x), "silu")

    report = measure(UsesCtxName(), x, loss_fn=lambda o, b: o.sum())
    assert report.by_kind["silu (custom)"] == 12
    model = nn.Sequential(nn.Linear(4, 4), _AnonReLU())
    report = measure(model, x, loss_fn=lambda o, b: o.sum())
    assert report.by_kind["relu (custom)"] == 12  # named after the module class
    report = measure(_CustomAct(_Anonymous), x, loss_fn=lambda o, b: o.sum())
    assert report.by_kind["_AnonymousBackward"] == 12  # nothing names it


def test_checkpointed_blocks_are_not_recomputed_by_the_walk():
    """Walking the graph must not unpack checkpoint holders (each unpack outside backward
    would recompute the whole block); saved bytes are the checkpointed blocks' inputs."""
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return F.gelu(self.fc(x)) + x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=False)
            return x

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(8, 16)
    report = measure(net, x, lambda out, _batch: out.sum())  # a loss that saves nothing
    # run A forward, run B forward, run B backward's recomputation: 3 calls per block
    assert [b.calls for b in net.blocks] == [3, 3, 3]
    # kept: each block's input (8 x 16 fp32); the batch itself is one of them
    assert report.saved_bytes == 3 * 8 * 16 * 4
    assert all(p.grad is None for p in net.parameters())


def test_measure_releases_the_step_graph():
    """A saved *output* (softmax keeps its result) must not keep the graph alive afterwards:
    measuring model after model in one process would otherwise grow without bound."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Softmax(dim=-1), nn.Linear(16, 4))
    outputs: list[weakref.ref] = []
    model[1].register_forward_hook(lambda _m, _a, out: outputs.append(weakref.ref(out)))
    measure(model, torch.randn(4, 8))
    gc.collect()
    assert outputs and all(ref() is None for ref in outputs)


def test_peak_is_a_steady_state_step_with_the_optimizer_state_alive():
    # A first step allocates AdamW's state only after backward has freed the activations, so
    # its peak would leave the state out; every later step carries the state throughout.
    if probe_for("cpu") is None:
        pytest.skip("no allocator statistics on this platform")
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.GELU()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(4096, 1024)  # activations (112 MiB) well above gradients + state (48 MiB)
    params = [p.detach().clone() for p in model.parameters()]
    without = measure(model, x)
    report = measure(model, x, optimizer_step=True)
    state = report.optimizer_state_bytes
    assert state == 2 * report.trainable_param_bytes + 4 * 8
    # forward and backward are the same step, now on top of the state
    assert report.peak_bytes >= without.peak_bytes + 0.95 * state
    # allocating the state changes no parameter, and the cross-check still sees only the step
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert abs(report.forward_live_bytes / report.expected_forward_live_bytes - 1) < 0.05
    # any optimizer factory: SGD with momentum keeps one buffer per parameter
    sgd = measure(model, x, optimizer_step=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert sgd.optimizer_state_bytes == report.trainable_param_bytes
    assert sgd.peak_bytes >= without.peak_bytes + 0.95 * sgd.optimizer_state_bytes


class _KeepsCtxAttr(torch.autograd.Function):
    """Keeps exp(x) as a ctx attribute: invisible to saved-tensor hooks, not to the allocator."""

    @staticmethod
    def forward(ctx, x):
        ctx.kept = x.exp()
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * ctx.kept


def test_tensors_kept_outside_save_for_backward_get_a_note():
    x = torch.randn(64, 4096)  # 1 MiB; exp(x) of the hidden layer: 4 MiB
    hidden = nn.Linear(4096, 4096 * 4, bias=False)
    hidden.weight.requires_grad_(False)

    class Model(nn.Module):
        def __init__(self, sneaky):
            super().__init__()
            self.hidden, self.sneaky = hidden, sneaky

        def forward(self, x):
            h = self.hidden(x)
            return (_KeepsCtxAttr.apply(h) if self.sneaky else h * 2).sum(-1, keepdim=True)

    x.requires_grad_(True)
    honest = measure(Model(False), (x,), lambda out, _b: out.sum())
    assert not any(n.startswith("cross-check") for n in honest.notes)
    sneaky = measure(Model(True), (x,), lambda out, _b: out.sum())
    assert "exact" in sneaky.peak_method and sneaky.cross_check_ratio > 1.25
    note = next(n for n in sneaky.notes if n.startswith("cross-check"))
    assert "outside save_for_backward" in note and "ctx attributes" in note


def test_batch_sliced_from_a_larger_tensor_counts_the_slice():
    """A dataset held in memory is alive whatever the step saves: a batch that is a slice of
    it counts its own bytes, not the dataset's."""
    model = _mlp()
    data = torch.randn(1000, 8)
    copied = measure(model, data[3:6].clone())
    for batch in (data[3:6], data[:, :8][3:6], data[3:9:2]):
        report = measure(model, batch)
        assert report.saved_bytes - report.saved_input_bytes == copied.saved_bytes - copied.saved_input_bytes
    assert measure(model, data[3:6]).saved_bytes == copied.saved_bytes == 528
    strided = measure(model, data[3:9:2])  # rows 3, 5, 7: the span of 5 rows, not 1000
    assert strided.saved_input_bytes == 5 * 8 * F32


def test_autocast_copies_of_weights_are_counted_in_each_run():
    """Autocast caches the low-precision copy of each trainable weight until the outermost
    autocast exits: the run that reads the peak must make its own, as a training step does."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.ReLU()) for _ in range(4)])
    x = torch.randn(64, 256)
    plain = measure(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        inside = measure(model, x)
    assert inside.notes == []
    with torch.autocast("cpu", torch.bfloat16):
        model(x)  # the user's own forward fills the cache first
        again = measure(model, x)
    assert again.peak_bytes == inside.peak_bytes
    # the bf16 copies of the weights are saved (for dL/dx) and counted: they are not parameters
    assert inside.saved_bytes > plain.saved_bytes


def test_sparse_and_nested_batches_count_their_storage():
    model = _mlp()
    dense = torch.randn(3, 8)
    sparse = measure(model, dense.to_sparse())
    assert sparse.saved_input_bytes == 2 * 24 * 8 + 24 * F32  # indices (int64) and values
    # a jagged nested tensor is a wrapper around its values and offsets: their storages count
    # once each, whichever wrapper saves them (not its outer size, once per wrapper object)
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)], layout=torch.jagged)
    report = measure(model, nested)
    offsets = 3 * 8
    assert report.saved_input_bytes == 5 * 8 * F32 + offsets
    # x and offsets (linear), 5 x 16 twice (gelu, linear), the output (pow) and pow's output
    # (the nested mean of the default loss keeps it)
    assert report.saved_bytes == 5 * 8 * F32 + offsets + 2 * 5 * 16 * F32 + 2 * 5 * 4 * F32
    # a loss on the output's values: the nested output (kept by values()) and its values (kept
    # by pow) are one storage
    on_values = measure(model, nested, loss_fn=lambda out, batch: out.values().pow(2).mean())
    assert on_values.saved_bytes == 5 * 8 * F32 + offsets + 2 * 5 * 16 * F32 + 5 * 4 * F32


def test_tensor_subclasses_count_their_inner_storages():
    from torch.testing._internal.two_tensor import TwoTensor

    n = 4096

    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            h = (x * self.scale).exp()  # mul saves x, exp saves h
            return sum(h[i::4].cos().sum() for i in range(4))  # four views of h, each saved

    def loss(out, batch):
        return out.a + out.b if isinstance(out, TwoTensor) else out

    x = TwoTensor(torch.randn(n), torch.randn(n))  # two inner tensors of n floats
    report = measure(Views(), x, loss_fn=loss)
    assert report.saved_input_bytes == 2 * n * F32
    assert report.saved_bytes == 4 * n * F32  # x and h, two halves each, views counted once
    assert report.num_saved_storages == 4
    assert report.forward_live_bytes == pytest.approx(report.expected_forward_live_bytes, abs=64)


def test_a_module_tensor_the_forward_rebinds_is_freed_and_its_address_not_taken_for_input():
    """Storages that exist before the step are recognised by address, while a tensor viewing
    them lives: one freed mid-step (a tensor attribute the forward rebinds) is freed as in a
    real step (holding it would raise the peak), and an activation allocated at its address is
    not filed as preexisting."""

    class Rebinds(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)
            self.last = torch.zeros(256, 64)  # a plain tensor attribute, the size of h
            self.old_alive: list[bool] = []

        def forward(self, x):
            old = weakref.ref(self.last)
            self.last = x.detach() * 1
            self.old_alive.append(old() is not None)
            return self.lin(x).sin()

    for _ in range(5):  # the allocator may or may not hand the freed block to h
        model = Rebinds()
        report = measure(model, torch.randn(256, 64), loss_fn=lambda out, batch: out.sum())
        assert model.old_alive[0] is False  # run A: the original attribute was freed
        assert report.saved_input_bytes == 256 * 64 * F32  # x alone
        assert report.saved_bytes == 2 * 256 * 64 * F32  # x and h


def test_a_buffer_rebound_by_the_forward_is_put_back():
    class RunningMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.register_buffer("avg", torch.zeros(16))

        def forward(self, x):
            h = self.lin(x)
            self.avg = 0.9 * self.avg + 0.1 * h.detach().mean(0)  # rebinds, not in place
            return h.relu()

    model = RunningMean()
    before = model.avg
    measure(model, torch.randn(8, 16))
    assert model.avg is before and model._buffers["avg"] is before
    assert torch.equal(before, torch.zeros(16))


def test_inference_mode_is_refused():
    model, x = _mlp(), torch.randn(3, 8)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"inference_mode.*call measure outside"):
        measure(model, x)


def test_a_forward_that_changes_its_batch_in_place_gets_a_note():
    class Scales(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            x.mul_(2)
            return self.lin(x)

    x = torch.ones(4, 16)
    report = measure(Scales(), x)
    assert any("modified the batch in place" in note for note in report.notes)
    assert not any("in place" in note for note in measure(_mlp(), torch.randn(3, 8)).notes)


def test_compiled_regions_get_their_own_kind_not_their_module_name():
    class LinearBlock(nn.Module):  # a name that reads as one operator; it runs three
        def __init__(self):
            super().__init__()
            self.lin, self.norm, self.act = nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()

        def forward(self, x):
            return self.act(self.norm(self.lin(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), LinearBlock())
    x = torch.randn(4, 8)
    eager = measure(model, x)
    model[1].compile(backend="aot_eager")
    try:
        report = measure(model, x)
    finally:
        torch._dynamo.reset()
    assert report.by_kind.get("compiled region", 0) > 0
    assert not any(kind.endswith("(custom)") for kind in report.by_kind)
    assert sum(report.by_kind.values()) == report.saved_bytes
    assert any("not split by operator" in note for note in report.notes)
    assert not any("not split by operator" in note for note in eager.notes)


def test_kv_caches_in_the_output_are_walked():
    from transformers import DynamicCache, EncoderDecoderCache

    from s2a.memory.measure import _iter_tensors

    def filled():
        cache = DynamicCache()
        cache.update(torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 0)
        return cache

    assert len(list(_iter_tensors({"past_key_values": filled()}))) == 2
    assert len(list(_iter_tensors({"past_key_values": EncoderDecoderCache(filled(), filled())}))) == 4


def test_meta_models_are_counted_as_on_the_cpu():
    """The meta device holds no memory (every storage at address 0): storages are told apart by
    their storage objects, so a model too large for this machine can still be counted."""
    x = torch.randn(5, 8)
    cpu = measure(_mlp(), x)
    meta = measure(_mlp().to("meta"), x.to("meta"))
    assert meta.saved_bytes == cpu.saved_bytes > 0
    assert meta.by_kind == cpu.by_kind


def test_compressed_norms_are_counted_on_the_meta_device_as_on_the_cpu():
    # the norms switch autocast off around their native kernel: the meta device has no autocast
    import s2a

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(2), nn.LayerNorm(36), nn.GELU())
        return s2a.compress_activations(net, bits=4)

    x = torch.randn(2, 3, 8, 8)
    cpu = measure(model(), x)
    meta = measure(model().to("meta"), x.to("meta"))
    assert meta.saved_bytes == cpu.saved_bytes > 0
    assert meta.by_kind == cpu.by_kind and {"group_norm (s2a)", "layer_norm (s2a)"} <= set(cpu.by_kind)


def test_meta_device_measure_does_not_compile_kernels(monkeypatch):
    # meta tensors went to torch.compile, which failed (a graph dump in a warning) before the
    # eager fallback gave the right shapes
    import warnings

    import s2a
    from s2a.activations import kernels, rowquant

    monkeypatch.setenv("S2A_COMPILE", "1")
    monkeypatch.setattr(kernels, "SMALL", 0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Softmax(-1), nn.Linear(32, 4))
    s2a.compress_activations(net.to("meta"), bits=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = measure(net, torch.randn(8, 16, device="meta"))
    assert report.saved_bytes > 0 and not [w for w in caught if "torch.compile" in str(w.message)]
    assert not [k for k in kernels._COMPILED if k.endswith("/meta")]
    assert not [k for k in rowquant._COMPILED if k[-1] == "meta"]


def test_sparse_tensors_saved_by_the_graph_count_their_indices_and_values():
    n = 2000
    adj = torch.sparse_coo_tensor(torch.randint(0, n, (2, 4000)), torch.rand(4000), (n, n)).coalesce()
    held = adj._indices().untyped_storage().nbytes() + adj._values().untyped_storage().nbytes()

    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            self.adj = adj  # a plain tensor attribute: kept by the graph, alive anyway
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return torch.sparse.mm(self.adj, self.lin(x)).relu()

    report = measure(Graph(), torch.randn(n, 16, requires_grad=True))
    assert held < 100_000
    assert report.saved_input_bytes == n * 16 * F32 + held  # not n * n * 4 = 16 MB
    assert report.saved_bytes < 4 * n * 16 * F32 + held


def test_scripted_submodules_are_measured_under_their_parent():
    model = nn.Sequential(nn.Linear(8, 16), torch.jit.script(nn.Sequential(nn.GELU(), nn.Linear(16, 4))))
    assert measure(model, torch.randn(3, 8)).saved_bytes == measure(_mlp(), torch.randn(3, 8)).saved_bytes


def test_checkpointed_plain_functions_are_not_recomputed_by_the_walk():
    # a region that runs no module escaped the module pre-hook guard: recomputed once per
    # saved tensor (42 runs instead of 3)
    from torch.utils.checkpoint import checkpoint

    calls = []

    def region(x, w1, w2):
        calls.append(1)
        for _ in range(4):
            x = x + F.gelu(x @ w1) @ w2
        return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 32) * 0.1)
            self.w2 = nn.Parameter(torch.randn(32, 16) * 0.1)

        def forward(self, x):
            return checkpoint(region, x, self.w1, self.w2, use_reentrant=False)

    net = Net()
    report = measure(net, torch.randn(8, 16), lambda out, _batch: out.sum())
    assert len(calls) == 3  # run A forward, run B forward, run B backward's recomputation
    assert report.saved_bytes == 8 * 16 * 4  # the region's input
    assert all(p.grad is None for p in net.parameters())


def test_dropout_masks_are_named_dropout_on_the_cpu():
    # CPU dropout saves its mask through a plain mul: a functional dropout inside another
    # module and timm's DropPath were reported as "mul" (CUDA says dropout)
    timm = pytest.importorskip("timm")

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            p = torch.softmax(self.fc(x) @ x.transpose(-1, -2), -1)
            return F.dropout(p, 0.25, training=self.training) @ x

    torch.manual_seed(0)
    report = measure(Attention().train(), torch.randn(2, 8, 16))
    assert "mul" not in report.by_kind and report.by_kind["dropout"] == 2 * 8 * 8 * 4
    # a mul by a constant above 1 that is not a mask stays a mul
    scale = nn.Linear(4, 4)
    report = measure(nn.Sequential(scale), torch.randn(3, 4), lambda out, _b: (out * torch.full_like(out, 2.0)).sum())
    assert "dropout" not in report.by_kind
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, drop_path_rate=0.5).train()
    report = measure(vit, torch.randn(2, 3, 32, 32))
    assert "mul" not in report.by_kind and report.by_kind["drop_path"] > 0


def test_a_batch_with_autograd_history_is_refused():
    # measure backpropagated into the caller's graph: gradients outside the model, graph freed
    emb, head = nn.Linear(4, 8), nn.Linear(8, 2)
    feats = emb(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"autograd history .* pass it detached, x\.detach\(\)"):
        measure(head, feats)
    assert emb.weight.grad is None
    head(feats).sum().backward()  # the caller's graph is intact
    assert measure(head, feats.detach().requires_grad_()).saved_bytes > 0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("resnet18", torch.randn(2, 8)), {}, "expects an nn.Module"),
        ((_mlp(), torch.randn(2, 8), "mse"), {}, "loss_fn must be a function"),
        ((_mlp(), torch.randn(2, 8)), {"optimizer_step": "adam"}, "optimizer_step must be"),
        ((nn.LazyLinear(4), torch.randn(2, 8)), {}, "run one forward first"),
    ],
)
def test_bad_arguments_are_refused_up_front(args, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        measure(*args, **kwargs)


def test_an_accumulating_step_runs_with_the_gradients_alive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))
    x = torch.randn(2048, 512)  # activations (4 MiB a layer) set the peak, not the optimizer step
    first = measure(model, x, optimizer_step=True)
    later = measure(model, x, optimizer_step=True, accumulating=True)
    assert later.saved_bytes == first.saved_bytes and later.grad_bytes == first.grad_bytes
    assert later.forward_live_bytes == first.forward_live_bytes
    # the gradients were alive through the forward: the peak holds them on top of it
    assert later.peak_bytes >= first.peak_bytes + later.grad_bytes // 4
    assert all(p.grad is None for p in model.parameters())  # left as it was
