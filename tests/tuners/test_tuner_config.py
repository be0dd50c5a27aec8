"""S2AConfig: defaults, validation messages, JSON round trip."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s2a import S2AConfig
from s2a.activations import OP_KINDS
from s2a.tuners.config import ACT_BITS, MODULES


def test_defaults():
    cfg = S2AConfig()
    assert cfg.modules == ("bias", "prompt")
    assert (cfg.prompt_rank, cfg.side_reduction, cfg.side_depth, cfg.act_bits) == (4, 8, 4, 4)
    assert cfg.op_bits == {} and cfg.num_classes is None
    assert cfg.add_missing_bias and not cfg.fuse_side and cfg.freeze_norm_stats
    assert cfg.compression_ops() is None


def test_modules_are_canonical():
    assert S2AConfig(modules=["prompt", "bias", "prompt"]).modules == ("bias", "prompt")
    assert S2AConfig(modules="side").modules == ("side",)
    assert S2AConfig(modules=("prompt", "norm", "bias")).modules == ("bias", "norm", "prompt")


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"modules": ("bias", "lora")}, "modules", "'bias', 'norm', 'prompt', 'side'"),
        ({"modules": ()}, "modules", "'bias', 'norm', 'prompt', 'side'"),
        ({"modules": 3}, "modules", "'bias', 'norm', 'prompt', 'side'"),
        ({"prompt_rank": 0}, "prompt_rank", ">= 1"),
        ({"prompt_rank": 2.0}, "prompt_rank", ">= 1"),
        ({"prompt_positions": 0}, "prompt_positions", ">= 1"),
        ({"prompt_positions": 64, "modules": ("bias",)}, "prompt_positions", "needs 'prompt' in modules"),
        ({"side_reduction": True}, "side_reduction", ">= 1"),
        ({"side_depth": -1}, "side_depth", ">= 1"),
        ({"act_bits": 5}, "act_bits", "[2, 3, 4, 8]"),
        ({"act_bits": 1}, "act_bits", "[2, 3, 4, 8]"),
        ({"op_bits": {"gleu": 4}}, "op_bits", "'gelu'"),
        ({"op_bits": {"softmax": 1}}, "op_bits['softmax']", "0 (kept native) or one of [2, 3, 4, 8]"),
        ({"op_bits": {"relu": 1, "gelu": 16}}, "op_bits['gelu']", "[1, 2, 3, 4, 8]"),
        ({"op_bits": [4]}, "op_bits", "kind"),
        ({"op_bits": {"gelu": 2}, "act_bits": None}, "op_bits", "act_bits"),
        ({"num_classes": 0}, "num_classes", ">= 1"),
        ({"add_missing_bias": 1}, "add_missing_bias", "True or False"),
        ({"fuse_side": "yes"}, "fuse_side", "True or False"),
        ({"fuse_side": True}, "fuse_side", "'side'"),
        ({"freeze_norm_stats": None}, "freeze_norm_stats", "True or False"),
    ],
)
def test_invalid_values_name_field_and_allowed(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        S2AConfig(**kwargs)
    assert field in str(err.value) and allowed in str(err.value)


def test_per_operator_bits_keep_all_kinds_and_attention_default():
    ops = S2AConfig(act_bits=4, op_bits={"gelu": 2, "layer_norm": 8}).compression_ops()
    assert set(ops) == set(OP_KINDS)
    assert ops["gelu"] == 2 and ops["layer_norm"] == 8 and ops["softmax"] == 4
    assert ops["attention"] == 8  # the engine's default (8-bit Q/K/V, recomputed probabilities)
    assert ops["matmul"] == 8 and ops["star_relu"] == 8  # theirs too (operands kept as they are)
    assert S2AConfig(act_bits=3, op_bits={"attention": 4}).compression_ops()["attention"] == 4
    # 0 keeps a kind native: attention whose logits are too large for 8-bit Q / K
    ops = S2AConfig(op_bits={"attention": 0}).compression_ops()
    assert "attention" not in ops and ops["gelu"] == 4


def test_attention_kept_native_by_op_bits():
    import timm
    import torch

    import s2a

    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    s2a.apply(vit, S2AConfig(op_bits={"attention": 0}), example_input=torch.randn(2, 3, 32, 32))
    kinds = set(s2a.compression_summary(vit).values())
    assert "gelu@4" in kinds and not any(k.startswith("attention") for k in kinds)


def test_from_dict_rejects_unknown_fields_and_bad_json():
    with pytest.raises(ValueError, match=r"unknown S2AConfig field\(s\) \['rank'\]; allowed fields"):
        S2AConfig.from_dict({"rank": 4})
    with pytest.raises(ValueError, match="not valid JSON"):
        S2AConfig.from_json("{modules")
    with pytest.raises(ValueError, match="act_bits"):
        S2AConfig.from_json(json.dumps({"act_bits": 7}))


configs = st.builds(
    S2AConfig,
    modules=st.lists(st.sampled_from(MODULES), min_size=1, unique=True).map(tuple),
    prompt_rank=st.integers(1, 64),
    side_reduction=st.integers(1, 32),
    side_depth=st.integers(1, 12),
    act_bits=st.sampled_from((None, *ACT_BITS)),
    num_classes=st.none() | st.integers(1, 10_000),
    add_missing_bias=st.booleans(),
    freeze_norm_stats=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(configs, st.dictionaries(st.sampled_from(["gelu", "silu", "softmax", "layer_norm", "dropout"]),
                                st.sampled_from([2, 4, 8]), max_size=3), st.booleans(),
       st.none() | st.integers(1, 4096))
def test_json_round_trip(cfg, op_bits, fuse, positions):
    cfg.prompt_positions = positions if "prompt" in cfg.modules else None
    if cfg.act_bits is not None:
        cfg.op_bits = op_bits
    cfg.fuse_side = fuse and "side" in cfg.modules
    cfg.validate()
    text = cfg.to_json()
    again = S2AConfig.from_json(text)
    assert again == cfg
    assert S2AConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(text) == cfg.to_dict()
