"""The PyTorch adapter: records the exact dropout masks an ``nn.Module`` applies.

How it works: while a sampled step runs, dropspy's own kernels for ``aten::dropout`` and
``aten::feature_dropout`` (``kernels``) do ATen's arithmetic and keep the mask they draw; the
capture (``capture``) reads the Python stack once per dropout call to name the module and the
use; a function mode is on the stack only from a hand-made ``bernoulli_`` mask to the end of
that forward, to follow the mask to the multiply that applies it. Hooks sit only on the
recorded model (the step clock), user dropout modules and stacked RNNs. ``torch.compile``d
models are recorded by a post-grad pass instead (``compiled``).

Why this module is over 600 lines: it is the one lifecycle of a torch recording (attach and
detach, the three step clocks, eval forwards held until a step ends, GradScaler-skipped steps,
the refusals), each a few methods of :class:`TorchAdapter` that share its state; what can
stand alone (capture, kernels, sites, packing, distributed, compiled) already does.

Steps: one optimizer step (global optimizer step hook) of the first optimizer that steps the
recorded module's parameters; with no optimizer in sight, one top-level training-mode
forward; or explicit ``Recording.mark_step()``. Records are handed to the session once per
step, bit-packed.

What is not observed, and why (each is said to the user, never guessed):

- cuDNN's between-layer RNN dropout and fused attention kernels (flash / memory-efficient
  SDPA) draw their masks inside the kernel: opaque sites with the reason.
  ``DROPSPY_TORCH_CUDNN_RNN=exact`` runs those RNNs without cuDNN, announced as a perturbation.
- Random draws that are not Bernoulli masks (``torch.rand_like(x) < p``) inside a
  dropout-looking module: an opaque "untracked" site and a note.
- Data parallel: a ``DistributedDataParallel`` (or single-device ``DataParallel``) wrapper is
  recorded through the module it wraps, in every rank, each rank into its own file
  (``distributed.py``). Refused by name: ``DataParallel`` over several devices, the legacy
  ``FullyShardedDataParallel`` wrapper, TorchScript modules, forwards on a thread other than
  the one that entered ``record()``.

A step that ``GradScaler`` skips (inf/NaN gradients) calls no ``optimizer.step()``; its
``update()`` still ends the iteration, so a skipped iteration is still one step.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from dropspy.errors import RecordingError, UnsupportedModelError
from dropspy.frameworks.base import Session
from dropspy.frameworks.torch import kernels
from dropspy.frameworks.torch.capture import (
    Capture,
    Entry,
    Frame,
    FunctionMode,
    looks_like_dropout,
)
from dropspy.frameworks.torch.compiled import CompiledRecording, compiled_target
from dropspy.frameworks.torch.distributed import dist_meta, named_modules, unwrap
from dropspy.frameworks.torch.pack import DeviceCopy, pack_host
from dropspy.frameworks.torch.sites import SiteFacts, SiteKey, SiteRegistry
from dropspy.records import Record

__all__ = ["TorchAdapter"]

# Under the "auto" clock, forwards are held until an optimizer steps (they all belong to its
# step: gradient accumulation) or until this many pass without one (then each is a step).
AUTO_MAX_FORWARDS = 16
AUTO_MAX_BYTES = 64 << 20
# A CPU step's masks up to this many bytes go to the writer thread as the noise torch drew
# (packed there); a bigger step is packed here, so the queue never holds much unpacked noise.
HANDOFF_BYTES = 16 << 20
_NUMPY_DTYPES = (torch.bool, torch.float16, torch.float32, torch.float64)  # not bfloat16
# Eval forwards without masks do not end a step; past this many held records they do, so a
# long inference loop does not hold its not-applied records until the recording ends.
EVAL_MAX_ENTRIES = 10_000

class TorchAdapter:
    """Records the dropout masks of a ``torch.nn.Module``.

    Args:
        model: The module to record, or its DistributedDataParallel wrapper.
        cudnn_rnn: ``"opaque"`` (default) reports cuDNN's between-layer RNN dropout as an
            opaque site; ``"exact"`` runs those RNN calls without cuDNN so their masks are
            recorded, which changes the random stream (announced as a perturbation). None
            reads ``DROPSPY_TORCH_CUDNN_RNN`` (default ``"opaque"``).

    Raises:
        UnsupportedModelError: The model is wrapped in a multi-device ``DataParallel`` or
            the legacy ``FullyShardedDataParallel``.
    """

    framework = "torch"
    session: Session  # set by attach()

    @classmethod
    def claims(cls, model: Any) -> bool:
        """Whether ``model`` is a ``torch.nn.Module`` (and not a Keras layer: under Keras 3's
        torch backend every Keras layer is a Module too, recorded by the Keras adapter)."""
        if not isinstance(model, torch.nn.Module):
            return False
        keras = sys.modules.get("keras")
        layer = getattr(getattr(keras, "layers", None), "Layer", None)
        return not (isinstance(layer, type) and isinstance(model, layer))

    def __init__(self, model: torch.nn.Module, *, cudnn_rnn: str | None = None) -> None:
        if cudnn_rnn is None:
            # record() has no adapter options; the opt-in travels by environment variable.
            cudnn_rnn = os.environ.get("DROPSPY_TORCH_CUDNN_RNN", "opaque")
        if cudnn_rnn not in ("opaque", "exact"):
            raise ValueError(f"Invalid value received for argument `cudnn_rnn` (or "
                             f"DROPSPY_TORCH_CUDNN_RNN). Expected 'opaque' or 'exact'. "
                             f"Received: cudnn_rnn={cudnn_rnn!r}")
        #: What the user handed to record() (a DDP wrapper, say); ``model`` is what runs.
        self.wrapper = model
        model, self.wrapped_by = unwrap(model)
        #: The model's compile (torch.compile / module.compile()), None when eager.
        self.compiled = compiled_target(model)
        if self.compiled is not None:
            model, inner_wrapper = unwrap(self.compiled.inner)
            self.wrapped_by = self.wrapped_by or inner_wrapper or self.compiled.kind
        _refuse_wrappers(model)
        self.model = model
        self._compiled_rec: CompiledRecording | None = None
        self.cudnn_rnn = cudnn_rnn
        self._capture: Capture | None = None
        self._mode: FunctionMode | None = None
        self._installed = False
        self._handles: list[Any] = []
        self._attached = False
        self._detached = False
        self._thread = threading.get_ident()
        self._step = 0
        self._clock = "auto"
        self._eval_skipped: bool | None = None  # capturing, set aside for an eval forward
        self._clock_optimizer: weakref.ref | None = None
        self._stepped = False  # the clock optimizer stepped since the last GradScaler.update
        self._noted_skip = False
        self._held: list[list[Entry]] = []
        self._held_bytes = 0
        # A GPU step's masks on their way to the host: (copy, records, masked records, step).
        self._inflight: tuple[DeviceCopy, list[Record], list[Record], int] | None = None
        # The wrapper's too: legacy FSDP steps flat parameters the inner module does not list.
        self._params: set[int] = {id(p) for p in itertools.chain(model.parameters(),
                                                                 self.wrapper.parameters())}

    @property
    def _cap(self) -> Capture:
        """The capture; hooks and the step clock run only while attached, when it is set."""
        cap = self._capture
        assert cap is not None, "TorchAdapter used before attach()"
        return cap

    # -- the Adapter contract ----------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """Framework facts for the run file's root attributes."""
        devices = sorted({str(t.device) for t in itertools.chain(self.model.parameters(),
                                                                 self.model.buffers())})
        devices = devices or ["cpu"]
        kinds = {d.split(":")[0] for d in devices}
        backend = "cuda" if "cuda" in kinds else sorted(kinds)[0]
        meta: dict[str, Any] = {
            "framework": "torch",
            # TorchVersion is a str subclass, which h5py cannot store as an attribute.
            "framework_version": str(torch.__version__),
            "backend": backend,
            "devices": devices,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        }
        meta.update(dist_meta())
        if self.wrapped_by is not None:
            meta["wrapper"] = self.wrapped_by
        if backend == "cuda":
            meta["cudnn_enabled"] = torch.backends.cudnn.enabled
            meta["cudnn_version"] = torch.backends.cudnn.version() or 0
        return meta

    def attach(self, session: Session) -> None:
        """Find sites, install the kernels, the few module hooks and the step hook."""
        if self._attached:
            raise RecordingError("This TorchAdapter is already attached; create a new one.")
        self._attached = True
        self.session = session
        model = self.model
        named = list(named_modules(model))
        registry = SiteRegistry(self.session.declare_site, [n for n, _ in named],
                                _layout3(model))
        self._capture = capture = Capture(registry, self.session.note, model, self.cudnn_rnn,
                                          self.session.count_dropped)
        capture.thread = self._thread
        capture.capturing = self.session.want_step(self._step)
        self._mode = capture.mode = FunctionMode(capture)
        try:
            if self.compiled is not None:
                # No hook inside a compiled model and no eager kernel (Dynamo would trace
                # them into its graphs): the swapped-in compiled call runs the model's
                # forward hooks around it instead, and the compiled pass taps the masks.
                self._compiled_rec = CompiledRecording(self, self.compiled)
                self._compiled_rec.attach()
            else:
                _say_fast_path(model, self.session.note)
                # The model itself: a step clock (forward begin and end), never a fast path's
                # business unless the model is one TransformerEncoderLayer (said above). Its
                # pre-hook runs first and its post-hook last (hooks run in registration order).
                self._handles.append(model.register_forward_pre_hook(self._root_pre_hook))
            for name, module in named:
                if self.compiled is not None:
                    break
                if not _hooked(module, self.cudnn_rnn):
                    continue
                self._handles.append(module.register_forward_pre_hook(
                    self._pre_hook(name, module)))
                self._handles.append(module.register_forward_hook(self._post_hook(name),
                                                                  always_call=True))
            if self.compiled is None:
                self._handles.append(model.register_forward_hook(self._root_post_hook,
                                                                 always_call=True))
            self._declare_static_sites(model, registry)
            self._handles.append(register_optimizer_step_post_hook(
                self._on_optimizer_step))
            self._handles.append(_ScalerWatch.add(self))
            if self.compiled is None:
                kernels.install(capture)
                self._installed = True
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook, kernel and the mode, and hand over what is left. Idempotent."""
        if self._detached:
            return
        self._detached = True
        try:
            if self._compiled_rec is not None:
                self._compiled_rec.detach()
            self._remove_mode()
            if self._installed and self._capture is not None:
                kernels.uninstall(self._capture)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            if self._capture is not None:
                self._capture.stack.clear()
                self._capture.taint.clear()
                try:
                    self._flush_all_at_exit()
                    self._note_unseen_modules()
                except Exception as exc:  # never into the user's with-statement
                    self._capture.failed("handing over the last records", exc)

    def _note_unseen_modules(self) -> None:
        """Name the dropout modules that got no site (never called in a sampled step).

        Their mask's rank, hence its axes, is only known at a call, so they are declared at
        their first sampled call; a run that samples nothing must still say they exist.
        """
        infos = self._cap.sites.infos.values()
        seen = {info.layer for info in infos}
        # A dropout module of an attention layer whose probabilities' dropout ran elsewhere
        # (transformers' eager and sdpa paths pass its p on) is not unseen.
        attention = {info.layer for info in infos if info.role == "attention"}
        unseen = [name for name, m in named_modules(self.model)
                  if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
                  and name not in seen and name.rpartition(".")[0] not in attention]
        if unseen:
            self.session.note(
                f"{len(unseen)} dropout module(s) applied no recorded mask while recording "
                f"(not called in a sampled training step), so they have no site in this file: "
                f"{', '.join(unseen)}")

    def enter_forward(self) -> None:
        """Treat what runs until :meth:`exit_forward` as one forward of the model.

        For loops that call the model's submodules without calling the model itself, e.g. a
        LightningModule whose ``training_step`` calls ``self.encoder(x)``: the Lightning
        integration opens one around each batch. Calls of the model inside nest in it.
        """
        if self._capture is not None and not self._detached:
            self._root_pre_hook(self.model, ())

    def exit_forward(self) -> None:
        """End what :meth:`enter_forward` began."""
        if self._capture is not None and not self._detached:
            self._root_post_hook(self.model, (), None)

    def mark_step(self, step: int | None = None) -> None:
        """End the current step here; the next records belong to ``step`` (default: next).

        Once called, optimizer steps and forwards no longer advance the step.
        """
        cap = self._capture
        if cap is None or self._detached:
            raise RecordingError("mark_step() called on a recording that is not running")
        if self._clock != "manual":
            # getattr: a session made outside the recorder (tests, tools) may not carry it.
            self.session.note(getattr(self.session, "step_clock", None)
                              or "steps are marked explicitly with mark_step()")
            self._clock = "manual"
        entries = [e for group in self._held for e in group] + cap.entries
        self._held, self._held_bytes, cap.entries = [], 0, []
        self._flush(self._step, entries)
        cap.step_done()
        self._step = self._step + 1 if step is None else int(step)
        cap.capturing = self.session.want_step(self._step)

    # -- module hooks ------------------------------------------------------------------------

    def _root_pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        cap = self._cap
        cap.depth += 1
        if cap.depth == 1:
            try:
                self._begin_forward()
            except RecordingError:
                raise  # a refusal by name (another thread), not a failure of dropspy's
            except Exception as exc:  # never into the user's forward
                cap.failed("starting a forward", exc)
            if not module.training and not self.session.record_eval:
                # An evaluation forward, not asked for (the integrations' evaluate=False):
                # nothing of it is captured; the sampling state comes back when it ends.
                self._eval_skipped = cap.capturing
                cap.capturing = False

    def _root_post_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        cap = self._cap
        if cap.depth <= 0:
            return
        cap.depth -= 1
        if cap.depth == 0:
            if self._eval_skipped is not None:
                cap.capturing, self._eval_skipped = self._eval_skipped, None
            try:
                self._pop_mode()
                cap.forward_done()
                self._end_forward(module)
            except Exception as exc:  # never into the user's forward
                cap.failed("ending a forward", exc)

    def _pre_hook(self, path: str, module: torch.nn.Module | None = None) -> Callable:
        cudnn_off = self.cudnn_rnn == "exact"
        target = module if module is not None else self.model.get_submodule(path)
        leaf = looks_like_dropout(target) and next(target.children(), None) is None

        def hook(module: torch.nn.Module, args: Any) -> None:
            cap = self._cap
            if not cap.capturing and not cudnn_off:
                return  # a step nobody samples: no frame (its post-hook finds none)
            try:
                frame = Frame(path, module)
                cap.stack.append(frame)
                if cudnn_off and isinstance(module, torch.nn.RNNBase):
                    frame.cudnn = torch.backends.cudnn.flags(enabled=False)
                    frame.cudnn.__enter__()
                mode = cap.mode
                if mode is None:
                    return
                if leaf and path not in cap.probed and module.training and cap.active():
                    # The first sampled call of a leaf dropout-looking module runs under the
                    # mode, which sees a random draw made through a name the wrappers miss
                    # (``from torch import rand_like``); later calls run without it.
                    cap.probed.add(path)
                    cap.push_mode()
                    frame.probe = True
                    mode.probing += 1
                elif cap.mode_pushed and not cap.taint and not mode.probing:
                    # Every hand-made mask met its multiplication before this call: nothing
                    # left to follow (AWD's embedded_dropout, drawn in the model's forward).
                    self._pop_mode()
            except Exception as exc:
                cap.failed(f"the pre-hook of {path}", exc, path)
        return hook

    def _post_hook(self, path: str) -> Callable:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            cap = self._cap
            if not cap.stack or cap.stack[-1].module is not module:
                return
            frame = cap.stack.pop()
            try:
                if frame.cudnn is not None:
                    frame.cudnn.__exit__(None, None, None)
                if isinstance(module, torch.nn.RNNBase):
                    cap.rnn_done(frame, output)
                else:
                    cap.end_module(frame)
                mode = cap.mode
                if frame.probe and mode is not None:
                    mode.probing -= 1
                if cap.mode_pushed and not cap.taint and not (mode and mode.probing):
                    # Every hand-made mask met its multiplication: the mode has nothing left
                    # to follow, and every torch call under it pays a Python round trip.
                    self._pop_mode()
            except Exception as exc:
                cap.failed(f"the post-hook of {path}", exc, path)
        return hook

    def _begin_forward(self) -> None:
        if threading.get_ident() != self._thread:
            self._cap.depth -= 1
            raise RecordingError(
                f"dropspy records the thread that entered record() (thread "
                f"{self._thread}); this forward runs on thread {threading.get_ident()}. "
                f"Enter record() on the thread that trains.")
        cap = self._cap
        if torch._C._current_graph_task_id() != -1:
            # Activation checkpointing re-runs forward during backward with the RNG state
            # restored: the same masks again, already recorded in the forward.
            cap.note_once("checkpoint", "activation checkpointing re-runs forward during "
                          "backward with the same masks; the re-runs are not recorded again")
            return
        if self._clock == "forward":
            cap.capturing = self.session.want_step(self._step)

    def _end_forward(self, module: torch.nn.Module) -> None:
        cap = self._cap
        if torch._C._current_graph_task_id() != -1:
            return  # a checkpoint re-run during backward, not a forward of the training loop
        if not (module.training or cap.applied_in_group or (
                self._clock in ("forward", "auto") and len(cap.entries) >= EVAL_MAX_ENTRIES)):
            return  # eval forwards without masks join the next step's records
        cap.applied_in_group = False
        if self._clock == "forward":
            entries, cap.entries = cap.entries, []
            self._flush(self._step, entries)
            cap.step_done()
            self._step += 1
        elif self._clock == "auto":
            group, cap.entries = cap.entries, []
            self._held.append(group)
            self._held_bytes += sum(e.noise.numel() for e in group if e.noise is not None)
            if len(self._held) >= AUTO_MAX_FORWARDS or self._held_bytes >= AUTO_MAX_BYTES:
                self._use_forward_clock()

    def _use_forward_clock(self) -> None:
        self.session.note(f"no optimizer step seen after {len(self._held)} training forwards: "
                          f"one step is one top-level training forward of the module")
        self._clock = "forward"
        held, self._held, self._held_bytes = self._held, [], 0
        for group in held:
            self._flush(self._step, group)
            self._step += 1
        self._cap.step_done()
        self._cap.capturing = self.session.want_step(self._step)

    # -- optimizer steps ---------------------------------------------------------------------

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self._optimizer_stepped(optimizer)
        except Exception as exc:  # never into the user's optimizer.step()
            self._cap.failed("ending a step", exc)

    def _optimizer_stepped(self, optimizer: torch.optim.Optimizer) -> None:
        if self._clock == "manual" or self._detached:
            return
        if self._clock_optimizer is None:
            if self._params and not any(id(p) in self._params for group in
                                        optimizer.param_groups for p in group["params"]):
                return  # another model's optimizer (a GAN's other half)
            self._clock_optimizer = weakref.ref(optimizer)
        elif self._clock_optimizer() is not optimizer:
            return
        if self._clock != "optimizer":
            if self._clock == "forward":
                self.session.note("an optimizer stepped after forwards were counted as steps: "
                                  "from here on one step is one optimizer step")
            self._clock = "optimizer"
        self._stepped = True
        self._end_optimizer_step()

    def _end_optimizer_step(self) -> None:
        cap = self._cap
        entries = [e for group in self._held for e in group] + cap.entries
        self._held, self._held_bytes, cap.entries = [], 0, []
        cap.applied_in_group = False
        self._flush(self._step, entries)
        cap.step_done()
        self._step += 1
        cap.capturing = self.session.want_step(self._step)

    def _on_scaler_update(self) -> None:
        """``GradScaler.update()`` ends every AMP iteration, also one whose step it skipped."""
        stepped, self._stepped = self._stepped, False
        if stepped or self._clock in ("manual", "forward") or self._detached:
            return
        if not (self._cap.entries or self._held):
            return
        if not self._noted_skip:
            self._noted_skip = True
            self.session.note("GradScaler skipped optimizer step(s) (inf/NaN gradients); each "
                              "skipped iteration is still one step")
        self._clock = "optimizer"
        self._end_optimizer_step()

    # -- handing records over ----------------------------------------------------------------

    def _flush(self, step: int, entries: list[Entry]) -> None:
        """Turn one step's entries into records: name sites, number calls, pack masks."""
        self._collect_inflight()
        if not entries or not self.session.want_step(step):
            return
        sites = self._cap.sites
        records: list[Record] = []
        masked: list[tuple[Record, torch.Tensor]] = []
        calls: dict[str, int] = {}
        filtered = 0
        for e in entries:
            name = sites.resolve(e.key, len(e.shape))
            if name is None:
                filtered += 1
                continue
            call = calls.get(name, 0)
            calls[name] = call + 1
            rec = Record(name, step, call, bool(e.training), tuple(map(int, e.shape)),
                         rate=e.rate)
            records.append(rec)
            if e.noise is not None and e.noise_shape is not None:
                rec.noise_shape = tuple(map(int, e.noise_shape))
                masked.append((rec, e.noise))
        if filtered:
            self.session.count_dropped("site_filter", filtered)
        on_gpu = [m for _, m in masked if m.is_cuda]
        if on_gpu and len(on_gpu) == len(masked):
            self._inflight = (DeviceCopy([m for _, m in masked]), records,
                              [r for r, _ in masked], step)
            return
        unpacked = sum(m.numel() * m.element_size() for _, m in masked if m.dtype != torch.uint8)
        for rec, mask in masked:
            if mask.device.type != "cpu" or mask.requires_grad:
                mask = mask.detach().cpu()
            if mask.dtype in _NUMPY_DTYPES and unpacked <= HANDOFF_BYTES:
                # The writer thread compares and packs (numpy releases the GIL there): the
                # training thread hands over the noise it already holds, no copy.
                rec.noise = mask.numpy()
            else:
                rec.packed = pack_host(mask)
        self.session.submit(step, records)

    def _collect_inflight(self) -> None:
        if self._inflight is None:
            return
        copy, records, masked, step = self._inflight
        self._inflight = None
        for rec, packed in zip(masked, copy.result()):
            rec.packed = packed
        self.session.submit(step, records)

    def _flush_all_at_exit(self) -> None:
        cap = self._cap
        if self._clock == "auto" and self._held:
            self._clock = "forward"
            held, self._held = self._held, []
            for group in held:
                self._flush(self._step, group)
                self._step += 1
        entries = [e for group in self._held for e in group] + cap.entries
        self._held, cap.entries = [], []
        self._flush(self._step, entries)
        self._collect_inflight()

    # -- setup helpers -----------------------------------------------------------------------

    def _declare_static_sites(self, model: torch.nn.Module, registry: SiteRegistry) -> None:
        """Declare what is known before any forward: RNN between-layer sites, cuDNN opacity."""
        for name, module in named_modules(model):
            if not isinstance(module, torch.nn.RNNBase) or not module.dropout:
                continue
            on_cuda = any(p.is_cuda for p in module.parameters())
            cudnn = on_cuda and torch.backends.cudnn.enabled
            opaque = None
            if cudnn and module.num_layers > 1:
                if self.cudnn_rnn == "exact":
                    self.session.warn_perturbation(
                        f"{name or type(module).__name__}: runs without cuDNN so its between-"
                        f"layer dropout masks can be recorded; this changes the random stream "
                        f"and the kernels (cuDNN keeps its own dropout state)")
                else:
                    opaque = ("cuDNN applies the between-layer dropout inside its fused RNN "
                              "kernel with its own random state; the mask cannot be observed")
            gaps = max(module.num_layers - 1, 1)
            for g in range(gaps):
                kind = "between_layers" if gaps == 1 else f"between_layers/{g}"
                key = SiteKey(name, kind, None)
                extra: dict[str, Any] = {"after_layer": g, "num_layers": module.num_layers}
                if module.num_layers == 1:
                    extra["never_applied"] = ("num_layers=1: torch applies RNN dropout only "
                                              "between stacked layers")
                p = float(module.dropout)
                registry.learn(key, functools.partial(
                    SiteFacts, layer_class=type(module).__name__, role="between_layers", rate=p,
                    scale=1.0 / (1.0 - p) if p < 1 else None, opaque=opaque, extra=extra))
                if opaque is not None:
                    # No call will ever produce a record here: declare it now. Observable
                    # sites are declared at first use, so their first layout (padded or
                    # packed) gets the plain name.
                    registry.resolve(key, 3)

    def _remove_mode(self) -> None:
        mode = self._mode
        if mode is None:
            return
        mode.dead = True  # a mode left on another thread's stack passes everything through
        self._pop_mode()
        self._mode = None

    def _pop_mode(self) -> None:
        """Take our mode off this thread's stack, leaving any other mode where it is."""
        mode = self._mode
        if mode is None or threading.get_ident() != self._thread:
            return
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is mode:
            torch._C._pop_torch_function_stack()  # the usual case: ours is on top
            self._mark_popped()
            return
        stack = [torch._C._get_function_stack_at(i) for i in range(depth)]
        if not any(m is mode for m in stack):
            # Not pushed, or taken off for the moment because this runs inside the mode's
            # own call (a module called from a torch function): torch puts it back.
            if not mode.inside:
                self._mark_popped()
            return
        self._mark_popped()
        # Pop down to our mode and put back any mode pushed after it (a forward that left a
        # mode behind, e.g. it raised inside someone's mode context).
        above = []
        while True:
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
        for other in reversed(above):
            torch._C._push_on_torch_function_stack(other)


    def _mark_popped(self) -> None:
        if self._capture is not None:
            self._capture.mode_pushed = False


