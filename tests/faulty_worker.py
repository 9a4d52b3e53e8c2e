"""The real worker (``bitdance_core.worker.worker:worker_main``) with faults injected into its engine's step.

Used by the fault-ladder tests through a real server. A request whose prompt is
- ``__device_error__`` makes the step raise a CUDA-style device error (fatal: the worker must exit);
- ``__oom__`` makes the step it runs in raise ``torch.OutOfMemoryError`` once (that step's requests fail);
every other request runs normally.
"""

from __future__ import annotations


def inject(engine) -> None:
    import torch

    real_step = engine.runner.step
    oom_done: set[str] = set()

    def step(running, tick):
        prompts = {st.req.prompt for st in running}
        if "__device_error__" in prompts:
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`")
        fresh = [st.id for st in running if st.req.prompt == "__oom__" and st.id not in oom_done]
        if fresh:
            oom_done.update(fresh)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(running, tick)

    engine.runner.step = step


def worker_main(config, inbox, outbox) -> None:
    from bitdance_core.worker import worker

    build = worker.build_engine

    def build_faulty(cfg):
        engine = build(cfg)
        inject(engine)
        return engine

    worker.build_engine = build_faulty
    worker.worker_main(config, inbox, outbox)
