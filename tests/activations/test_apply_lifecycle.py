"""compress_activations across a model's life: interrupted forwards, threads, wrappers, restore,
and which modules it may take over."""

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import s2a
from helpers import saved_bytes


class Block(nn.Module):
    """Functional calls (compressed by the function mode, not by a patched module)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 256)

    def forward(self, x):
        return F.layer_norm(F.gelu(self.fc(x)), (256,))


class Net(nn.Sequential):
    def forward(self, x):  # a functional call in the root's own forward, too
        return self[3](self[2](self[1](F.silu(self[0](x)))))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return Net(nn.Linear(64, 64), Block(), nn.GELU(), nn.Linear(256, 8))


def bytes_of(model: nn.Module, x: torch.Tensor) -> int:
    return saved_bytes(model, x, exclude=list(model.parameters()))[1]


X = torch.randn(32, 64)


def test_a_pre_hook_that_raises_leaves_compression_balanced():
    fresh = bytes_of(s2a.compress_activations(mlp(), bits=4, strict=True), X)
    model = mlp()
    reject = model[1].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ValueError("bad input")))
    s2a.compress_activations(model, bits=4, strict=True)
    with pytest.raises(ValueError, match="bad input"):
        model(X)
    reject.remove()
    assert bytes_of(model, X) == fresh  # the root's functional SiLU still compressed afterwards
    assert not _get_current_function_mode_stack()


def test_ctrl_c_mid_forward_is_cleared_by_the_next_forward_and_by_restore():
    def interrupted(model):
        def stop(m, a):
            raise KeyboardInterrupt  # skips the exit hooks an Exception runs

        h = model[2].register_forward_pre_hook(stop)
        with pytest.raises(KeyboardInterrupt):
            model(X)
        h.remove()

    other = mlp()
    native = bytes_of(other, X)
    model = s2a.compress_activations(mlp(), bits=4)
    compressed = bytes_of(model, X)
    interrupted(model)
    assert bytes_of(model, X) == compressed  # the next forward starts afresh
    assert not _get_current_function_mode_stack()
    interrupted(model)
    s2a.restore(model)
    assert not _get_current_function_mode_stack()
    assert bytes_of(other, X) == native == bytes_of(model, X)


def test_concurrent_forwards_in_two_threads_are_both_compressed():
    model = s2a.compress_activations(mlp(), bits=4)
    alone = bytes_of(model, X)
    both_inside = threading.Barrier(2, timeout=30)

    def meet(module, args):
        both_inside.wait()

    model[1].register_forward_pre_hook(meet)
    got, errors = {}, []

    def run(i):
        try:
            got[i] = bytes_of(model, X)  # saved-tensor hooks are per thread, as the mode stack
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == {0: alone, 1: alone}


def test_restore_reaches_a_compressed_model_inside_a_wrapper():
    inner = s2a.compress_activations(mlp(), bits=4)
    wrapper = nn.Sequential(inner)
    with pytest.raises(RuntimeError, match=r"already compressed \(its submodule 0\)"):
        s2a.compress_activations(wrapper)
    s2a.restore(wrapper)
    assert "_s2a_compression" not in vars(inner)
    assert bytes_of(inner, X) == bytes_of(mlp(), X)
    s2a.compress_activations(wrapper, bits=4)  # and it can be compressed again


def test_restore_keeps_a_forward_installed_after_compression():
    model = s2a.compress_activations(mlp(), bits=4)
    gelu = model[2]
    patched = gelu.forward
    gelu.forward = lambda x: patched(x) * 1.0  # a wrapper of someone else's (accelerate's hooks)
    mine = gelu.forward
    with pytest.warns(RuntimeWarning, match="replaced since"):
        s2a.restore(model)
    assert gelu.forward is mine


def test_activation_classes_are_recognised_from_their_libraries_only():
    class Swish(nn.Module):  # a user's own, with a slope: not SiLU
        def forward(self, x):
            return x * torch.sigmoid(1.5 * x)

    model = nn.Sequential(nn.Linear(8, 8), Swish())
    x = torch.randn(4, 8)
    want = model(x)
    s2a.compress_activations(model, bits=4)
    torch.testing.assert_close(model(x), want)
    assert "1" not in s2a.compression_summary(model)


def test_transformers_accurate_gelu_keeps_its_tanh_formula():
    from transformers.activations import AccurateGELUActivation

    model = nn.Sequential(nn.Linear(8, 8), AccurateGELUActivation())
    x = torch.randn(64, 8) * 3
    want = model(x)
    s2a.compress_activations(model, bits=4)
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.LeakyReLU(0.1, inplace=True), nn.SiLU(inplace=True),
                                 nn.Hardtanh(inplace=True), nn.Dropout(0.5, inplace=True)])
def test_in_place_modules_still_write_their_input(act):
    x = torch.randn(16, 8)
    torch.manual_seed(3)
    want = act(x.clone())
    s2a.compress_activations(act, bits=4)
    h = x.clone()
    torch.manual_seed(3)
    act(h)  # the result is read from h, as a caller relying on inplace does
    if isinstance(act, nn.Dropout):  # s2a draws its own mask: same zeros count, same scale
        assert ((h == 0) == (h * 2 == 0)).all() and torch.allclose(h[h != 0], x[h != 0] * 2)
    else:
        torch.testing.assert_close(h, want)


def test_patched_batch_norm_checks_its_input_rank():
    bn = s2a.compress_activations(nn.BatchNorm2d(4), bits=4)
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(2, 4, 5))


def test_compressed_attention_runs_in_float64():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = vit(x)
    s2a.compress_activations(vit, bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nor does the recompute guard fire
        got = vit(x.requires_grad_())
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert "blocks.0.attn" in s2a.compression_summary(vit)


def test_data_parallel_replicas_are_refused_and_copies_run():
    import copy

    model = s2a.compress_activations(mlp(), bits=4)
    replica = model._replicate_for_data_parallel()  # what nn.DataParallel runs on each device
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        replica(X)
    twin = copy.deepcopy(model)  # an EMA or teacher copy is its own compressed model
    assert bytes_of(twin, X) == bytes_of(model, X)


@pytest.mark.parametrize("pool", [nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(3)])
@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.Dropout(0.2, inplace=True)])
def test_in_place_modules_after_1d_pooling(pool, act):
    # ATen's 1d pooling returns a view of its 2d result: made inside the compressed pooling's
    # Function, it could not be modified in place (audio and time-series CNNs)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), pool, act)
    x = torch.randn(2, 2, 16)
    want = model(x)
    s2a.compress_activations(model, bits=4)
    got = model(x)
    if isinstance(act, nn.ReLU):
        torch.testing.assert_close(got, want)
    got.sum().backward()
    assert model[0].weight.grad is not None


def test_a_raising_pre_hook_on_a_skipped_module_keeps_the_rest_compressed():
    fresh = bytes_of(s2a.compress_activations(mlp(), bits=4, skip=["1"]), X)
    model = s2a.compress_activations(mlp(), bits=4, skip=["1"])
    reject = model[1].register_forward_pre_hook(
        lambda m, a: (_ for _ in ()).throw(ValueError("bad input")), prepend=True)  # before _disable
    with pytest.raises(ValueError, match="bad input"):
        model(X)
    reject.remove()
    assert bytes_of(model, X) == fresh  # the root's functional SiLU still compressed


def test_a_state_pickled_before_per_thread_state_still_restores():
    # compressed models pickled by the previous release: 3-field patch records, shared counters
    model = s2a.compress_activations(mlp(), bits=4)
    state = model._s2a_compression
    old = {k: v for k, v in vars(state).items() if k != "running"}
    old["patched"] = [entry[:3] for entry in old["patched"]]
    old.update(depth=0, disabled=0, mode=None, paths=[], trainable=set())
    for added_since in ("hub_kernels", "eager_models", "sdpa_models", "attn_now", "original_attn"):
        del old[added_since]
    state = object.__new__(type(state))  # as unpickling makes it: only what was saved
    state.__setstate__(old)
    model._s2a_compression = state
    assert "2" in s2a.compression_summary(model)
    s2a.restore(model)
    assert "forward" not in vars(model[2])


def test_compression_summary_of_a_compiled_model_uses_the_eager_paths():
    model = s2a.compress_activations(mlp(), bits=4)
    compiled = torch.compile(model)  # wrapped only: nothing is compiled before a call
    assert s2a.compression_summary(compiled) == s2a.compression_summary(model)
    assert "2" in s2a.compression_summary(compiled)
