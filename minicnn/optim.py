"""Optimizers with exactly the updates of ``torch.optim.SGD`` and ``torch.optim.Adam``.

The interface mirrors PyTorch's, with one parameter group:

    opt.params                  list of Parameter
    opt.param_groups[0]         {"params": opt.params, "lr": ..., other hyper-parameters}
    opt.state[param]            per-parameter arrays, created lazily at the first step()
    opt.step()                  reads the lr from param_groups[0] every time (schedulers set it)
    opt.zero_grad()             every .grad set to 0 in place
    opt.state_dict()            {"state": {index: {name: array | number}}, "param_groups": [dict]}

``.data`` is updated in place (masks and others hold references to the arrays) and
``.grad`` is never modified. All arithmetic runs in the parameters' dtype: hyper-parameters
are Python floats, and temporaries live in two scratch buffers per dtype and worker thread
(``backend.worker_buffer``).
"""
from minicnn import backend


def _balanced(params, n):
    """At most ``n`` lists of parameters of about equal total size (largest first, each to the
    lightest list so far; deterministic). One worker: the list as it is."""
    if n <= 1:
        return [list(params)]
    parts, load = [[] for _ in range(n)], [0] * n
    for p in sorted(params, key=lambda p: -p.data.size):
        i = load.index(min(load))
        parts[i].append(p)
        load[i] += p.data.size
    return [part for part in parts if part]


