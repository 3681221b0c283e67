"""Structure queries passes rely on."""
from ptqc import patterns


def _roles(nodes):
    return [n.meta["ptqc"]["role"] for n in nodes]


def test_norm_groups(loaded):
    qm = loaded("qwen2")
    groups = patterns.norm_groups(qm)
    got = [(norm.meta["ptqc"]["role"], norm.meta["ptqc"]["layer"], _roles(lins)) for norm, lins in groups]
    want = []
    for i in range(qm.num_layers):
        want += [("input_norm", i, ["q", "k", "v"]), ("post_attention_norm", i, ["gate", "up"])]
    want.append(("final_norm", None, ["lm_head"]))
    assert got == want


def test_producer_linear(loaded):
    qm = loaded("llama")
    for i in range(qm.num_layers):
        o, down, q = (qm.linears(role=r, layer=i)[0] for r in ("o", "down", "q"))
        assert patterns.producer_linear(qm, o) is qm.linears(role="v", layer=i)[0]
        assert patterns.producer_linear(qm, down) is qm.linears(role="up", layer=i)[0]
        assert patterns.producer_linear(qm, q) is None  # q reads a norm


def test_shared_inputs(loaded):
    qm = loaded("qwen2")
    shared = [(_roles(lins)) for _, lins in patterns.shared_input_groups(qm) if len(lins) > 1]
    assert shared == [["q", "k", "v"], ["gate", "up"]] * qm.num_layers


# ---- Pat: the pattern language of the lowering rules and the frontend's canonicalization ----------
def _chain():
    """x -> cast -> mul(w, rsqrt(x)) in a hand-built fx graph."""
    import torch
    import torch.fx as fx

    aten = torch.ops.aten
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    cast = g.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32})
    r = g.call_function(aten.rsqrt.default, (cast,))
    mul = g.call_function(aten.mul.Tensor, (w, r))
    g.output(mul)
    return aten, x, w, cast, r, mul


def test_pat_binds_names_checks_ops_literals_and_where():
    from ptqc.patterns import Pat

    aten, x, w, cast, r, mul = _chain()
    m = Pat(aten.mul.Tensor, (Pat(name="w"), Pat(aten.rsqrt.default, (Pat(name="y"),), name="r")), name="m").match(mul)
    assert m == {"w": w, "y": cast, "r": r, "m": mul}
    assert Pat(aten.add.Tensor).match(mul) is None  # wrong op
    assert Pat((aten.add.Tensor, aten.mul.Tensor)).match(mul) == {}  # any of several ops
    assert Pat(aten.mul.Tensor, (Pat(aten.rsqrt.default),)).match(mul) is None  # arguments in order
    assert Pat(aten.mul.Tensor, where=lambda n: len(n.users) == 2).match(mul) is None
    assert Pat(aten._to_copy.default, (x,)).match(cast) == {}  # a literal node matches itself only
    assert Pat(aten._to_copy.default, (w,)).match(cast) is None
    assert Pat(aten.mul.Tensor, (Pat(), Pat(), Pat())).match(mul) is None  # fewer arguments than patterns
    assert Pat().match(3) == {} and Pat(name="c", where=lambda v: v == 2).match(2) == {"c": 2}
    assert Pat(name="c", where=lambda v: v == 2).match(3) is None
    assert Pat(aten.mul.Tensor, (Pat(aten.rsqrt.default, name="r"), Pat(name="w"))).match(mul) is None
    assert Pat(aten.mul.Tensor, (Pat(aten.rsqrt.default, name="r"), Pat(name="w")), commute=True).match(mul) == \
        {"r": r, "w": w}


def test_pat_looks_through_casts_and_a_name_bound_twice_must_be_one_value():
    from ptqc.patterns import Pat

    aten, x, w, cast, r, mul = _chain()
    casts = (aten._to_copy.default,)
    assert Pat(aten.rsqrt.default, (Pat(name="x", through=casts),)).match(r) == {"x": x}
    assert Pat(aten.rsqrt.default, (Pat(name="x"),)).match(r) == {"x": cast}
    same = Pat(aten.mul.Tensor, (Pat(name="v"), Pat(aten.rsqrt.default, (Pat(name="v", through=casts),))))
    assert same.match(mul) is None  # w is not x
    r.args = (w,)
    assert same.match(mul) == {"v": w}
