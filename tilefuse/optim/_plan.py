"""The cached step plan of a fused optimizer: tables built once, a step costs O(1) Python per group.

``Plan(opt)`` is built at the first fused step and again whenever something it relies on changes:
the param groups (``add_param_group``, ``load_state_dict``), a group's algorithm flags, a param's
storage or dtype (``p.data = ...``), a gradient appearing, vanishing (``None``) or changing layout
or dtype, the optimizer state (``load_state_dict``, a replaced ``opt.state[p]`` or state tensor) or
the backend. It groups the items -- same device, same dtype per role, same algorithm flags, across
param groups -- into buckets, each with one persistent
:class:`~tilefuse.kernels.optim_table.StepTable`.

A step then (``refresh`` + ``launch``):

* checks, with C-level ``map`` passes and no Python loop body per param, that every param still
  has a dense gradient of the param's layout and dtype and that params and state tensors are the
  ones the tables address;
* rewrites the gradient offsets when gradients moved (``zero_grad(set_to_none=True)``) and the
  scalar rows whose hyper-parameters changed (LR schedulers, per group), then sends each table in
  one copy if anything changed (none on the CPU);
* launches one kernel per bucket; step counters advance on the device, so no host sync.

Items whose tensors do not share the param's layout (non-dense params, state or grads with other
strides) are updated on contiguous copies, prepared again at every step (the documented slow
path). A plan whose scalar rows only hold for one step (SGD's first momentum step) is dropped
after its launch (``once``).
"""
from __future__ import annotations

import operator
from itertools import repeat

import torch

from tilefuse._backend import backend_for_device

_grad = operator.attrgetter("grad")
_dtype = operator.attrgetter("dtype")
_ptr = torch.Tensor.data_ptr
_contiguous = torch.Tensor.is_contiguous
_is = operator.is_


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dim order): its storage range holds exactly its elements."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(p: torch.Tensor, roles) -> bool:
    """Every role tensor has the param's element order, so one flat index addresses all."""
    n = p.numel()
    if p.is_contiguous() and all(t is None or (t.is_contiguous() and t.numel() == n)
                                 for t in roles):
        return True
    return is_dense(p) and all(t is None or (t.stride() == p.stride() and t.shape == p.shape)
                               for t in roles)


def _on(t, device):
    return t if t is None or t.device == device else t.to(device)


class _Bucket:
    """Items sharing one kernel specialisation; ``finish`` builds their StepTable."""

    def __init__(self, flags):
        self.flags = flags
        self.params, self.roles, self.steps, self.rowkeys = [], [], [], []
        self.dicts, self.owners = [], []  # state dicts; as opt.state holds them (None: not held)
        self.rows: dict = {}  # (group index, kind) -> scalar row
        self.table = self.grad_base = None

    def add(self, gi, kind, p, roles, step, state, held=True) -> None:
        self.params.append(p)
        self.roles.append(roles)
        self.steps.append(step)
        self.dicts.append(state)
        self.owners.append(state if held else None)
        self.rowkeys.append(self.rows.setdefault((gi, kind), len(self.rows)))

    def finish(self, values: dict, persistent: bool) -> None:
        from tilefuse.kernels.optim_table import StepTable

        roles = [list(r) for r in zip(*self.roles)]
        steps = None if self.steps[0] is None else self.steps
        width = len(next(iter(values.values())))
        self.table = StepTable(roles, steps, self.rowkeys, len(self.rows), width)
        self.set_scalars(values)
        self.grad_base, self.table.bases[1] = self.table.bases[1], None
        if persistent:  # what refresh checks (strong references: identities stay meaningful)
            self.param_ptrs = list(map(_ptr, self.params))
            self.grad_dtype = roles[1][0].dtype
            self.strided = [(i, p.stride()) for i, p in enumerate(self.params)
                            if not p.is_contiguous()]
            keys = sorted({k for d in self.dicts for k, v in d.items()
                           if isinstance(v, torch.Tensor)})
            self.cols = [(k, [d.get(k) for d in self.dicts]) for k in keys]
        self.roles = self.steps = self.rowkeys = None

    def set_scalars(self, values: dict) -> None:
        for key, row in self.rows.items():
            self.table.set_scalars(row, values[key])

    def refresh(self, state_get) -> bool:
        grads = list(map(_grad, self.params))
        try:
            ptrs = list(map(_ptr, grads))  # None or sparse: raises
        except (TypeError, RuntimeError):
            return False
        if not all(map(_is, map(_dtype, grads), repeat(self.grad_dtype))):
            return False
        if self.strided:
            contiguous = set(range(len(grads))) - {i for i, _ in self.strided}
            if not (all(grads[i].stride() == s for i, s in self.strided)
                    and all(grads[i].is_contiguous() for i in contiguous)):
                return False
        elif not all(map(_contiguous, grads)):
            return False
        if list(map(_ptr, self.params)) != self.param_ptrs:
            return False
        if not all(map(_is, map(state_get, self.params), self.owners)):
            return False
        for key, col in self.cols:
            if not all(map(_is, map(dict.get, self.dicts, repeat(key)), col)):
                return False
        self.grad_base = self.table.update_role(1, grads, ptrs)
        return True

    def launch(self, opt, gmul, gmul_inv: bool, found_inf) -> None:
        from tilefuse.kernels import optim as kernels

        kernel, algo = kernels.UPDATES[opt._kernel]
        dev = self.table.device
        bases = list(self.table.bases)
        bases[1], self.grad_base = self.grad_base, None  # hold no gradient past the launch
        kernels.launch_update(kernel, self.table, bases, {**algo, **self.flags},
                              gmul=_on(gmul, dev), gmul_inv=gmul_inv,
                              found_inf=_on(found_inf, dev))