class Optimizer:
    """Base class: parameter bookkeeping, zero_grad, state_dict, scratch buffers."""

    def __init__(self, params, defaults):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears more than once in the optimizer's list")
        self.params = params
        self.param_groups = [dict(params=params, **defaults)]
        self.state = {}     # Parameter -> {name: array or number}

    def step(self):
        """One update of every parameter from its current ``.grad``.

        Parameters are independent (element-wise updates), so they are updated on
        ``backend.cpu_workers()`` threads (lists of about equal total size); the result is the
        same bit for bit with any number of workers.
        """
        group = self.param_groups[0]
        parts = _balanced(self.params, backend.workers_for(self.params[0].data))
        backend.on_items(lambda ps: [self._update(p, group) for p in ps], parts, self.params[0].data)
        if len(parts) > 1:     # state in parameter order, whichever thread created it first
            self.state = {p: self.state[p] for p in self.params if p in self.state}

    def _update(self, p, group):
        raise NotImplementedError

    @staticmethod
    def _decayed_grad(p, wd, out):
        """PyTorch's L2 weight decay: ``g = grad + wd * p``, written into ``out`` (the grad itself when wd = 0)."""
        if wd == 0:
            return p.grad
        g = backend.get_array_module(p.data).multiply(p.data, wd, out=out)  # wd * p
        g += p.grad
        return g

    def zero_grad(self):
        """Set every ``.grad`` to 0 in place (the arrays keep their identity)."""
        for p in self.params:
            p.grad[...] = 0

    @staticmethod
    def _buffers(p):
        """Two scratch arrays shaped like ``p.data``, the calling worker's own (reused for every
        parameter: no param-sized temporaries allocated at every step)."""
        xp, n = backend.get_array_module(p.data), p.data.size
        return [backend.worker_buffer(name, n, p.data.dtype, xp).reshape(p.data.shape)
                for name in ("optim.s1", "optim.s2")]

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self):
        """PyTorch's layout: ``{"state": {index: {name: array or number}}, "param_groups": [dict]}``.

        Arrays are copies on the parameters' device (a snapshot, safe to keep); ``"params"`` in
        the group holds parameter indices instead of Parameters.
        """
        index = {id(p): i for i, p in enumerate(self.params)}
        state = {index[id(p)]: {k: (v.copy() if hasattr(v, "shape") else v) for k, v in s.items()}
                 for p, s in self.state.items()}
        groups = [{**g, "params": list(range(len(self.params)))} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore a ``state_dict()`` exactly, so a resumed run continues bit for bit.

        Hyper-parameters (lr included) come from the saved group. Arrays are copied onto each
        parameter's device and dtype; index keys may be strings and numbers 0-d arrays
        (as after a JSON or ``.npz`` round trip).
        """
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state_dict has {len(groups)} group(s) and "
                             f"{[len(g['params']) for g in groups]} params; this optimizer has "
                             f"1 group of {len(self.params)}")
        state = {}
        for i, saved in state_dict["state"].items():
            p = self.params[int(i)]
            state[p] = {k: self._load_value(k, v, p) for k, v in saved.items()}
        group = {k: v for k, v in groups[0].items() if k != "params"}
        if "betas" in group:
            group["betas"] = tuple(float(b) for b in group["betas"])
        self.param_groups[0].update(group)
        self.state = state

    def flat_state_dict(self):
        """``state_dict()`` flattened for an ``.npz`` file: ``(arrays, meta)``.

        ``arrays``: ``{"<index>.<name>": host NumPy array}``, the per-entry state
        (``momentum_buffer``, ``exp_avg``, ...). ``meta``: JSON-able, ``{"scalars":
        {"<index>.<name>": Python number} (e.g. Adam's ``step``), "param_groups": [the
        hyper-parameters, without "params"]}``. ``load_flat_state_dict`` restores it exactly.
        """
        sd = self.state_dict()
        arrays, scalars = {}, {}
        for index, st in sd["state"].items():
            for name, value in st.items():
                if hasattr(value, "shape") and value.shape != ():
                    arrays[f"{index}.{name}"] = backend.to_numpy(value)
                else:
                    scalars[f"{index}.{name}"] = value.item() if hasattr(value, "item") else value
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        return arrays, {"scalars": scalars, "param_groups": groups}

    def load_flat_state_dict(self, arrays, meta):
        """Restore what ``flat_state_dict`` returned (after an ``.npz`` / JSON round trip)."""
        state = {}
        for key, value in list(arrays.items()) + list(meta["scalars"].items()):
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [dict(g, params=list(range(len(self.params)))) for g in meta["param_groups"]]
        self.load_state_dict({"state": state, "param_groups": groups})

    @staticmethod
    def _load_value(name, value, p):
        if name == "step":
            return int(value)  # a count; Python int (beta**step is the same for int or float)
        if backend.is_gpu_array(value):
            arr = value
        elif hasattr(value, "detach"):  # a torch tensor
            arr = value.detach().cpu().numpy()
        else:
            arr = backend.to_numpy(value)
        if tuple(arr.shape) != tuple(p.data.shape):
            raise ValueError(f"optimizer state {name!r} has shape {tuple(arr.shape)}, "
                             f"parameter {p.name!r} has {tuple(p.data.shape)}")
        arr = backend.to_device(arr, backend.device_of(p.data))
        return arr.astype(p.data.dtype, copy=True)


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    With ``g = grad + weight_decay * p`` (L2 decay added to the gradient)::

        b = g                                     first step (no dampening)
        b = momentum * b + (1 - dampening) * g    later steps
        g = g + momentum * b   (nesterov)   or   g = b
        p = p - lr * g

    State: ``"momentum_buffer"`` (shape of p) when momentum != 0.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(momentum >= 0.0, f"Invalid momentum value: {momentum}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        _check(not nesterov or (momentum > 0 and dampening == 0),
               "Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=float(lr), momentum=float(momentum),
                                      dampening=float(dampening),
                                      weight_decay=float(weight_decay), nesterov=bool(nesterov)))

    def _update(self, p, group):
        xp = backend.get_array_module(p.data)
        lr, mu, damp = group["lr"], group["momentum"], group["dampening"]
        wd = group["weight_decay"]
        s1, s2 = self._buffers(p)
        g = self._decayed_grad(p, wd, out=s2)     # g = grad + wd * p
        if mu != 0:
            state = self.state.setdefault(p, {})
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()  # b = g at the first step
            else:
                buf *= mu                                  # b = mu * b
                if damp != 0:
                    buf += xp.multiply(g, 1.0 - damp, out=s1)  # ... + (1 - dampening) * g
                else:
                    buf += g                               # ... + g  ((1 - 0) * g is g exactly)
            if group["nesterov"]:
                g_new = xp.multiply(buf, mu, out=s1)       # mu * b
                g_new += g                                 # g = g + mu * b
                g = g_new
            else:
                g = buf                                    # g = b
        p.data -= xp.multiply(g, lr, out=s1)               # p = p - lr * g


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient, as ``torch.optim.Adam`` (amsgrad off).

    With ``g = grad + weight_decay * p`` and ``t`` the parameter's step count (from 1)::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = sqrt(v) / sqrt(1 - b2**t) + eps
        p = p - lr / (1 - b1**t) * m / denom

    (eps is added after the bias correction of ``sqrt(v)``, as PyTorch does.)
    State: ``"step"`` (int), ``"exp_avg"`` (m) and ``"exp_avg_sq"`` (v), shapes of p.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
        _check(len(betas) == 2, f"betas must be a pair, got {betas!r}")
        _check(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
        _check(0.0 <= betas[1] < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                                      eps=float(eps), weight_decay=float(weight_decay)))

    def _update(self, p, group):
        xp = backend.get_array_module(p.data)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                                     "exp_avg_sq": xp.zeros_like(p.data)}
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]
        s1, s2 = self._buffers(p)
        g = self._decayed_grad(p, wd, out=s2)     # g = grad + wd * p
        # m = b1*m + (1-b1)*g, as torch's lerp: m + (1-b1)*(g - m)
        m += xp.multiply(xp.subtract(g, m, out=s1), 1.0 - b1, out=s1)
        # v = b2*v + (1-b2)*g*g, as torch's addcmul: ((1-b2)*g)*g
        v *= b2
        v += xp.multiply(xp.multiply(g, 1.0 - b2, out=s1), g, out=s1)
        bias_correction1 = 1.0 - b1 ** t
        bias_correction2_sqrt = (1.0 - b2 ** t) ** 0.5
        step_size = lr / bias_correction1
        denom = xp.sqrt(v, out=s1)               # sqrt(v)
        denom /= bias_correction2_sqrt           # sqrt(v) / sqrt(1 - b2**t)
        denom += eps                             # ... + eps
        upd = xp.multiply(m, step_size, out=s2)  # lr / (1 - b1**t) * m   (g in s2 is spent)
        upd /= denom                             # ... / denom
        p.data -= upd                            # p = p - step_size * m / denom
