"""Small helpers shared by the Ascend lowering tests."""
from ptqc import pipeline


def run(qm, text, calib=None):
    """Run a pipeline (``"int8,ascend:fuse=false"``) on ``qm`` in place; returns the pass records."""
    return pipeline.PassManager(pipeline.parse_pipeline(text)).run(qm, pipeline.PassContext(quiet=True, calib=calib))


def rel(a, b):
    """Relative L2 error of ``a`` against the reference ``b``."""
    return ((a - b).norm() / b.norm()).item()


def targets(qm):
    """The call targets of the graph, in order."""
    return [n.target for n in qm.graph.nodes if n.op == "call_function"]
