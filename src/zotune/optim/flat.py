"""FlatParameters: the trainable tensors as views of one contiguous float32 buffer.

A MeZO sweep touches every trainable element with the same per-element formula, so with one
buffer it is one pass over memory (one kernel launch on a GPU) instead of one per tensor.
Each parameter keeps its `torch.nn.Parameter` object, now a view of the buffer (`p.data` is
rebound), so the model and autograd-based baselines see no difference.

Layout: decayed tensors first, then the no-decay ones, each group in the order given, so
weight decay applies to buffer[:n_decay]. The z of an element is indexed by its position in
this buffer (`optim/rng.py`), so this order is part of the RNG contract: the same parameter
list and no-decay rule always give the same layout, and a seeded run replays exactly.
"""

from collections.abc import Callable, Mapping, Set
from contextlib import contextmanager
from itertools import accumulate

import torch


class FlatParameters:
    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        no_decay: Callable[[str, torch.nn.Parameter], bool] | Set[str],
    ):
        if not named_params:
            raise ValueError("FlatParameters needs at least one parameter")
        if callable(no_decay):
            exempt = [no_decay(name, p) for name, p in named_params]
        else:
            unknown = set(no_decay) - {name for name, _ in named_params}
            if unknown:  # a typo would silently decay a tensor the caller meant to exempt
                raise ValueError(f"no_decay names not among the parameters: {sorted(unknown)}")
            exempt = [name in no_decay for name, _ in named_params]
        seen = set()
        for name, p in named_params:
            if p.dtype != torch.float32:
                raise ValueError(f"parameter {name!r} is {p.dtype}; FlatParameters holds float32 only")
            if id(p) in seen:  # a second copy would leave the first region detached from the model
                raise ValueError(f"parameter {name!r} is listed twice (tied weights are one Parameter)")
            seen.add(id(p))
        devices = {p.device for _, p in named_params}
        if len(devices) != 1:
            raise ValueError(f"parameters are on several devices: {sorted(map(str, devices))}")

        decay = [named for named, ex in zip(named_params, exempt) if not ex]
        ordered = decay + [named for named, ex in zip(named_params, exempt) if ex]
        self.names = [name for name, _ in ordered]
        self.shapes = [p.shape for _, p in ordered]
        sizes = [p.numel() for _, p in ordered]
        self.offsets = list(accumulate(sizes, initial=0))[:-1]
        self.numel = sum(sizes)
        self.n_decay = sum(p.numel() for _, p in decay)

        self.buffer = torch.empty(self.numel, dtype=torch.float32, device=devices.pop())
        self.plus: torch.Tensor | None = None  # theta + eps z beside theta - eps z (add_plus)
        self.parameters = [p for _, p in ordered]
        self._buffer_views = self._views(self.buffer)
        for p, view in zip(self.parameters, self._buffer_views):
            view.copy_(p.detach())
            p.data = view  # the model's Parameter now reads and writes the buffer

    def _views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's view of `buffer` [numel], or of both buffers [2, numel] (then [2, *shape])."""
        lead = buffer.shape[:-1]
        return [buffer[..., o : o + s.numel()].view(*lead, *s) for o, s in zip(self.offsets, self.shapes)]

    def add_plus(self) -> None:
        """A second buffer, `plus`, of the same layout. MeZO's first sweep of a direction then
        writes theta + eps z there and theta - eps z in place in one pass (optim/sweep.py
        perturb_apart), saving one of a step's three sweeps, and a MeZO pair reads both at once
        (optim/mezo.py). It costs a copy of the trainable tensors: worth it for subsets small
        next to the model. The two buffers are the rows of one tensor, so that each tensor's
        pair is a view (pair_views) that one kernel reads."""
        if self.plus is None:
            # Rows a multiple of 256 bytes apart: a tensor's view then starts as aligned as it did
            # in the buffer (an odd numel would put every weight off 16 bytes, and cuBLAS then
            # takes its slower unaligned kernels).
            row = -(-self.numel // 64) * 64
            both = torch.empty(2, row, dtype=self.buffer.dtype, device=self.buffer.device)
            both[1, :self.numel].copy_(self.buffer)
            self._both, self.plus, self.buffer = both, both[0, :self.numel], both[1, :self.numel]
            self._buffer_views, self._plus_views = self._views(self.buffer), self._views(self.plus)
            for p, view in zip(self.parameters, self._buffer_views):
                p.data = view

    def to(self, device: torch.device) -> "FlatParameters":
        """Move the buffer (and `plus`, as the one tensor they are rows of) to `device`, bit for
        bit, and rebind every parameter to its view there. Pair views handed out before are
        left behind: take them after the move."""
        if self.plus is None:
            self.buffer = self.buffer.to(device)
        else:
            self._both = self._both.to(device)
            self.plus, self.buffer = self._both[0, :self.numel], self._both[1, :self.numel]
            self._plus_views = self._views(self.plus)
        self._buffer_views = self._views(self.buffer)
        for p, view in zip(self.parameters, self._buffer_views):
            p.data = view
        return self

    def pair_views(self) -> dict[str, torch.Tensor]:
        """Each named tensor at theta + eps z and as it is, [2, *shape]: views of both buffers
        (add_plus), no copy."""
        self.add_plus()
        return dict(zip(self.names, self._views(self._both[:, :self.numel])))

    @contextmanager
    def reading_plus(self):
        """Inside, the model's trainable Parameters read `plus` (theta + eps z) instead of the
        buffer. A CUDA graph captured inside keeps reading `plus` at every replay."""
        for p, view in zip(self.parameters, self._plus_views):
            p.data = view
        try:
            yield
        finally:
            for p, view in zip(self.parameters, self._buffer_views):
                p.data = view

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the named tensors, safe to keep while training goes on."""
        return {name: view.clone() for name, view in zip(self.names, self._buffer_views)}

    def load_(self, tensors: Mapping[str, torch.Tensor]):
        """Copy named tensors into the buffer; names and shapes must match exactly."""
        missing = set(self.names) - set(tensors)
        unexpected = set(tensors) - set(self.names)
        if missing or unexpected:
            raise ValueError(f"load_: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, view in zip(self.names, self._buffer_views):
            if tensors[name].shape != view.shape:
                raise ValueError(f"load_: {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(view.shape)}")
        for name, view in zip(self.names, self._buffer_views):
            view.copy_(tensors[name])
