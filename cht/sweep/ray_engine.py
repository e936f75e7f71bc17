"""The Ray engine of the sweep: each run a Ray task, retried when its worker is lost.

Ray is an optional extra (``pip install -e '.[sweep]'``, the version pinned in setup.cfg). A
task asks for one GPU (``--device gpu``) or its CPUs (``--cpus-per-run``) and runs
:func:`cht.sweep.run_one` on the node Ray gives it: a run.py process in the run directory,
which must lie on a filesystem every node sees at the same path (the checkout too: the task
runs ``run.py`` from it). When a task's worker process or node is lost, its run.py process
stops (cht/sweep/child.py) and Ray retries the task (``MAX_RETRIES`` times); the retry waits for
the lost holder's lock to go stale if need be (cht/runlock.py) and resumes from the checkpoint.
"""
import os

from cht.sweep import ROOT, Outcome, UsageError, cores, run_env, run_one

MAX_RETRIES = 3   # attempts after a lost worker, per run


def _train(r, threads):
    """The Ray task: run ``r`` on this node with ``threads`` CPU threads (and the GPU Ray gave it)."""
    return run_one(r, run_env(threads))


class RayEngine:
    """A connection to a Ray cluster (or a local Ray started for the sweep) that trains runs."""

    def __init__(self, ray, gpu, cpus, started_here):
        self.ray, self.gpu, self.cpus, self.started_here = ray, gpu, cpus, started_here

    def describe(self):
        res = self.ray.cluster_resources()
        where = "a local Ray" if self.started_here else "the Ray cluster"
        ask = "1 GPU and " * self.gpu + f"{self.cpus} CPU{'s' * (self.cpus > 1)}"
        return (f"{where} with {len(self.ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} "
                f"GPUs; each run asks for {ask}")

    def run(self, runs, progress):
        """Train ``runs`` as Ray tasks. Returns the outcomes; KeyboardInterrupt cancels them."""
        ray = self.ray
        task = ray.remote(_train).options(num_cpus=self.cpus, num_gpus=1 if self.gpu else 0,
                                          max_retries=MAX_RETRIES, retry_exceptions=False)
        refs = {task.remote(r, self.cpus): r for r in runs}
        outcomes = []
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=5.0)
                for ref in ready:
                    r = refs.pop(ref)
                    try:
                        outcomes.append(ray.get(ref))
                    except ray.exceptions.RayError as e:
                        # its worker was lost more than MAX_RETRIES times, or the task could not start there
                        why = (str(e).strip().splitlines() or [""])[0][:200]
                        outcomes.append(Outcome("failed", r, detail=f"Ray task failed ({type(e).__name__}: {why}); "
                                                f"log: {r.log}"))
                    progress.ended(outcomes[-1])
                progress.tick()
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)   # kills the workers; their run.py processes stop with them
            raise
        return outcomes

    def close(self):
        if self.ray.is_initialized():
            self.ray.shutdown()


def reachable(address, timeout=10.0):
    """Raise UsageError unless something answers at ``HOST:PORT`` (Ray itself would retry for
    minutes before giving up)."""
    import socket
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})")


def connect(address, gpu, cpus):
    """Connect to the cluster at ``address`` (``auto``, ``HOST:PORT``), or start a local Ray when
    None; check that a run can be placed. Raises UsageError (one line)."""
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install -e '.[sweep]'")
    import logging
    if address not in (None, "auto"):
        reachable(address)
    pythonpath = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    opts = dict(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
                log_to_driver=False, logging_level=logging.ERROR)
    try:
        if address is None:
            ray.init(num_cpus=cores(), **opts)
        else:
            ray.init(address=address, **opts)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UsageError(f"--address {address}: no Ray cluster reached ({str(e).splitlines()[0] if str(e) else e})")
    engine = RayEngine(ray, gpu, cpus, address is None)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus and (not gpu or n.get("GPU", 0) >= 1)]
    if not fits:
        engine.close()
        need = "a GPU and " * gpu + f"{cpus} CPUs"
        raise UsageError(f"no node of the Ray cluster has {need} for a run (see --cpus-per-run, --device)")
    return engine
