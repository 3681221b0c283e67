"""Meta shape propagation: every node's shape and dtype, with ``"B"``/``"S"`` for the batch and
sequence dimensions."""
from __future__ import annotations

import torch
import torch.fx as fx

from ptqc.errors import PtqcError
from ptqc.interpreter import execute

_PROBE = ((2, 16), (3, 17))  # two input shapes; dims that follow them are B and S


class _MetaStore:
    """A weight store's tensors as meta tensors (shape and dtype only)."""

    def __init__(self, store):
        self.store = store

    def __getitem__(self, name):
        shape, dtype = self.store.spec(name)
        return torch.empty(shape, dtype=dtype, device="meta")


def _probe(graph: fx.Graph, store, shape) -> dict:
    vals: dict[fx.Node, object] = {}
    ids = torch.zeros(shape, dtype=torch.long, device="meta")
    try:
        execute(graph, _MetaStore(store), {"input_ids": ids}, device="meta", hook=vals.__setitem__)
    except PtqcError:
        raise
    except Exception as e:  # noqa: BLE001
        bad = [n for n in graph.nodes if n.op == "call_function" and n not in vals]
        where = bad[0].format_node() if bad else "?"
        module = bad[0].meta.get("ptqc", {}).get("module") if bad else None
        raise PtqcError(f"{f'unsupported construct in {module}: ' if module else ''}graph does not type-check at "
                        f"{where}: {str(e).splitlines()[0]}") from None
    return vals


def propagate(graph: fx.Graph, store) -> None:
    """Run the graph on meta tensors for two input shapes and record each node's shape and dtype.

    Raises PtqcError naming the node if the graph does not type-check."""
    a, b = (_probe(graph, store, shape) for shape in _PROBE)
    for n in graph.nodes:
        va, vb = a.get(n), b.get(n)
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            dims = []
            for x, y in zip(va.shape, vb.shape):
                dims.append(x if x == y else {(2, 3): "B", (16, 17): "S"}.get((x, y), "?"))
            n.meta["shape"] = dims
            n.meta["dtype"] = str(va.dtype).removeprefix("torch.")
        else:
            n.meta.pop("shape", None)
            n.meta.pop("dtype", None)


__all__ = ["propagate"]
