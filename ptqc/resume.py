"""Resumable compiles: per-layer checkpoints of the calibration loops, replayed after a crash.

Each calibration loop of a compile (:func:`ptqc.calib.calibrate`, numbered in the order the
passes run them) saves after every layer into ``.OUT.resume/`` beside the output::

    meta.json            ptqc version and the command's options (a resume must match them)
    c{n}-L{i}.stats.pt   loop n's observers of layer i, in the order ``apply`` used them
    c{n}-L{i}.acts.pt    the calibration activations after layer i (only the newest is kept)
    c{n}.done            loop n finished

``ptqc compile --resume`` runs the same command again. The passes run as before, but a
checkpointed layer skips its forwards: its observers are read back and ``apply`` runs on them
(the same arithmetic on the same inputs: the same result, byte for byte), and the loop goes on
from the newest saved activations. Every file is written to a temporary name and renamed, so a
kill leaves either the old or the new file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ptqc.errors import PtqcError


def checkpoint_dir(out) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.resume")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {old.get(k)!r}, now {new.get(k)!r}" for k in keys[:2])


class Checkpoints:
    """The checkpoint directory of one compile (see module doc). ``resume=False`` starts over."""

    def __init__(self, out, fingerprint: dict, resume: bool = False):
        self.dir = checkpoint_dir(out)
        self.loops = 0
        meta = self.dir / "meta.json"
        if resume and meta.is_file():
            old = json.loads(meta.read_text())
            if old != fingerprint:
                raise PtqcError(f"cannot resume {out}: its checkpoint was made with other settings "
                                f"({_differences(old, fingerprint)}); run without --resume to start over")
            self.resumed = True
            return
        self.resumed = False
        self.fingerprint = fingerprint
        shutil.rmtree(self.dir, ignore_errors=True)

    def _create(self) -> None:
        """The directory and its meta.json, made with the first checkpoint."""
        meta = self.dir / "meta.json"
        if not meta.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_name("meta.json.part")
            tmp.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
            os.replace(tmp, meta)

    def _path(self, loop: int, layer: int, kind: str) -> Path:
        return self.dir / f"c{loop}-L{layer}.{kind}.pt"

    def next_loop(self) -> int:
        self.loops += 1
        return self.loops - 1

    def resume_point(self, loop: int, layers: int) -> int:
        """How many leading layers of loop ``loop`` are checkpointed (replayed, not recomputed)."""
        if (self.dir / f"c{loop}.done").exists():
            return layers
        done = 0
        for i in range(layers):
            if not self._path(loop, i, "stats").exists():
                break
            if self._path(loop, i, "acts").exists():
                done = i + 1
        return done

    def save_layer(self, loop: int, layer: int, stats: list, state: list) -> None:
        """``stats``: [(node names of a stage, {node name: {observer name: observer}})] in apply order;
        ``state``: the activations after the layer. The older activations are removed."""
        self._create()
        _atomic_save([(names, {n.name: {k: vars(o) for k, o in named.items()} for n, named in obs.items()})
                      for names, obs in stats], self._path(loop, layer, "stats"))
        _atomic_save(list(state), self._path(loop, layer, "acts"))  # spilled batches read (mapped) one by one
        if layer > 0:
            self._path(loop, layer - 1, "acts").unlink(missing_ok=True)

    def stats(self, loop: int, layer: int) -> list:
        return torch.load(self._path(loop, layer, "stats"), weights_only=False)

    def acts(self, loop: int, layer: int) -> list:
        return torch.load(self._path(loop, layer, "acts"), mmap=True, weights_only=False)

    def loop_done(self, loop: int, layers: int) -> None:
        self._create()
        (self.dir / f"c{loop}.done").touch()
        self._path(loop, layers - 1, "acts").unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def restore(stage: dict, saved: dict) -> None:
    """Put saved observer states back into the live observers of ``stage`` (in place: a pass may
    hold them elsewhere too)."""
    for node, named in stage.items():
        for k, o in named.items():
            vars(o).update(saved[node.name][k])


def fingerprint(model, passes, **settings) -> dict:
    """What a resumed compile must share with the killed one: ptqc and torch versions, the model,
    the full pipeline with every option, and ``settings`` (dtype, device, calibration ...)."""
    from ptqc import __version__

    return json.loads(json.dumps({"ptqc_version": __version__, "torch_version": torch.__version__,
                                  "model": str(Path(model).resolve()), "passes": [repr(p) for p in passes],
                                  **settings}, default=str))
