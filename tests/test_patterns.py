"""Structure queries passes rely on."""
from ptqc import ops, patterns


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


def test_shared_inputs_and_networkx_view(loaded):
    qm = loaded("qwen2")
    shared = [(_roles(lins)) for _, lins in patterns.shared_input_groups(qm) if len(lins) > 1]
    assert shared == [["q", "k", "v"], ["gate", "up"]] * qm.num_layers
    g = patterns.to_networkx(qm)
    q = qm.linears(role="q", layer=0)[0].name
    o = qm.linears(role="o", layer=0)[0].name
    import networkx as nx
    assert nx.has_path(g, q, o) and not nx.has_path(g, o, q)
    attn = next(qm.nodes(ops.ATTENTION))
    assert g.nodes[attn.name]["role"] == "attention"
    assert len(patterns.layer_subgraph(qm, 1)) > 20