class _ScalerWatch:
    """Tells recording adapters when ``torch.amp.GradScaler.update`` runs.

    ``GradScaler.step`` skips ``optimizer.step()`` when gradients overflow, so no optimizer
    hook fires for that iteration; ``update()`` still ends it. One patch serves every active
    recording and is undone when the last one detaches.
    """

    adapters: list[weakref.ref] = []
    original: Any = None

    @classmethod
    def add(cls, adapter: TorchAdapter) -> _ScalerHandle:
        scaler_cls = torch.amp.GradScaler
        if cls.original is None:
            cls.original = original = scaler_cls.update

            def update(scaler: Any, *args: Any, **kwargs: Any) -> Any:
                try:
                    return original(scaler, *args, **kwargs)
                finally:
                    for ref in list(cls.adapters):
                        a = ref()
                        if a is not None:
                            try:
                                a._on_scaler_update()
                            except Exception as exc:  # never into the user's update()
                                a._cap.failed("ending an AMP step", exc)

            update.__wrapped__ = original  # type: ignore[attr-defined]
            scaler_cls.update = update  # type: ignore[method-assign,assignment]
        ref = weakref.ref(adapter)
        cls.adapters.append(ref)
        return _ScalerHandle(ref)

    @classmethod
    def remove(cls, ref: weakref.ref) -> None:
        if ref in cls.adapters:
            cls.adapters.remove(ref)
        if not cls.adapters and cls.original is not None:
            torch.amp.GradScaler.update = cls.original  # type: ignore[method-assign]
            cls.original = None


