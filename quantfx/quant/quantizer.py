"""The ``Quantizer`` module: a spec made runnable, with its statistics and learned scale as state."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..errors import CalibrationError, InputScaleRequiredError, QuantArgumentError
from . import functional as qf
from .specs import FIELDS, QuantSpec, resolve

MSE_GRID = torch.logspace(-2, 0, 41)  # clip at 1%..100% of the max, log-spaced


class Quantizer(nn.Module):
    """Uniform affine integer quantizer built from a spec class and keyword overrides.

    ``Quantizer(None)`` is a disabled slot: ``is_quant_enabled`` is False and it returns its input.
    Weight quantizers derive their scale from the tensor they are given; activation quantizers from running
    statistics (training), calibration statistics, or a learned parameter; bias quantizers from the input and
    weight scales (external) or from the bias itself (internal).
    """

    scale_group = None  # a ScaleGroup whose scale this quantizer shares (set on the instance by ScaleGroup)
    calibrated_by = None  # the statistic its last calibration used ('max', 'mse', ...), for quantfx.inspect
    rounding_learned = False  # its weight integers were chosen on data (quantfx.weight_rounding)
    rounding_method = None  # ... by 'learned' rounding (AdaRound) or 'gptq' (quantfx.gptq)

    def __init__(self, spec=QuantSpec, name: str | None = None, **overrides):
        super().__init__()
        self.qname = name
        self.is_quant_enabled = spec is not None
        self.calibrating = False
        self._calib = None
        self._last = None  # (scale, zero_point) of the last call, for dependents in the same forward
        if not self.is_quant_enabled:
            if overrides:
                raise QuantArgumentError(f"{self._where}: arguments {sorted(overrides)} given to a disabled slot")
            self.spec_fields = {}
            return
        self.spec = spec
        self.spec_fields = resolve(spec, overrides, self._where)
        for k, v in self.spec_fields.items():
            setattr(self, k, v)
        if self.channel_axis is None:
            self.channel_axis = 1 if self.kind == "act" else 0
        self.register_buffer("stat", torch.empty(0))  # [2] or [2, C]: (low, high)
        self.register_buffer("calibrated", torch.tensor(False))
        if self.learned_scale:
            self.scale_param = nn.Parameter(torch.empty(0))

    # -- description -----------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return self.qname or "quantizer"

    def int_range(self) -> tuple[int, int]:
        return qf.int_range(self.bit_width, self.signed, self.narrow_range)

    @property
    def is_calibrated(self) -> bool:
        """Act quantizers: whether they saw data. Weight/bias quantizers and fixed scales: always."""
        if not self.is_quant_enabled or self.kind != "act" or self.fixed_scale is not None:
            return True
        return bool(self.calibrated)

    def extra_repr(self) -> str:
        if not self.is_quant_enabled:
            return "disabled"
        sign = "int" if self.signed else "uint"
        parts = [f"{self.kind}", f"{sign}{self.bit_width}", self.scale_type]
        if self.narrow_range:
            parts.append("narrow")
        if self.scaling_per_output_channel:
            parts.append(f"per_channel(axis={self.channel_axis})")
        if self.zero_point_type == "asymmetric":
            parts.append("asym, even zero point" if getattr(self, "even_zero_point", False) else "asym")
        if getattr(self, "scale_step", None) is not None:
            parts.append(f"scale_step=2^{round(math.log2(self.scale_step))}")
        if self.kind == "bias":
            parts.append(self.bias_scaling)
        return ", ".join(parts)

    def clone_spec(self, **overrides) -> "Quantizer":
        """A new, empty quantizer with the same fields (and ``overrides``)."""
        return Quantizer(self.spec, name=self.qname, **{**self.spec_fields, **overrides})

    # -- statistics ------------------------------------------------------------------------------------

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as [C, N] (per channel) or [1, N] (per tensor)."""
        x = x.detach().float()
        if self.scaling_per_output_channel:
            if x.dim() == 0:
                raise QuantArgumentError(
                    f"{self._where}: scaling_per_output_channel=True needs a tensor with a channel axis; "
                    "got a 0-d tensor (use scaling_per_output_channel=False)")
            return x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)
        return x.reshape(1, -1)

    def _squeeze(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.scaling_per_output_channel else t.reshape(())

    def batch_stat(self, x: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """(low, high) of x under ``method`` ('max' | 'percentile' | 'mse'), shape [2] or [2, C]."""
        method = method or self.scale_stat
        rows = self._rows(x)
        if self.bit_width == 1:
            hi = rows.abs().mean(1)
            return torch.stack([-hi, hi]).squeeze(-1) if not self.scaling_per_output_channel else torch.stack([-hi, hi])
        if method == "percentile" and rows.shape[1] > 1:
            k_hi = max(1, min(rows.shape[1], int(round(rows.shape[1] * self.percentile / 100.0))))
            k_lo = max(1, rows.shape[1] - k_hi + 1)
            hi = rows.kthvalue(k_hi, dim=1).values
            lo = rows.kthvalue(k_lo, dim=1).values
        else:
            lo, hi = rows.amin(1), rows.amax(1)  # amin/amax: no indices, many times faster than min/max(dim)
        if self.zero_point_type == "symmetric" and self.signed:
            m = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -m, m
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        if method == "mse":
            lo, hi = self._mse_search(rows, lo, hi)
        stat = torch.stack([lo, hi])
        return stat if self.scaling_per_output_channel else stat.reshape(2)

    def _mse_search(self, rows, lo, hi):
        best_err = torch.full_like(hi, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        qmin, qmax = self.int_range()
        work = torch.empty_like(rows)
        for a in MSE_GRID.tolist():
            scale, zp = self._from_stat(torch.stack([lo * a, hi * a]))
            scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
            # qf.fake_quant's values (its STE terms add exact zeros), computed in place: a calibration pass of a
            # large network spends most of its time here (41 candidates per activation and batch)
            torch.div(rows, scale, out=work)
            if self.rounding == "half_even":
                work.round_()
            else:
                (work.add_(0.5) if self.rounding == "half_up" else work).floor_()
            work.add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)
            err = work.sub_(rows).pow_(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * a, best_lo)
            best_hi = torch.where(better, hi * a, best_hi)
        return best_lo, best_hi

    def _from_stat(self, stat: torch.Tensor, scale: torch.Tensor | None = None):
        """(scale, zero_point) from a (low, high) statistic; with ``scale`` given, only the zero point."""
        lo, hi = stat[0], stat[1]
        qmin, qmax = self.int_range()
        if scale is not None:
            if self.zero_point_type == "asymmetric":
                return scale, self._zero_point(lo, scale)
            return scale, torch.zeros_like(scale)
        if self.bit_width == 1:
            scale, zp = hi, torch.zeros_like(hi)
        elif self.zero_point_type == "asymmetric":
            # the zero point of the scale in use (a power of two's, where it is one)
            scale = self._restrict(qf.scale_of_range((hi - lo) / (qmax - qmin)))
            zp = self._zero_point(lo, scale)
        else:
            top = torch.maximum(hi, -lo) if self.signed else hi
            scale, zp = top / qmax, torch.zeros_like(top)
        return self._restrict(qf.scale_of_range(scale)), zp

    def _zero_point(self, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The asymmetric zero point that puts the low end ``lo`` on the grid (an even one if asked)."""
        qmin, qmax = self.int_range()
        if getattr(self, "even_zero_point", False):
            return torch.clamp(2 * torch.round((qmin - lo / scale) / 2), qmin + qmin % 2, qmax - qmax % 2)
        return torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)

    def _restrict(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale as ``scale_type`` and ``scale_step`` allow it: rounded up to a power of two or to a multiple
        of the step (a no-op on a scale that already is one)."""
        if self.scale_type == "po2":
            return qf.po2_ste(scale)
        step = getattr(self, "scale_step", None)
        if step is not None:
            scale = scale + (torch.ceil(scale.detach() / step) * step - scale).detach()
        return scale

    # -- scale -----------------------------------------------------------------------------------------

    def _learned(self, x):
        if self.scale_param.numel() == 0:
            if x is None:
                raise CalibrationError(f"{self._where}: learned scale not initialised; it never saw data")
            stat = self.batch_stat(x)
            init, _ = self._from_stat(stat)
            self.scale_param.data = init.detach().clone()
            if self.zero_point_type == "asymmetric":
                self.stat = stat  # the observed low end places the zero point
            self.calibrated.fill_(True)
        scale = self._restrict(self.scale_param.abs().clamp(min=qf.TINY))
        if self.zero_point_type == "asymmetric" and self.stat.numel():
            # the zero point follows the learned scale: the observed low end stays representable
            return scale, self._zero_point(self.stat[0], scale.detach())
        return scale, torch.zeros_like(scale)

    def qparams(self, x: torch.Tensor | None = None):
        """(scale, zero_point) for tensor x; shapes 0-d or [C]. x may be None where state suffices."""
        if self.fixed_scale is not None:
            s = self._restrict(torch.tensor(float(self.fixed_scale)))  # a po2 quantizer's fixed scale is one too
            return s, torch.zeros_like(s)
        if self.learned_scale:
            return self._learned(x)
        if self.kind == "act":
            if self.training and x is not None:
                with torch.no_grad():
                    batch = self.batch_stat(x)
                    if _distributed() is not None:
                        batch = _sync_batch_stat(batch, self.scale_stat)
                    if bool(self.calibrated) and self.stat.shape == batch.shape:
                        self.stat.mul_(1 - self.momentum).add_(batch, alpha=self.momentum)
                    else:
                        self.stat = batch
                        self.calibrated.fill_(True)
            if bool(self.calibrated):
                stat = self.stat
            elif x is None:
                if self._last is not None:
                    return self._last
                raise CalibrationError(
                    f"{self._where} never saw data, so it has no scale; run quantfx.calibrate(model, data) "
                    "(or train the model) before using or exporting it")
            else:
                stat = self.batch_stat(x)  # eval, uncalibrated: dynamic
            if self.scale_group is not None:
                return self._from_stat(stat, self.scale_group.scale(self, stat))
            return self._from_stat(stat)
        if self.is_frozen:
            return self._from_stat(self.stat)  # (freeze_weight_scale)
        if x is None:
            if self._last is not None:
                return self._last
            raise QuantArgumentError(f"{self._where}: a {self.kind} quantizer needs the tensor to give a scale "
                                     "(call the layer's quant_weight() first, or pass the tensor)")
        hit = self._cached(x, self._weight_cache_key(x))
        return hit[3] if hit is not None else self._from_stat(self.batch_stat(x))

    @property
    def is_frozen(self) -> bool:
        """A weight quantizer whose scale no longer follows the weights (:meth:`freeze_weight_scale`)."""
        return self.kind == "weight" and bool(self.calibrated) and self.stat.numel() > 0

    def freeze_weight_scale(self, w: torch.Tensor) -> None:
        """Keep the scale that weight tensor ``w`` gives from now on, whatever the weights become (learned
        rounding writes its integers into the weights, which would move a statistics-based scale). Stored in
        the ``stat`` buffer, so it travels with the state dict. A frozen scale stays as it is."""
        if self.kind != "weight" or not self.is_quant_enabled:
            raise QuantArgumentError(f"{self._where}: only an enabled weight quantizer's scale can be frozen")
        if self.is_frozen:
            return
        with torch.no_grad():
            self.stat = self.batch_stat(w).detach().clone()
        self.calibrated.fill_(True)
        self.__dict__.pop("_wcache", None)
        self.__dict__.pop("_icache", None)

    def floor_weight_scale(self, w: torch.Tensor, floor: torch.Tensor) -> None:
        """Freeze the scale weight tensor ``w`` gives (:meth:`freeze_weight_scale`), raised to at least ``floor``
        (0-d, or one per channel): a coarser grid where a bias needs one to fit its integers
        (:func:`quantfx.bias_range.fit_bias_ranges`). Symmetric weight quantizers only."""
        if self.zero_point_type != "symmetric" or self.bit_width == 1 or self.learned_scale:
            raise QuantArgumentError(f"{self._where}: only a symmetric, statistics-based weight scale of 2 or more "
                                     "bits can be raised to fit a bias")
        self.freeze_weight_scale(w)
        with torch.no_grad():
            top = torch.maximum(self.stat[1], -self.stat[0]) if self.signed else self.stat[1]
            # a hair above floor x qmax, so that the float32 quotient top / qmax is not below the floor
            top = torch.maximum(top, floor.to(top.dtype).reshape(top.shape) * self.int_range()[1] * (1 + 2 ** -20))
            self.stat = torch.stack([-top if self.signed else torch.zeros_like(top), top])
        self.__dict__.pop("_wcache", None)
        self.__dict__.pop("_icache", None)

    def scale(self, x=None) -> torch.Tensor:
        """The scale (0-d or [C]); weight quantizers use x or the tensor of their last call."""
        return self.qparams(x)[0]

    def zero_point(self, x=None) -> torch.Tensor:
        return self.qparams(x)[1]

    # -- calibration -----------------------------------------------------------------------------------

    def begin_calibration(self, method: str | None = None) -> None:
        self.calibrating = True
        self._calib = {"method": method or self.scale_stat, "sum": None, "n": 0}

    def observe(self, x: torch.Tensor) -> None:
        c = self._calib
        batch = self.batch_stat(x, c["method"])
        if getattr(self, "group", None) is not None and c["method"] != "max" and is_zero_stat(batch):
            # a shared quantizer (the inputs of a concat or of FINN's add) averaging over its members' calls:
            # an identically zero member would pull the average range down and clip the others
            c["zeros"] = batch
            return
        if c["method"] != "max" and _distributed() is not None:
            # kept apart to be summed in one process's order across ranks (_reduce_calibration)
            c.setdefault("seen", []).append((c.get("batch", 0), batch))
        if c["sum"] is None:
            c["sum"] = batch
        elif c["method"] == "max":
            c["sum"] = torch.stack([torch.minimum(c["sum"][0], batch[0]), torch.maximum(c["sum"][1], batch[1])])
        else:
            c["sum"] = c["sum"] + batch
        c["n"] += 1

    def end_calibration(self) -> None:
        c, self._calib, self.calibrating = self._calib, None, False
        if c is not None and _distributed() is not None:
            c = self._reduce_calibration(c)
        if c is not None and c["n"] == 0 and "zeros" in c:
            c = {**c, "sum": c["zeros"], "n": 1}  # it saw only zeros
        if c is None or c["n"] == 0:
            return
        stat = c["sum"] if c["method"] == "max" else c["sum"] / c["n"]
        self.stat = stat
        self.calibrated_by = c["method"]
        self.calibrated.fill_(True)
        if self.learned_scale:
            self.scale_param.data = self._from_stat(stat)[0].detach().clone()

    def _reduce_calibration(self, c: dict) -> dict:
        """Under torch.distributed, the statistics of every rank combined (each rank calls this for the same
        quantizers in the same order): low ends by MIN and high ends by MAX for 'max', the batch statistics of
        every rank summed in one process's order for the averaged methods; either way the same as one process
        over all the data, bit for bit."""
        dist = _distributed()
        counts = torch.tensor([c["n"], -c["n"]], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # [largest n, -smallest n]
        most, fewest = int(counts[0]), int(-counts[1])
        if most == 0:
            return c
        if fewest == 0:
            raise CalibrationError(f"{self._where}: saw no calibration data on rank {dist.get_rank()} while other "
                                   "ranks did; give every rank calibration batches that reach every layer")
        if c["method"] == "max":
            lo, hi = c["sum"][0].contiguous(), c["sum"][1].contiguous()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            return {**c, "sum": torch.stack([lo, hi])}
        # the averaged methods: every rank's per-batch statistics, summed in the order one process would have
        # met them, rank r's i-th batch being batch i x world + r of the whole data (rank r calibrating on
        # data[r::world], as DistributedSampler deals samples): the same float sum, bit for bit
        world = dist.get_world_size()
        seen = [None] * world
        dist.all_gather_object(seen, [(i, stat.contiguous()) for i, stat in c.get("seen", [])])
        ordered = sorted(((i * world + r, k), stat) for r, part in enumerate(seen) for k, (i, stat) in
                         enumerate(part))
        total = ordered[0][1]
        for _, stat in ordered[1:]:
            total = total + stat
        return {**c, "sum": total, "n": len(ordered)}

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, input_scale=None, weight_scale=None) -> torch.Tensor:
        return self.quantize(x, input_scale, weight_scale)[0]

    def quantize(self, x, input_scale=None, weight_scale=None):
        """(value, scale, zero_point) with scale/zero point broadcastable to x."""
        if not self.is_quant_enabled:
            return x, None, None
        if self.calibrating:
            if self.kind == "act":
                self.observe(x)
            return x, None, None
        # Weights of an eval model are quantized once: the result is kept while the tensor (same object, same
        # version counter) and every field of the quantizer stay the same, and no gradient is asked for.
        cache_key = self._weight_cache_key(x)
        hit = self._cached(x, cache_key)
        if hit is not None:
            y, s, z, self._last = hit
            return y, s, z
        if self.kind == "bias" and self.bias_scaling == "external":
            if input_scale is None:
                raise InputScaleRequiredError(
                    f"{self._where}: Input scale required: an external-scale bias (scale = input scale x weight "
                    "scale) needs a quantized input; quantize the layer input (input_quant=...) or pass a "
                    "QuantTensor, or use an internal-scale bias (Int8BiasPerTensorFloatInternalScaling)")
            if input_scale.numel() != 1:
                raise InputScaleRequiredError(
                    f"{self._where}: an external-scale bias needs a per-tensor input scale; the input has "
                    f"{input_scale.numel()} scales (quantize the input per tensor, or use an internal-scale bias)")
            if weight_scale is None:
                raise InputScaleRequiredError(
                    f"{self._where}: Weight scale required: an external-scale bias (scale = input scale x weight "
                    "scale) needs quantized weights; enable weight_quant or use an internal-scale bias")
            scale = (input_scale.reshape(-1) * weight_scale.reshape(-1))
            scale = scale.reshape(()) if scale.numel() == 1 else scale
            if bool((scale < qf.TINY).any()):
                raise QuantArgumentError(
                    f"{self._where}: the accumulator scale, input scale x weight scale = "
                    f"{float(input_scale.reshape(-1)[0]):.3g} x {float(weight_scale.reshape(-1).min()):.3g}, is "
                    "below float32's normal range, so no runtime can hold the bias integers' scale; bring this "
                    "layer's inputs or weights nearer unit magnitude (or keep it float: overrides={name: None})")
            zp = torch.zeros_like(scale)
            if not self.training and self.bit_width > 16:  # (an 8/16-bit bias clips by choice, as asked)
                self._check_bias_range(x, scale)
        else:
            scale, zp = self.qparams(x)
        self._last = (scale.detach(), zp.detach())
        s, z = self.broadcast(scale, zp, x)
        if self.bit_width == 1:
            y = qf.bipolar_quant(x, s)
        elif self.kind == "bias" and self.bit_width > 16:
            # float32 cannot hold every 32-bit integer: quantize in float64.
            qmin, qmax = self.int_range()
            y = qf.fake_quant(x.double(), s.double(), z.double(), qmin, qmax, self.rounding).to(x.dtype)
        else:
            qmin, qmax = self.int_range()
            y = qf.fake_quant(x, s, z, qmin, qmax, self.rounding)
        if cache_key is not None:
            self.__dict__["_wcache"] = (x, cache_key, (y, s, z, self._last))
        return y, s, z

    def _check_bias_range(self, bias: torch.Tensor, scale: torch.Tensor) -> None:
        """An external-scale bias whose integers would leave the bias range is an error, not a clip (eval)."""
        steps = bias.detach().double().abs() / scale.double()
        qmax = self.int_range()[1]
        if bool((steps > qmax + 0.5).any()):
            c = int(steps.reshape(-1).argmax())
            acc = float(scale.reshape(-1)[c % scale.numel()])
            raise QuantArgumentError(
                f"{self._where}: bias {float(bias.detach().reshape(-1)[c]):.3g} (channel {c}) is "
                f"{float(steps.max()):.3g} steps of the accumulator scale (input scale x weight scale = {acc:.3g}), "
                f"beyond the {self.bit_width}-bit bias range (+-{qmax}); calibrate again after changing the bias "
                "(quantfx.calibrate coarsens this layer's weight grid until its bias fits) or keep the layer float: "
                "overrides={name: None}")

    def broadcast(self, scale, zero_point, x):
        """``scale`` and ``zero_point`` (0-d or per channel) shaped to broadcast over ``x``."""
        axis = self.channel_axis if x.dim() > self.channel_axis else 0
        return qf.broadcast_shape(scale, x.dim(), axis), qf.broadcast_shape(zero_point, x.dim(), axis)

    def _cached(self, x, key):
        """(y, s, z, (scale, zero_point)) of an earlier call on the same weight tensor, or None."""
        hit = self.__dict__.get("_wcache") if key is not None else None
        return hit[2] if hit is not None and hit[0] is x and hit[1] == key else None

    def _weight_cache_key(self, x):
        if self.kind != "weight" or self.learned_scale or x is None or (torch.is_grad_enabled() and x.requires_grad):
            return None
        return (x._version, tuple(x.shape), x.dtype, tuple(getattr(self, f) for f in FIELDS))

    def quant_tensor(self, x, input_scale=None, weight_scale=None, training=None):
        """Quantize x and return a :class:`quantfx.QuantTensor` (a plain tensor when disabled/calibrating)."""
        from ..quant_tensor import QuantTensor  # here: quant_tensor imports quant.functional, whose package imports us
        y, s, z = self.quantize(x, input_scale, weight_scale)
        if s is None:
            return y
        return QuantTensor(y, s, z, self.bit_width, self.signed,
                           self.training if training is None else training, narrow=self.narrow_range)

    def int_repr(self, x, input_scale=None, weight_scale=None) -> torch.Tensor:
        """Integers (int64) that x quantizes to: recovered from the fake-quantized value, so they are exactly
        the integers the fake-quant arithmetic used."""
        y, s, z = self.quantize(x, input_scale, weight_scale)
        if s is None:
            raise QuantArgumentError(f"{self._where}: no integers: the quantizer is "
                                     f"{'calibrating' if self.is_quant_enabled else 'disabled'}")
        hit = self.__dict__.get("_icache")
        if hit is not None and hit[0] is y:  # the weight cache gave back the same quantized tensor
            return hit[1]
        with torch.no_grad():
            if self.bit_width <= 16 and y.dtype == torch.float32:
                # float32 quotients of values on the grid round back to their integers (|int| < 2^22)
                q = y.detach() / s
            else:
                q = y.double() / s.double()
                z = z.double()
            # in place: one temporary instead of three (a ResNet-50's weights are 100 MB of float32)
            ints = q.add_(z).round_().to(torch.int64)
        if self._weight_cache_key(x) is not None:
            self.__dict__["_icache"] = (y, ints)
        return ints

    # -- state -----------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # statistics and learned scales are shaped by the data they saw: adopt the saved shapes.
        for name in ("stat", "scale_param"):
            key = prefix + name
            if key in state_dict and hasattr(self, name):
                t = getattr(self, name)
                if t.shape != state_dict[key].shape:
                    t.data = torch.empty_like(state_dict[key])
        own = [prefix + name for name in ("stat", "calibrated", "scale_param") if hasattr(self, name)]
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not any(k in state_dict for k in own):
            # a float model's state dict has no quantizer state: the quantizer keeps its own, so a float layer's
            # state dict loads into its quantized twin with strict=True. A partial quantizer state stays an error.
            missing_keys[before:] = [k for k in missing_keys[before:] if k not in own]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_last"] = None
        state["_calib"] = None
        state.pop("_wcache", None)
        state.pop("_icache", None)
        return state


def _distributed():
    """torch.distributed, when a process group of more than one rank is running; else None."""
    import torch.distributed as dist  # optional: not every PyTorch build has it
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _sync_batch_stat(batch: torch.Tensor, method: str) -> torch.Tensor:
    """A training step's activation statistic over every rank's batch (as SyncBatchNorm does for its moments):
    the range of all of them for 'max' (what one process sees on the whole batch), the mean of the ranks'
    statistics otherwise; every rank ends with the same running statistic."""
    dist = _distributed()
    if method == "max":
        lo, hi = batch[0].contiguous().clone(), batch[1].contiguous().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return torch.stack([lo, hi])
    total = batch.contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


class ScaleGroup:
    """Activation quantizers that share one scale but keep their own sign, range and zero point.

    A residual add whose inputs are a ReLU output (unsigned, zero point 0) and a signed branch needs one scale
    on both inputs for an exact integer sum, not one quantizer: each member keeps its own grid offset, and the
    group's scale is the largest scale any member needs for its own statistics, so every member's values stay
    in range. Members are plain statistics-based, per-tensor activation quantizers (see :meth:`accepts`)."""

    def __init__(self, name: str, members):
        self.name = name
        self.members = list(members)
        for q in self.members:
            if not self.accepts(q):
                raise QuantArgumentError(f"{name}: {q._where} cannot share a scale with other quantizers "
                                         f"({q.extra_repr()}); only statistics-based per-tensor activation "
                                         "quantizers of 2 or more bits can")
            q.scale_group = self

    @staticmethod
    def accepts(q: Quantizer) -> bool:
        return (q.is_quant_enabled and q.kind == "act" and not q.learned_scale and q.fixed_scale is None
                and not q.scaling_per_output_channel and q.bit_width >= 2)

    def scale(self, member: Quantizer, stat: torch.Tensor) -> torch.Tensor:
        """The shared scale: the largest of the members' own scales (``stat`` is ``member``'s statistic).

        A member that only ever saw zeros (a residual branch whose last BatchNorm is zero-initialised, as in
        timm's ResNets and RegNets) does not count: its own scale is 1 (a zero range holds on any grid), and
        taking it put every activation of a ResNet-18 on a grid of 1.0 (0 dB). It takes the others' scale,
        where its zeros are exact too; a group of zero members keeps 1."""
        stats = [(member, stat)] + [(q, q.stat) for q in self.members if q is not member and bool(q.calibrated)]
        scales = [q._from_stat(s)[0] for q, s in stats if not is_zero_stat(s)]
        if not scales:
            return member._from_stat(stat)[0]
        return functools.reduce(torch.maximum, scales)

    def __repr__(self):
        return f"ScaleGroup({self.name!r}, {len(self.members)} members)"


def is_zero_stat(stat: torch.Tensor) -> bool:
    """Whether a (low, high) statistic is all zero: the quantizer saw nothing but zeros."""
    return stat.numel() > 0 and not bool(stat.any())


def make_quantizer(spec, kind: str, name: str | None = None, **overrides) -> Quantizer:
    """A quantizer for a layer slot. ``spec`` None gives a disabled slot; a ``Quantizer`` instance is shared as is."""
    if isinstance(spec, Quantizer):
        if overrides:
            raise QuantArgumentError(f"{name or kind}: keyword overrides {sorted(overrides)} cannot change a "
                                     "quantizer instance; pass a spec class instead")
        return spec
    if spec is not None and not (isinstance(spec, type) and all(hasattr(spec, f) for f in ("bit_width",))):
        raise QuantArgumentError(f"{name or kind}: expected a quantizer spec class, got {spec!r}")
    if spec is not None and getattr(spec, "kind", kind) != kind and "kind" not in overrides:
        overrides = {**overrides, "kind": kind}
    return Quantizer(spec, name=name, **overrides)


__all__ = ["Quantizer", "ScaleGroup", "make_quantizer", "is_zero_stat", "FIELDS"]
