"""Run-time LoRA on TensorRT / TensorRT-RTX: refit an engine built by ``sdrt build-engines --refit``.

TensorRT's ``Refitter`` (``set_named_weights`` + ``refit_cuda_engine``) swaps the weights of the ONNX
initializers the engine's refit plan lists (``sdrt_export.refit`` wrote it: the weight-map initializers,
each with its TensorRT weight name, shape, dtype and where its base bytes lie in the ONNX files).

Always from base + deltas, never deltas on deltas: ``refit(engine, changed)`` takes the full merged arrays
of the initializers one LoRA set changes (``sdrt.lora``'s numpy merge of base + deltas); every initializer
the previous set changed and this one does not goes back to its base bytes, memory-mapped from the ONNX
(checked against the manifest's sha256 first), so A -> B -> A gives A and ``refit(engine, {})`` the base
engine. Weights TensorRT wants refitted together with these (``get_missing_weights``) get their current
values. CUDA graphs captured before a refit are dropped (captured again on the next call).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.errors import ArtifactError, InputError
from sdrt.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class RefitPlan:
    """One engine's refit plan (``weights`` empty and ``fix`` set when the engine is not refittable)."""

    component: str
    backend: str
    manifest: Manifest  # its ONNX files hold the base bytes
    weights: dict = field(default_factory=dict)  # initializer -> {trt_name, shape, dtype, file, offset, params}
    not_refittable: dict = field(default_factory=dict)
    refittable: bool = False
    fix: str = ""  # the command that rebuilds the engines refittable

    @property
    def root(self) -> Path:
        return self.manifest.root


def rebuild_refittable(manifest: Manifest, backend: str) -> str:
    command = manifest.rebuild_command(backend)
    return command if command.endswith(" --refit") or " --refit " in command else command + " --refit"


def load_plan(manifest: Manifest, backend: str, component: str, record: dict) -> RefitPlan:
    """The plan of a verified engine record (its files, plan included, already match their sha256)."""
    plan = RefitPlan(component, backend, manifest, fix=rebuild_refittable(manifest, backend))
    if not record.get("refit"):
        return plan
    path = next((manifest.root / f["path"] for f in record["files"] if f["path"].endswith(".refit.json")), None)
    try:
        data = json.loads(path.read_text())
        plan.weights, plan.not_refittable = dict(data["weights"]), dict(data.get("not_refittable") or {})
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        raise ArtifactError(f"the {backend} {component} engine in {manifest.root} has no readable refit plan; "
                            f"rebuild with `{plan.fix}`") from None
    plan.refittable = True
    return plan


def check(plan: RefitPlan, names) -> None:
    """Raise ``InputError`` (one line, naming the fix) unless every initializer in ``names`` can be refitted."""
    names = sorted(names)
    if not names:
        return
    where = f"the {plan.backend} {plan.component} engine in {plan.root}"
    if not plan.refittable:
        raise InputError(f"{where} is not refittable, so run-time LoRA cannot change it; rebuild with "
                         f"`{plan.fix}` (or merge the LoRA at export: sdrt export --lora)")
    blocked = [n for n in names if n in plan.not_refittable]
    if blocked:
        raise InputError(f"{where} cannot refit {len(blocked)} weight(s) this LoRA changes, e.g. {blocked[0]} "
                         f"({plan.not_refittable[blocked[0]]}); merge the LoRA at export: sdrt export --lora")
    unknown = [n for n in names if n not in plan.weights]
    if unknown:
        raise InputError(f"{where}: {', '.join(unknown[:3])} are not weight-map initializers of {plan.component}")


