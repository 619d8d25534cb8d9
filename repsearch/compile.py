"""``train.compile``: the training forward through ``torch.compile``, rebuilt after every structure
change (issue 16, "GPU speed options"; DESIGN.md "Recipes and overrides — contract", ``train.compile``).

The Trainer keeps ``self.model``, the raw training-time module, for everything but the training
forward: method hooks (saliency, probes, surgery), checkpoints, deploy and evaluation. Evaluation
stays eager, so the compiled graph never sees a train/eval flip. Only the training step's
``logits = model(images)`` goes through :class:`CompiledForward`; the loss (``Method.loss``), the
backward hooks (``Method.after_backward`` reads ``p.grad``), clipping and the optimizer stay eager.

What forces a recompile after Rep/Dep/re-expansion: dynamo keeps its compiled graphs on the CODE
object of the frame it traced, each guarded by what it was traced for. ``torch.compile(module)``
traces a code object shared by every wrapper of the module (its class's ``forward``, or torch's own
wrapper for a torch.nn class): a fresh wrapper of the changed module does not reuse a stale graph
(its guards fail on the changed submodules) but the stale entries stay and count towards
``torch._dynamo.config.recompile_limit`` (8): after 8 structure changes dynamo silently runs the
forward eagerly. So every build compiles a NEW function object with its OWN code object
(``code.replace()``) that calls the module (dynamo inlines the module's forward into it): a build
starts with no cache entry, and nothing global is reset (no ``torch._dynamo.reset()``, other
compiled models keep their graphs). The old build's cache entries are cleared explicitly
(``torch._dynamo.eval_frame.reset_code`` on its own code object only): they form a reference cycle
through the code object's extra slot (graph → AOT lazy-backward info → TracingContext → code) that
the garbage collector cannot see, so without it every build's graphs would stay in memory. A graph break inside
the module would put entries on the module's own ``forward`` code again (the repsearch models have
none: one graph per build, ``tests/test_compile.py``).

A 0-dim buffer written in place (RepAn's attach rate λ, ``RepBlock.set_attach_rate``: ``fill_``) is a
graph input, not a constant: changing it never recompiles (``tests/test_compile.py``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

#: The values of ``train.compile``: ``off`` (eager) or a ``torch.compile`` mode (inductor).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (``torch._dynamo.utils.counters["stats"]
    ["unique_graphs"]``, a torch 2.x counter, checked on 2.14; a python int, no device sync). Every trace
    that reaches the backend counts one: a build, a recompile after a guard failure, each piece of a
    graph break."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def fresh_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A new function ``x -> module(x)`` with its own code object (``__code__.replace()``), so that
    dynamo's cache entries of a compile of it belong to it alone and are freed with it."""

    def training_forward(x: torch.Tensor) -> torch.Tensor:
        return module(x)

    training_forward.__code__ = training_forward.__code__.replace()
    return training_forward


def drop_compiled(code) -> bool:
    """Clear dynamo's cache entries (compiled graphs) of ONE code object, breaking the reference
    cycle that keeps them alive (see the module docstring). Returns False when this torch lacks the
    private ``torch._dynamo.eval_frame.reset_code`` (then the graphs stay until the process ends)."""
    try:
        from torch._dynamo.eval_frame import reset_code
    except ImportError:  # pragma: no cover - a private API that moved
        return False
    reset_code(code)
    return True


class CompiledForward:
    """The training forward of ``module``: ``module(x)`` when ``mode`` is ``off``, else through a
    ``torch.compile`` wrapper (:func:`fresh_forward` of ``module``, ``mode=mode``) built at the first call after construction or
    :meth:`rebuild`.

    Args:
        module: the raw training-time module (kept by the caller for everything but the training
            forward); the wrapper shares its parameters and buffers.
        mode: one of :data:`COMPILE_MODES`. ``default``, ``reduce-overhead`` (CUDA graphs on CUDA,
            plain inductor on CPU), ``max-autotune`` are ``torch.compile`` modes (inductor backend).
        device: the device of the training steps (``torch.cuda.synchronize`` ends the timed first
            step on CUDA).

    Call protocol (the Trainer's step): ``logits = compiled(images)`` once per step, then
    :meth:`step_done` after the optimizer step. A step starting a build is timed from the build to
    :meth:`step_done` (wall seconds; one device sync on CUDA for that step only, none in other
    steps): compile time plus one step, since inductor compiles the forward at the call and the
    backward at the first backward.

    Attributes:
        builds: wrappers built so far (``compile_count``).
        seconds: wall seconds of the first steps after builds, summed (``compile_s``).
        recompiles: graphs dynamo compiled in other steps (guard failures: a new input shape, dtype
            or memory format, autocast switched on or off between epochs) (``compile_recompiles``).
        graphs: every graph dynamo compiled in the training forwards (builds and recompiles; a graph
            break adds one per piece).

    Raises:
        ValueError: ``mode`` is not one of :data:`COMPILE_MODES`.
    """

    def __init__(self, module: nn.Module, mode: str = "off", device: Union[str, torch.device] = "cpu"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
        self.module = module
        self.mode = mode
        self.device = torch.device(device)
        self.enabled = mode != "off"
        self.builds = 0
        self.seconds = 0.0
        self.recompiles = 0
        self.graphs = 0
        self._backend: Union[str, Callable] = "inductor"  # tests: "aot_eager" or a counting backend
        self._wrapper: Optional[Callable] = None
        self._code = None  # the code object of the current build's function
        self._t0: Optional[float] = None  # perf_counter at the build; None outside a first step

    def _build(self) -> None:
        kwargs: dict[str, Any] = {"backend": self._backend}
        if self._backend == "inductor" and self.mode != "default":
            kwargs["mode"] = self.mode
        self._t0 = time.perf_counter()
        fn = fresh_forward(self.module)
        self._code = fn.__code__
        self._wrapper = torch.compile(fn, **kwargs)
        self.builds += 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images -> ``(B, classes)`` logits of the module in its current mode."""
        if not self.enabled:
            return self.module(x)
        if self._wrapper is None:
            self._build()
        if self.mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new training iteration for CUDA graph trees
        before = dynamo_graphs()
        out = self._wrapper(x)
        new = dynamo_graphs() - before
        self.graphs += new
        if self._t0 is None:
            self.recompiles += new
        return out

    def step_done(self) -> None:
        """End of a training step (after the optimizer step): closes the timing of a first step
        after a build (synchronising the device on CUDA); nothing otherwise."""
        if self._t0 is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0
        self._t0 = None

    def rebuild(self) -> None:
        """After a structure change (and at the Trainer's construction): drop the wrapper and clear
        its compiled graphs (:func:`drop_compiled`); the next call builds a fresh one and compiles
        the new structure. No-op when compile is off."""
        if self._code is not None:
            drop_compiled(self._code)
        self._wrapper = None
        self._code = None
        self._t0 = None

    def measures(self) -> dict[str, float]:
        """``compile_count``, ``compile_s``, ``compile_recompiles`` (cumulative) when compile is on;
        ``{}`` when off (eager runs log none of them)."""
        if not self.enabled:
            return {}
        return {"compile_count": float(self.builds), "compile_s": self.seconds, "compile_recompiles": float(self.recompiles)}

    def restore(self, measures: dict) -> None:
        """Continue the counters from a checkpoint's last epoch measures (resume): the resumed run's
        own first build then adds one."""
        self.builds = int(measures.get("compile_count", 0))
        self.seconds = float(measures.get("compile_s", 0.0))
        self.recompiles = int(measures.get("compile_recompiles", 0))
