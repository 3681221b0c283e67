"""The compressed-tensors exporter as the core sees it (:mod:`ptqc.backends`, entry point
``compressed-tensors``): ``ptqc export --format compressed-tensors``, ``check-export`` and reading an
export back (``ptqc eval`` / ``diff`` / ``inspect`` of its directory)."""
from __future__ import annotations

from ptqc.backends import Backend, check_written
from ptqc.lowering import compressed_tensors as exporter


class CompressedTensorsBackend(Backend):
    name = "compressed-tensors"
    title = "compressed-tensors"
    formats = ("compressed-tensors",)
    export_missing = "config.json has no compressed-tensors quantization_config"

    def export(self, qm, out, fmt, *, force, **options):
        res = exporter.export(qm, out, force=force)
        check_written(self, out)
        return res, f"{out} ({fmt}, {res['format']}, {res['quantized_linears']} quantized linears, " \
                    f"{res['tensors']} tensors, checked)"

    def is_export(self, path):
        return exporter.is_export(path)

    def check(self, path, trust_remote_code=False):
        return exporter.check(path, trust_remote_code)

    def load(self, path, dtype, trust_remote_code=False):
        return exporter.load(path, dtype, trust_remote_code)


BACKEND = CompressedTensorsBackend()