class Refit:
    """The refit state of one engine: its ``Refitter`` and the initializers now away from base."""

    def __init__(self, engine, plan: RefitPlan):
        self.engine, self.plan = engine, plan
        self.current: dict[str, np.ndarray] = {}  # initializer -> the array it holds now (not base)
        self._given: dict | None = {}  # the caller's arrays of the last refit: the same again refit nothing
        self._refitter = None
        self._checked: set[str] = set()

    def refitter(self):
        if self._refitter is None:
            trt = self.engine.trt
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._refitter = trt.Refitter(self.engine.engine, self._logger)
        return self._refitter

    def base(self, name: str) -> np.ndarray:
        """The initializer's base array, memory-mapped from its ONNX file (checked once against its sha256)."""
        entry = self.plan.weights[name]
        if entry.get("file") is None or entry.get("offset") is None:
            raise ArtifactError(f"the refit plan of {self.plan.component} does not say where {name} lies; "
                                f"rebuild with `{self.plan.fix}`")
        manifest = self.plan.manifest  # the weight map names files relative to the ONNX file's folder
        record = next((r for r in manifest.component(self.plan.component)["files"]
                       if Path(r["path"]).name == entry["file"]), None)
        if record is None:
            raise ArtifactError(f"{name} lies in {entry['file']}, which is not a file of {self.plan.component}; "
                                f"rebuild with `{self.plan.fix}`")
        if record["path"] not in self._checked:
            manifest.check_file(record)
            self._checked.add(record["path"])
        return np.memmap(self.plan.root / record["path"], dtype=entry["dtype"], mode="r",
                         offset=int(entry["offset"]), shape=tuple(entry["shape"]))

    def _array(self, name: str, value) -> np.ndarray:
        entry = self.plan.weights[name]
        array = np.ascontiguousarray(np.asarray(value), dtype=entry["dtype"])
        if tuple(array.shape) != tuple(entry["shape"]):
            raise InputError(f"{self.plan.component}: {name} is {list(entry['shape'])} in the engine, the new "
                             f"weights are {list(array.shape)}")
        return array

    def apply(self, changed: dict) -> list[str]:
        """Refit so that ``changed`` (initializer -> full array) holds and every other weight is base;
        return the initializers set."""
        check(self.plan, changed)
        given = self._given
        if given is not None and changed.keys() == given.keys() and all(changed[k] is given[k] for k in changed):
            return []  # the set in use (the pipeline asks once per engine call)
        values = {name: self._array(name, value) for name, value in changed.items()}
        restore = [name for name in self.current if name not in values]
        if not values and not restore:
            return []
        wanted = {**{name: self.base(name) for name in restore}, **values}
        try:
            self._refit(wanted)
        except BaseException:  # the engine may hold any of these now: all go back to base on the next refit
            self._refitter = None  # and a fresh Refitter then: nothing half-set carries over
            self.current, self._given = {**self.current, **dict.fromkeys(wanted)}, None
            raise
        self.engine._drop_graphs()
        self.current, self._given = values, dict(changed)
        log.info("%s: refitted %d weight(s) (%d back to base)", self.plan.component, len(wanted), len(restore))
        return sorted(wanted)

    def _refit(self, wanted: dict) -> None:
        trt, refitter = self.engine.trt, self.refitter()
        held = []  # TensorRT reads host weights during refit_cuda_engine; keep them alive until then
        for name, array in wanted.items():
            held.append(array)
            if not refitter.set_named_weights(self.plan.weights[name]["trt_name"], trt.Weights(array)):
                raise ArtifactError(f"TensorRT refused new weights for {name} in {self.engine.path}; "
                                    f"rebuild with `{self.plan.fix}`")
        for trt_name in refitter.get_missing_weights():  # fused with what we set: give their current values
            name = next((n for n, e in self.plan.weights.items() if e["trt_name"] == trt_name), None)
            if name is None:
                raise ArtifactError(f"TensorRT wants {trt_name} refitted too, which the refit plan of "
                                    f"{self.plan.component} lacks; rebuild with `{self.plan.fix}`")
            array = self.current.get(name)
            held.append(self.base(name) if array is None else array)
            refitter.set_named_weights(trt_name, trt.Weights(np.ascontiguousarray(held[-1])))
        self.engine.cuda.synchronize()  # no call of this engine may run while its weights change
        if not refitter.refit_cuda_engine():
            raise ArtifactError(f"TensorRT could not refit {self.engine.path}; rebuild with `{self.plan.fix}`")
        del held


def refit(engine, changed: dict) -> list[str]:
    """Refit ``engine`` (a ``TensorRTEngine``) so ``changed`` holds and every other refittable weight is base."""
    state = getattr(engine, "_refit", None)
    if state is None:
        plan = getattr(engine, "refit_plan", None)
        if plan is None:
            raise InputError(f"{engine.path} has no refit plan; rebuild with `sdrt build-engines ... --refit`")
        state = engine._refit = Refit(engine, plan)
    return state.apply(changed)
