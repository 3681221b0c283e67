"""ptqc's passes: one file per pass, each readable top to bottom.

Every module in this package is imported by ``ptqc.pipeline.load_builtin_passes`` and
registers its pass with ``@register``; ``ptqc passes`` lists them.
"""