class _ScalerHandle:
    """Removable like a torch hook handle."""

    def __init__(self, ref: weakref.ref) -> None:
        self._ref = ref

    def remove(self) -> None:
        _ScalerWatch.remove(self._ref)


def _hooked(module: torch.nn.Module, cudnn_rnn: str) -> bool:
    """Whether a module of the model gets hooks (the model itself always does).

    Masks are attributed from the Python stack at the dropout call, so no module needs a hook
    for that. Hooks remain where a call that draws nothing must still be recorded: a user's
    dropout-looking module (its eval calls, its random draws) and a stacked RNN with dropout
    (its eval calls), and where ``cudnn_rnn="exact"`` turns cuDNN off around an RNN. Modules
    inside a ``TransformerEncoderLayer`` are never among them: the layer's fast path checks
    every submodule for hooks.
    """
    if isinstance(module, torch.nn.RNNBase):
        return bool(module.dropout)
    if type(module).__module__.startswith("torch.nn."):
        return False
    return looks_like_dropout(module)


def _say_fast_path(model: torch.nn.Module, note: Callable[[str], None]) -> None:
    """The model's own hooks turn off a TransformerEncoderLayer's fast path: say so first."""
    if isinstance(model, torch.nn.TransformerEncoderLayer):
        note("the recorded model is one nn.TransformerEncoderLayer: its inference fast path "
             "checks for forward hooks, and dropspy's step clock hooks the model, so eval "
             "calls take the slow path while recording (same outputs up to rounding). Record "
             "a module that contains the layer to keep the fast path.")


