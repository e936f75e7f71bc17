"""Learning-rate schedulers with the values of PyTorch's classes of the same names.

Stepped once per epoch, after the epoch's optimizer steps:

    sched = linear_cos(opt, epochs=240)   # sets the lr of epoch 0 at construction, as PyTorch
    for epoch in range(epochs):
        train_one_epoch(opt)              # uses opt.param_groups[0]["lr"]
        sched.step()                      # the lr of epoch + 1

As in PyTorch, the classes use the recursive (chainable) forms in ``step()`` and the closed
forms when SequentialLR switches to the next scheduler at a milestone, so the floating-point
values agree with PyTorch's to the last bit. The first scheduler built on an optimizer
stores ``"initial_lr"`` in its param group (the base lr of every later scheduler).

Checkpoints: ``state_dict()`` holds plain Python numbers and lists (JSON-safe). Restore the
optimizer's state_dict too (it holds the lr, as in PyTorch); ``load_state_dict`` here also
writes the scheduler's last lr into the optimizer, so either order of the two loads works.
"""
import math
from bisect import bisect_right


class LRScheduler:
    """Base class: ``step()``, ``get_last_lr()``, ``last_epoch``, ``state_dict()``.

    Subclasses implement ``get_lr()`` (recursive form, from the current lr) and may implement
    ``_get_closed_form_lr()`` (from ``base_lrs`` and ``last_epoch``).
    """

    def __init__(self, optimizer, last_epoch=-1):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} is not an optimizer")
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        elif any("initial_lr" not in g for g in optimizer.param_groups):
            raise KeyError("param 'initial_lr' is not specified in param_groups when resuming "
                           "a scheduler with last_epoch >= 0 (load the optimizer's state first)")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._is_initial = False
        self._initial_step()

    def _initial_step(self):
        """Set the lr of epoch ``last_epoch + 1`` (epoch 0 for a new scheduler)."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self):
        raise NotImplementedError

    def step(self):
        """Advance one epoch and write the new lr into the optimizer."""
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch=None):
        """Recursive form for the next epoch, or the closed form at ``epoch`` when given."""
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = epoch
            values = self._get_closed_form_lr() if hasattr(self, "_get_closed_form_lr") \
                else self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        """The learning rates set by the last step (one per param group)."""
        return list(self._last_lr)

    def state_dict(self):
        """Every attribute except the optimizer (plain numbers and lists)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()
                if k not in ("optimizer", "_is_initial")}

    def load_state_dict(self, state_dict):
        """Restore ``state_dict()``; the optimizer's lr is set to the restored last lr."""
        self.__dict__.update({k: (list(v) if isinstance(v, (list, tuple)) else v)
                              for k, v in state_dict.items()})
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def __repr__(self):
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self._last_lr})"