class Plan:
    """See the module docstring. ``with_grad``: the params this plan updates."""

    def __init__(self, opt):
        self.groups = list(opt.param_groups)
        self.group_list = opt.param_groups
        self.params = [g["params"] for g in self.groups]
        self.members = [list(ps) for ps in self.params]  # a replaced list entry is a new param
        self.sigs = [opt._group_sig(g) for g in self.groups]
        self.state = opt.state
        self.idle, self.with_grad, self.copies = [], [], []
        self.once = False
        buckets: dict = {}
        self.row_keys: set = set()
        entries = []
        for gi, group in enumerate(self.groups):
            fkey = self.sigs[gi][0]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    self.idle.append(p)
                    continue
                self.with_grad.append(p)
                entry = self._prepare(opt, gi, group, p)
                roles, step = entry[3], entry[4]
                if p.numel() == 0 and step is None:
                    continue  # nothing to update, no counter to advance
                if not same_layout(p, roles):
                    self.copies.append((gi, p))
                    entries.append(entry)
                    continue
                has_master = roles[-1] is not None  # the master copy is always the last role
                key = (fkey, has_master, p.device, None if step is None else step.dtype) + tuple(
                    None if t is None else t.dtype for t in roles)
                if key not in buckets:
                    buckets[key] = _Bucket(dict(fkey, HAS_MASTER=has_master))
                buckets[key].add(*entry)
        self.devices = {p.device for p in self.with_grad}
        values = self._values(opt)
        self.buckets = list(buckets.values())
        for b in self.buckets:
            b.finish(values, persistent=True)
        self._copy_entries = entries

    def _prepare(self, opt, gi, group, p):
        state = opt.state.get(p)  # a fresh dict is registered only if it gets content
        fresh = state is None
        if fresh:
            state = {}
        step = opt._step_tensor(state, p) if opt._uses_step else None
        roles, kind = opt._prepare(group, p, p.grad, state)
        if fresh and state:
            opt.state[p] = state
        if kind == "first":
            self.once = True
        self.row_keys.add((gi, kind))
        return gi, kind, p, roles, step, state, not fresh or bool(state)

    def _values(self, opt) -> dict:
        return {(gi, kind): opt._scalars(self.groups[gi], kind) for gi, kind in self.row_keys}

    def refresh(self, opt) -> bool:
        """Check that the plan still holds and update what changed; False: rebuild."""
        groups = opt.param_groups
        if (self.once or groups is not self.group_list or len(groups) != len(self.groups)
                or opt.state is not self.state):
            return False
        for group, g0, ps, members, sig in zip(groups, self.groups, self.params, self.members,
                                               self.sigs):
            if (group is not g0 or group["params"] is not ps or len(ps) != len(members)
                    or not all(map(_is, ps, members)) or opt._group_sig(group) != sig):
                return False
        if any(backend_for_device(d) != "triton" for d in self.devices):
            return False
        if self.idle and not all(g is None for g in map(_grad, self.idle)):
            return False
        state_get = opt.state.get
        if not all(b.refresh(state_get) for b in self.buckets):
            return False
        entries = []
        for gi, p in self.copies:
            if p.grad is None or p.grad.is_sparse:
                return False
            entries.append(self._prepare(opt, gi, self.groups[gi], p))
        values = self._values(opt)
        for b in self.buckets:
            b.set_scalars(values)
        self._copy_entries = entries
        return True

    def grads(self) -> list:
        return [p.grad for p in self.with_grad]

    def launch(self, opt, gmul=None, gmul_inv: bool = False, found_inf=None) -> None:
        for b in self.buckets:
            b.launch(opt, gmul, gmul_inv, found_inf)
        if self._copy_entries:
            self._launch_copies(opt, gmul, gmul_inv, found_inf)

    def _launch_copies(self, opt, gmul, gmul_inv, found_inf) -> None:
        """Layouts that differ from the param's: contiguous copies, written back after."""
        buckets: dict = {}
        writeback = []
        for gi, kind, p, roles, step, state, _ in self._copy_entries:
            copies = [None if t is None else t.contiguous() for t in roles]
            writeback += [(t, c) for i, (t, c) in enumerate(zip(roles, copies))
                          if i != 1 and t is not None and c is not t]
            has_master = copies[-1] is not None
            key = (gi, has_master, p.device, None if step is None else step.dtype) + tuple(
                None if t is None else t.dtype for t in copies)
            if key not in buckets:
                buckets[key] = _Bucket(dict(self.sigs[gi][0], HAS_MASTER=has_master))
            buckets[key].add(gi, kind, p, copies, step, state)
        self._copy_entries = None
        values = self._values(opt)
        for b in buckets.values():
            b.finish(values, persistent=False)
            b.launch(opt, gmul, gmul_inv, found_inf)
        for dst, src in writeback:
            dst.copy_(src)