def _layout3(model: torch.nn.Module) -> tuple[str, ...] | None:
    """Axis names of rank-3 activations, from the ``batch_first`` of the model's modules."""
    flags = {bool(m.batch_first) for m in model.modules()
             if isinstance(getattr(m, "batch_first", None), bool)}
    if flags == {True}:
        return ("batch", "time", "feature")
    if flags == {False}:
        return ("time", "batch", "feature")
    return None


def _refuse_wrappers(model: torch.nn.Module) -> None:
    """Refuse DataParallel / DDP / compiled modules by name, saying what to do instead."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "dropspy cannot record a TorchScript module (torch.jit.script/trace): its dropout "
            "runs inside the TorchScript interpreter, out of dropspy's sight, and it takes no "
            "hooks. Record the eager nn.Module it was made from.")
    for name, module in model.named_modules():
        where = f" (at {name!r})" if name else ""
        if name and isinstance(module, torch.jit.ScriptModule):
            # Refused rather than skipped: its dropout would go unseen, and torch refuses the
            # hooks dropspy puts on every module (a raw RuntimeError from attach otherwise).
            raise UnsupportedModelError(
                f"dropspy cannot record a model holding a TorchScript submodule{where}: its "
                f"dropout runs inside the TorchScript interpreter, out of dropspy's sight, and "
                f"it takes no hooks. Keep that submodule an eager nn.Module while recording.")
        if isinstance(module, (DataParallel, DistributedDataParallel)):
            # Top-level wrappers are unwrapped; one nested inside a model is not a layout
            # torch documents, and its forward would run under the outer one's hooks.
            raise UnsupportedModelError(
                f"dropspy cannot record a {type(module).__name__} nested inside the model"
                f"{where}. Wrap the whole model instead and record the wrapper: "
                f"dropspy.record(ddp_model, 'run.h5') (each rank writes its own file).")
        compiled = type(module).__name__ == "OptimizedModule" or getattr(
            module, "_compiled_call_impl", None) is not None
        if compiled and name:
            # The model's own compile is recorded (compiled.py); a compiled submodule of an
            # eager model would take dropspy's eager hooks into its Dynamo graphs.
            raise UnsupportedModelError(
                f"dropspy cannot record a model with a torch.compile'd submodule{where}: "
                f"Dynamo would trace dropspy's hooks into its graph. Compile the whole model "
                f"(torch.compile(model) or model.compile()) and record that, or record the "
                f"eager model.")