class LinearLR(LRScheduler):
    """Scale the lr linearly from ``start_factor * base`` to ``end_factor * base`` over
    ``total_iters`` epochs, then keep it.

    closed form: ``lr_e = base * (s + (f - s) * min(e, T) / T)``;
    recursive:   ``lr_e = lr_(e-1) * (1 + (f - s) / (T*s + (e-1)*(f - s)))`` for ``0 < e <= T``.
    """

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError("Starting multiplicative factor expected to be greater than 0 "
                             "and less or equal to 1.")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")
        if total_iters < 0:
            raise ValueError(f"total_iters must be >= 0, got {total_iters}")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        groups = self.optimizer.param_groups
        s, f, T, e = self.start_factor, self.end_factor, self.total_iters, self.last_epoch
        if e == 0:
            return [g["lr"] * s for g in groups]
        if self._is_initial or e > T:
            return [g["lr"] for g in groups]
        return [g["lr"] * (1.0 + (f - s) / (T * s + (e - 1) * (f - s))) for g in groups]

    def _get_closed_form_lr(self):
        s, f, T = self.start_factor, self.end_factor, self.total_iters
        if T == 0:  # PyTorch divides by zero here; the schedule has ended: end_factor
            return [base * f for base in self.base_lrs]
        return [base * (s + (f - s) * min(T, self.last_epoch) / T) for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the base lr to ``eta_min`` over ``T_max`` epochs (SGDR without
    restarts; beyond ``T_max`` the cosine continues, rising again, as in PyTorch).

    closed form: ``lr_e = eta_min + (base - eta_min) * (1 + cos(pi e / T_max)) / 2``;
    recursive:   ``lr_e = eta_min + (lr_(e-1) - eta_min) * (1 + cos(pi e/T)) / (1 + cos(pi (e-1)/T))``
    (with PyTorch's special case where the denominator vanishes).
    """

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        if T_max <= 0:
            raise ValueError(f"T_max must be a positive number of epochs, got {T_max}")
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        groups = self.optimizer.param_groups
        T, e, eta = self.T_max, self.last_epoch, self.eta_min
        if self._is_initial:
            return [g["lr"] for g in groups]
        if self._step_count == 1 and e > 0:  # built with last_epoch >= 0: closed form
            return [eta + (base - eta) * (1 + math.cos(e * math.pi / T)) / 2
                    for base in self.base_lrs]
        if (e - 1 - T) % (2 * T) == 0:  # lr_(e-1) = eta_min: the ratio below would be 0/0
            return [g["lr"] + (base - eta) * (1 - math.cos(math.pi / T)) / 2
                    for base, g in zip(self.base_lrs, groups, strict=True)]
        return [(1 + math.cos(math.pi * e / T)) / (1 + math.cos(math.pi * (e - 1) / T))
                * (g["lr"] - eta) + eta for g in groups]

    def _get_closed_form_lr(self):
        T, e, eta = self.T_max, self.last_epoch, self.eta_min
        return [eta + (base - eta) * (1 + math.cos(math.pi * e / T)) / 2 for base in self.base_lrs]


class SequentialLR(LRScheduler):
    """Run ``schedulers[i]`` from epoch ``milestones[i-1]`` on (``milestones`` ascending).

    At a milestone the next scheduler restarts from its own epoch 0 in closed form (from the
    base lr); otherwise the current scheduler steps. Built schedulers have already changed
    the lr; construction resets it to the base lr and redoes the initial step of the first
    scheduler, exactly as PyTorch.
    """

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        if len(schedulers) < 1:
            raise ValueError("SequentialLR expects at least one scheduler")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise ValueError("SequentialLR expects all schedulers to belong to the same optimizer")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR expects one milestone fewer than schedulers, got "
                             f"{len(schedulers)} schedulers and {len(milestones)} milestones")
        self._schedulers = list(schedulers)
        self._milestones = list(milestones)
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self._undo(self)  # the schedulers' own initial steps are undone ...
        idx = bisect_right(self._milestones, 0)
        self._schedulers[idx]._initial_step()  # ... and only the first one's is redone
        self._last_lr = self._schedulers[idx].get_last_lr()

    def _undo(self, sched):
        """Step every (nested) scheduler's ``last_epoch`` back by one."""
        if hasattr(sched, "_schedulers"):
            for s in sched._schedulers:
                self._undo(s)
        else:
            sched.last_epoch -= 1

    def step(self):
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        sched = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            sched._update_lr(0)  # the next scheduler starts at its epoch 0 (closed form)
        else:
            sched.step()
        self._last_lr = sched.get_last_lr()

    def state_dict(self):
        d = {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()
             if k not in ("optimizer", "_schedulers")}
        d["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return d

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        subs = state_dict.pop("_schedulers")
        if len(subs) != len(self._schedulers):
            raise ValueError(f"SequentialLR state has {len(subs)} schedulers, this one "
                             f"{len(self._schedulers)}")
        for s, d in zip(self._schedulers, subs):
            s.load_state_dict(d)
        super().load_state_dict(state_dict)  # last: the optimizer gets this one's last lr


# -- the presets of docs/algorithm.md section 6 ------------------------------------------------
def _phases(epochs, warmup_epochs):
    """(warm-up length, decay length) with the decay never empty (no division by zero).

    When ``epochs <= warmup_epochs`` the run ends inside (or right at the end of) the warm-up:
    the schedule is the warm-up alone, and the one-epoch decay phase starts only after the
    last epoch, so its values are never used.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    return warmup_epochs, max(1, epochs - warmup_epochs)


def linear_linear(optimizer, epochs, warmup_epochs=5, start_factor=0.1):
    """Linear warm-up from ``start_factor * lr`` to ``lr`` over ``warmup_epochs``, then linear
    decay to 0 over the remaining epochs (the CIFAR-10 preset)."""
    warm, decay = _phases(epochs, warmup_epochs)
    return SequentialLR(optimizer, [
        LinearLR(optimizer, start_factor=start_factor, total_iters=warm),
        LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=decay),
    ], milestones=[warm])


def linear_cos(optimizer, epochs, warmup_epochs=5, start_factor=0.1):
    """Linear warm-up from ``start_factor * lr`` to ``lr`` over ``warmup_epochs``, then cosine
    annealing to 0 over the remaining epochs (the CIFAR-100 preset)."""
    warm, decay = _phases(epochs, warmup_epochs)
    return SequentialLR(optimizer, [
        LinearLR(optimizer, start_factor=start_factor, total_iters=warm),
        CosineAnnealingLR(optimizer, T_max=decay),
    ], milestones=[warm])


def constant(optimizer, epochs=None, warmup_epochs=None, start_factor=None):
    """The lr stays at its base value (no warm-up; the arguments exist for a uniform call)."""
    return LinearLR(optimizer, start_factor=1.0, end_factor=1.0, total_iters=0)


SCHEDULES = {"linear-linear": linear_linear, "linear-cos": linear_cos, "constant": constant}


def build(name, optimizer, epochs, warmup_epochs=5, start_factor=0.1):
    """The preset called ``name`` (a key of ``SCHEDULES``, the names of ``run.py --scheduler``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](optimizer, epochs, warmup_epochs=warmup_epochs,
                           start_factor=start_factor)
